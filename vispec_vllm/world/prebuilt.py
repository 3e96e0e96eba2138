"""Committed trained parts of a world (configs/worlds/<preset>/): the vision side without its codebook (the
projector's second layer, rebuilt from the LM's embeddings), the two drafts without their copy of the LM's
embedding (bfloat16 weights, `d2t` int64), the vision and grounding reports, and `prebuilt.json` (sha256 of
each file, the LM they were trained with, the command that rebuilds them).

They make the demo's first run short: only the LM is fetched and converted and the target assembled. A restored
draft gets its `embed_tokens.weight` back from the target, so it is an official-format draft again.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from vispec_vllm.world.lm import sha256_file
from vispec_vllm.world.presets import WorldPreset
from vispec_vllm.world.vision import CODEBOOK_KEY

MANIFEST = "prebuilt.json"
DRAFTS = ("vispec", "eagle")
REPORTS = ("vision_report.json", "grounding.json")
REBUILD = ("python -m vispec_vllm.world build --preset {preset} --from-scratch && "
           "python -m vispec_vllm.world export-prebuilt --preset {preset}")


@dataclass(frozen=True)
class Prebuilt:
    root: Path
    manifest: dict

    @classmethod
    def find(cls, root: Path, preset: WorldPreset) -> Prebuilt | None:
        """The committed parts for `preset`, or None (absent, or made with other preset settings)."""
        path = root / MANIFEST
        if not path.is_file():
            return None
        manifest = json.loads(path.read_text())
        if manifest.get("preset") != preset.to_json():
            return None
        for name, digest in manifest["sha256"].items():
            if sha256_file(root / name) != digest:
                raise ValueError(f"{root / name}: sha256 differs from {path}; rebuild with: {manifest['rebuild']}")
        return cls(root, manifest)

    def check_lm(self, provenance: dict) -> None:
        wanted, got = self.manifest.get("lm_gguf_sha256"), provenance.get("gguf_sha256")
        if wanted and got and wanted != got:
            raise ValueError(f"the committed parts in {self.root} were trained with LM GGUF {wanted[:12]}..., "
                             f"this LM is {got[:12]}...; rebuild with: {self.manifest['rebuild']}")

    def restore_vision(self, paths, codebook: torch.Tensor) -> None:
        """The committed vision side with its codebook (the projector's second layer, a function of the LM's
        embeddings, not committed) put back."""
        from safetensors.torch import load_file, save_file

        state = load_file(str(self.root / "vision_side.safetensors"))
        state[CODEBOOK_KEY] = codebook.float().contiguous()
        save_file(dict(sorted(state.items())), str(paths.vision_weights), metadata={"format": "pt"})
        shutil.copyfile(self.root / "vision_report.json", paths.vision_report)

    def restore_drafts(self, paths) -> None:
        from safetensors.torch import load_file, save_file

        from vispec_vllm.factory import target_info
        from vispec_vllm.factory.drafts import read_target_tensor

        embed = read_target_tensor(paths.target, target_info(paths.target).embed_key).float()
        for name in DRAFTS:
            source, out = self.root / "drafts" / name, paths.draft(name)
            tmp = out.with_name(out.name + ".tmp")
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
            state = {k: v if k == "d2t" else v.float() for k, v in load_file(str(source / "model.safetensors")).items()}
            state["embed_tokens.weight"] = embed
            save_file(dict(sorted(state.items())), str(tmp / "model.safetensors"), metadata={"format": "pt"})
            shutil.copyfile(source / "config.json", tmp / "config.json")
            shutil.rmtree(out, ignore_errors=True)
            tmp.replace(out)
        shutil.copyfile(self.root / "grounding.json", paths.grounding)


def export_prebuilt(world, out_root: Path) -> Path:
    """Write `world`'s trained parts to `out_root`/<preset> (replaced) and return that directory."""
    from safetensors.torch import load_file, save_file

    out = out_root / world.preset.name
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / "drafts").mkdir(parents=True)
    vision = load_file(str(world.paths.vision_weights))
    vision.pop(CODEBOOK_KEY)
    save_file(dict(sorted(vision.items())), str(tmp / "vision_side.safetensors"), metadata={"format": "pt"})
    for report in REPORTS:
        shutil.copyfile(world.paths.root / report, tmp / report)
    for name in DRAFTS:
        source = world.paths.draft(name)
        state = load_file(str(source / "model.safetensors"))
        state.pop("embed_tokens.weight")
        state = {k: v if k == "d2t" else v.to(torch.bfloat16) for k, v in state.items()}
        (tmp / "drafts" / name).mkdir()
        save_file(dict(sorted(state.items())), str(tmp / "drafts" / name / "model.safetensors"),
                  metadata={"format": "pt"})
        shutil.copyfile(source / "config.json", tmp / "drafts" / name / "config.json")
    files = sorted(p for p in tmp.rglob("*") if p.is_file())
    manifest = {
        "preset": world.preset.to_json(),
        "lm_gguf_sha256": world.lm_provenance.get("gguf_sha256"),
        "rebuild": REBUILD.format(preset=world.preset.name),
        "sha256": {str(p.relative_to(tmp)): sha256_file(p) for p in files},
        "bytes": sum(p.stat().st_size for p in files),
    }
    (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
    shutil.rmtree(out, ignore_errors=True)
    tmp.replace(out)
    return out
