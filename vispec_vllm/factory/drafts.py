"""`build_tiny_draft`: a tiny random ViSpec (or stage-1 EAGLE) draft in the official format, for a tiny target.

The draft mirrors the official configs: the target family's `architectures`/`model_type`, one layer, MHA,
vocab/hidden/eps/theta from the target, `qkv_bias` for Qwen2.5-VL. `embed_tokens` is a copy of the target's
(as in official training); every other weight is drawn from `seed` with the target factory's scales, `img_fc`
included (not the identity), so the image path changes the output. Stage "eagle" writes a stage-1 checkpoint
(no `imadpt.*`/`img_fc.*`).

Built like the targets: into a private sibling directory, finished with a marker (the build's identity, the
target's file digests and each file's sha256), then renamed into place; an existing build is reused.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch

from vispec_vllm.draft.config import ViSpecConfig
from vispec_vllm.draft.model import ViSpecDraft, identity_img_fc_
from vispec_vllm.factory.info import TargetInfo, target_info
from vispec_vllm.factory.targets import FACTORY_VERSION, MARKER_NAME, file_digests, read_marker
from vispec_vllm.factory.weights import reinitialize

STAGES = ("vispec", "eagle")
ARCHITECTURE_OF_FAMILY = {
    "qwen2_5_vl": "Qwen2_5_VLForConditionalGeneration",
    "llava": "LlavaForConditionalGeneration",
    "llava_next": "LlavaNextForConditionalGeneration",
}
_PARTIAL_INFIX = ".partial-"


def draft_config_for(info: TargetInfo) -> ViSpecConfig:
    """The official-style draft config for a target: one layer, MHA, sizes/eps/theta from the target."""
    is_qwen = info.family == "qwen2_5_vl"
    return ViSpecConfig(
        hidden_size=info.hidden_size,
        intermediate_size=info.intermediate_size,
        num_attention_heads=info.num_attention_heads,
        num_key_value_heads=info.num_attention_heads,
        vocab_size=info.vocab_size,
        max_position_embeddings=info.max_position_embeddings,
        rms_norm_eps=info.rms_norm_eps,
        rope_theta=info.rope_theta,
        qkv_bias=is_qwen,
        pad_token_id=None if is_qwen else 0,
        hidden_act="silu",
        architectures=(ARCHITECTURE_OF_FAMILY[info.family],),
        model_type=info.family,
        extra={"num_hidden_layers": 1, "eos_token_id": info.eos_token_id, "torch_dtype": "float32"},
    )


def read_target_tensor(target_dir: Path, key: str) -> torch.Tensor:
    """One tensor of a (possibly sharded) safetensors target checkpoint."""
    from safetensors import safe_open

    index = target_dir / "model.safetensors.index.json"
    name = json.loads(index.read_text())["weight_map"][key] if index.is_file() else "model.safetensors"
    with safe_open(str(target_dir / name), framework="pt") as handle:
        return handle.get_tensor(key)


def build_tiny_draft(
    target_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    seed: int = 0,
    num_q: int = 2,
    stage: str = "vispec",
) -> Path:
    """Build (or find already built) a tiny draft for the target in `target_dir`; returns `out_dir` as a Path."""
    if stage not in STAGES:
        raise ValueError(f"unknown draft stage {stage!r}; valid stages: {', '.join(STAGES)}")
    if stage == "vispec" and num_q < 2:
        raise ValueError(f"num_q must be >= 2 for a ViSpec draft, got {num_q}")
    target_dir = Path(target_dir).resolve()
    out_dir = Path(out_dir).resolve()
    target_files = file_digests(target_dir)
    wanted = {
        "kind": "draft",
        "stage": stage,
        "seed": seed,
        "num_q": num_q if stage == "vispec" else None,
        "factory_version": FACTORY_VERSION,
        "target": {name: target_files[name] for name in sorted(target_files) if name != MARKER_NAME},
    }
    marker = read_marker(out_dir)
    if marker is not None and all(marker.get(key) == value for key, value in wanted.items()):
        return out_dir
    if out_dir.exists() and any(out_dir.iterdir()) and marker is None:
        raise FileExistsError(f"{out_dir} is not empty and holds no tiny-draft build; refusing to replace it")

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    partial = out_dir.with_name(f".{out_dir.name}{_PARTIAL_INFIX}{os.getpid()}")
    shutil.rmtree(partial, ignore_errors=True)
    try:
        _write_draft(target_dir, partial, seed=seed, num_q=num_q if stage == "vispec" else None)
        identity = {**wanted, "files": file_digests(partial)}
        (partial / MARKER_NAME).write_text(json.dumps(identity, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        if out_dir.exists():  # an older build (other seed, stage, num_q or target)
            shutil.rmtree(out_dir)
        try:
            partial.rename(out_dir)
        except OSError:
            if read_marker(out_dir) != identity:  # another process won the race with the same build: fine
                raise
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    return out_dir


def _write_draft(target_dir: Path, out_dir: Path, *, seed: int, num_q: int | None) -> None:
    info = target_info(target_dir)
    config = draft_config_for(info)
    model = ViSpecDraft(config, num_q=num_q)
    reinitialize(model, seed)
    if num_q is None:
        identity_img_fc_(model.img_fc)  # a stage-1 draft has no img_fc: it is the identity by definition
    embed = read_target_tensor(target_dir, info.embed_key)
    with torch.no_grad():
        model.embed_tokens.weight.copy_(embed.to(torch.float32))
    model.save_pretrained(out_dir)
