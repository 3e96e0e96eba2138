"""Build a world end to end, resumably: LM -> vision side -> target VLM -> data -> two drafts -> manifest.

    python -m vispec_vllm.world build --preset small

Every step writes its outputs under `<root>/<preset>/` and is skipped when its outputs are already there, so
an interrupted build continues where it stopped. `preset.json` records the settings the world is built with: a
build with other settings refuses to reuse those outputs (`--from-scratch` clears them and starts over).
`manifest.json` lists the command, per-step seconds and the sha256 of every artifact.
"""

from __future__ import annotations

import json
import shlex
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

from vispec_vllm.world.engines import KV_CACHE_BYTES, MAX_MODEL_LEN
from vispec_vllm.world.lm import sha256_file
from vispec_vllm.world.presets import WorldPreset

ROOT = Path(__file__).resolve().parents[2]
DEFAULT_ROOT = ROOT / "artifacts" / "worlds"
T = TypeVar("T")
PREBUILT_ROOT = ROOT / "configs" / "worlds"  # committed trained parts (see world/prebuilt.py)
LM_CACHE = ROOT / "artifacts" / "lm"
SYSTEM_PROMPT = ""
EXTRA_INSTRUCTION = ""


@dataclass
class WorldPaths:
    root: Path

    @property
    def vision_weights(self) -> Path:
        return self.root / "vision_side.safetensors"

    @property
    def vision_report(self) -> Path:
        return self.root / "vision_report.json"

    @property
    def target(self) -> Path:
        return self.root / "target"

    @property
    def sources(self) -> Path:
        return self.root / "sources"

    @property
    def data(self) -> Path:
        return self.root / "data"

    @property
    def grounding(self) -> Path:
        return self.root / "grounding.json"

    def run(self, name: str) -> Path:
        return self.root / "runs" / name

    def draft(self, name: str) -> Path:
        return self.root / "drafts" / name

    @property
    def manifest(self) -> Path:
        return self.root / "manifest.json"

    @property
    def preset(self) -> Path:
        return self.root / "preset.json"


@dataclass
class World:
    """What a built world hands to the demo and the benchmarks."""

    preset: WorldPreset
    paths: WorldPaths
    lm_provenance: dict = field(default_factory=dict)

    @property
    def target(self) -> Path:
        return self.paths.target

    @property
    def vispec_draft(self) -> Path:
        return self.paths.draft("vispec")

    @property
    def eagle_draft(self) -> Path:
        return self.paths.draft("eagle")


class StepTimer:
    """Runs the build's steps in order, skipping finished ones, and keeps their wall-clock seconds."""

    def __init__(self, log: Callable[[str], None]) -> None:
        self.seconds: dict[str, float] = {}
        self.log = log

    def run(self, name: str, done: Callable[[], bool], action: Callable[[], T]) -> T | None:
        """`action()`'s result, or None when `done()` says the step's outputs are already there."""
        if done():
            self.log(f"[world] {name}: cached")
            return None
        self.log(f"[world] {name} ...")
        started = time.perf_counter()
        result = action()
        self.seconds[name] = round(time.perf_counter() - started, 1)
        self.log(f"[world] {name}: {self.seconds[name]:.0f} s")
        return result


def artifact_hashes(root: Path) -> dict[str, str]:
    """sha256 of every file under `root` (relative paths), manifest excluded."""
    return {str(p.relative_to(root)): sha256_file(p) for p in sorted(root.rglob("*"))
            if p.is_file() and p.name != "manifest.json" and ".tmp" not in p.name}


def start_world(paths: WorldPaths, preset: WorldPreset, *, from_scratch: bool) -> None:
    """Make `paths.root` ready for a build with `preset`: emptied first when `from_scratch`; otherwise its cached
    outputs are kept only if they were made with the same settings (`preset.json`, or an older world's manifest)."""
    import shutil

    if from_scratch:
        shutil.rmtree(paths.root, ignore_errors=True)
    recorded = None
    if paths.preset.exists():
        recorded = json.loads(paths.preset.read_text())
    elif paths.manifest.exists():
        recorded = json.loads(paths.manifest.read_text()).get("preset")
    wanted = preset.to_json()
    if recorded is not None and recorded != wanted:
        changed = ", ".join(f"{key} {recorded.get(key)!r} -> {wanted.get(key)!r}"
                            for key in sorted(set(recorded) | set(wanted)) if recorded.get(key) != wanted.get(key))
        raise SystemExit(f"{paths.root} was built with other {preset.name!r} settings ({changed}), so its cached "
                         f"steps cannot be reused. Remove it (rm -r {paths.root}) and run again, or build with "
                         "--from-scratch (removes it and trains every part).")
    paths.root.mkdir(parents=True, exist_ok=True)
    paths.preset.write_text(json.dumps(wanted, indent=1) + "\n")


# ---------------------------------------------------------------------------------------------- steps
def _prepare_lm(preset: WorldPreset, lm_path: Path | None, progress: bool) -> tuple[Path, dict]:
    from vispec_vllm.world.lm import convert_to_hf, prepare_lm

    if lm_path is None:
        if not preset.lm:
            raise SystemExit(f"preset {preset.name!r} needs --lm PATH (a GGUF file or an HF LM directory)")
        return prepare_lm(preset.lm, LM_CACHE, progress=progress)
    if lm_path.is_dir():
        return lm_path, {"source": str(lm_path)}
    out = lm_path.with_name(lm_path.stem + "-hf")
    if not (out / "config.json").exists():
        convert_to_hf(lm_path, out, progress=progress)
    return out, {"source": str(lm_path), "gguf_sha256": sha256_file(lm_path)}


def _caption_targets(lm_dir: Path, preset: WorldPreset):
    from safetensors import safe_open
    from transformers import AutoTokenizer

    from vispec_vllm.world.vision import CaptionTargets

    tokenizer = AutoTokenizer.from_pretrained(str(lm_dir))
    embeddings = None
    for path in sorted(lm_dir.glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as handle:
            if "model.embed_tokens.weight" in handle.keys():  # noqa: SIM118 (safe_open has no __contains__)
                embeddings = handle.get_tensor("model.embed_tokens.weight").float()
    if embeddings is None:
        raise ValueError(f"{lm_dir}: no model.embed_tokens.weight")
    return CaptionTargets(tokenizer, embeddings, preset.vision)


def _train_vision(preset: WorldPreset, lm_dir: Path, paths: WorldPaths, progress: bool) -> None:
    from vispec_vllm.world.splits import split_samples
    from vispec_vllm.world.vision import save_vision_side, train_vision_side

    targets = _caption_targets(lm_dir, preset)
    pool = preset.vision_steps * preset.vision_batch
    train_seeds = [s.scene_seed for s in split_samples("train", pool, seed=preset.seed)]
    heldout_seeds = [s.scene_seed for s in split_samples("heldout_images", 256, seed=preset.seed)]
    model, result = train_vision_side(preset.vision, targets, train_seeds, heldout_seeds,
                                      steps=preset.vision_steps, batch_size=preset.vision_batch,
                                      lr=preset.vision_lr, seed=preset.seed, progress=progress)
    paths.root.mkdir(parents=True, exist_ok=True)
    paths.vision_report.write_text(json.dumps(result.to_json(), indent=1))
    save_vision_side(model, paths.vision_weights)


def write_split_records(split: str, num: int, out: Path, seed: int) -> Path:
    """Render the split's scenes to PNGs and write LLaVA-style records (the data pipeline's input)."""
    from vispec_vllm.world.scenes import make_scene, render
    from vispec_vllm.world.splits import split_samples

    images = out / "images"
    images.mkdir(parents=True, exist_ok=True)
    records = []
    for sample in split_samples(split, num, seed=seed):
        name = f"{split}_{sample.index:05d}_{sample.scene_seed}.png"
        if not (images / name).exists():
            render(make_scene(sample.scene_seed)).save(images / name)
        records.append({"id": f"{split}-{sample.index}", "image": name, "scene_seed": sample.scene_seed,
                        "conversations": [{"from": "human", "value": f"<image>\n{sample.question}"},
                                          {"from": "gpt", "value": ""}]})
    path = out / f"{split}.json"
    path.write_text(json.dumps(records, indent=1))
    return path


def _data_spec(paths: WorldPaths, preset: WorldPreset, records: Path):
    from vispec_vllm.data.manifest import DatasetSpec

    return DatasetSpec(target=str(paths.target.resolve()), source=str(records.resolve()),
                       image_folder=str((paths.sources / "images").resolve()), start=0, end=None,
                       shuffle_seed=None, shard_size=64, answers="generate", system_prompt=SYSTEM_PROMPT,
                       extra_instruction=EXTRA_INSTRUCTION, max_new_tokens=preset.max_new_tokens,
                       max_len=MAX_MODEL_LEN, dtype="float32")


def engine_options(max_num_seqs: int = 64) -> dict:
    return {"enforce_eager": True, "max_model_len": MAX_MODEL_LEN, "max_num_seqs": max_num_seqs,
            "kv_cache_memory_bytes": KV_CACHE_BYTES}


def grounding_answers(llm, records: list[dict], image_folder: Path, max_new_tokens: int) -> list[str]:
    """The target's greedy answers to `records` (same prompt format as the data pipeline)."""
    from PIL import Image
    from vllm import SamplingParams

    from vispec_vllm.world.prompts import chat_messages

    conversations = []
    for record in records:
        question = record["conversations"][0]["value"].removeprefix("<image>\n")
        conversations.append(chat_messages(Image.open(image_folder / record["image"]).convert("RGB"), question))
    params = SamplingParams(temperature=0.0, max_tokens=max_new_tokens)
    outputs = llm.chat(conversations, params, use_tqdm=False)
    return [o.outputs[0].text for o in outputs]


def _generate_data(paths: WorldPaths, preset: WorldPreset, progress: bool) -> None:
    from vispec_vllm.data.pipeline import run_extract, run_generate, vllm_target
    from vispec_vllm.world.grading import grade_many
    from vispec_vllm.world.scenes import make_scene

    train_records = write_split_records("train", preset.train_samples, paths.sources, preset.seed)
    spec = _data_spec(paths, preset, train_records)
    with vllm_target(spec, **engine_options(), dtype=preset.answer_dtype) as llm:
        run_generate(spec, paths.data, llm=llm, progress=progress)
        report = {}
        for split in ("heldout_images", "heldout_questions"):
            records_path = write_split_records(split, preset.eval_samples, paths.sources, preset.seed)
            records = json.loads(records_path.read_text())
            answers = grounding_answers(llm, records, paths.sources / "images", preset.max_new_tokens)
            scenes = [make_scene(r["scene_seed"]) for r in records]
            correct, stated, per_kind = grade_many(list(zip(answers, scenes, strict=True)))
            report[split] = {"samples": len(records), "dtype": preset.answer_dtype, "facts_correct": correct,
                             "facts_stated": stated,
                             "accuracy": correct / stated if stated else None, "per_kind": per_kind,
                             "examples": [{"question": r["conversations"][0]["value"], "answer": a}
                                          for r, a in list(zip(records, answers, strict=True))[:3]]}
    run_extract(spec, paths.data, device="cpu", progress=progress)
    paths.grounding.write_text(json.dumps(report, indent=1))


def _train_config(preset: WorldPreset, paths: WorldPaths, stage: int, out: Path, init: Path | None, steps: int,
                  progress: bool):
    """Stage 1 from scratch (init None) at `draft_lr`; a continuation of the stage-1 draft at `draft_stage2_lr`."""
    from vispec_vllm.train.config import TrainConfig

    return TrainConfig(stage=stage, target=paths.target, data=[paths.data], out=out, init=init,
                       num_q=preset.num_q, lr=preset.draft_lr if init is None else preset.draft_stage2_lr,
                       mtp_steps=preset.draft_mtp_steps if stage == 2 else 0, max_steps=steps,
                       warmup_steps=max(1, steps // 20),
                       batch_size=preset.draft_batch, max_len=MAX_MODEL_LEN, seed=preset.seed, save_every=steps,
                       keep_checkpoints=1, precision="fp32", device="cpu", progress=progress,
                       draft_vocab_size=preset.draft_vocab_size if stage == 1 and init is None else None)


def _train_draft(paths: WorldPaths, name: str, config) -> None:
    import shutil

    from vispec_vllm.train.trainer import train

    exported = train(config)
    final = paths.draft(name)
    shutil.rmtree(final, ignore_errors=True)
    final.parent.mkdir(parents=True, exist_ok=True)
    shutil.copytree(exported, final)


# ---------------------------------------------------------------------------------------------- the build
def build_world(preset: WorldPreset, root: Path = DEFAULT_ROOT, *, lm_path: Path | None = None,
                progress: bool = True, from_scratch: bool = False, log: Callable[[str], None] = print) -> World:
    """Build (or finish) the world; with committed trained parts for this preset (configs/worlds/<preset>, and
    not `from_scratch`), the vision side, grounding report and drafts are taken from there instead of trained.
    `from_scratch` also removes this world's own cached steps first."""
    from vispec_vllm.world.prebuilt import Prebuilt
    from vispec_vllm.world.vision import caption_codebook

    paths = WorldPaths(Path(root) / preset.name)
    start_world(paths, preset, from_scratch=from_scratch)
    prebuilt = None if from_scratch or lm_path is not None else Prebuilt.find(PREBUILT_ROOT / preset.name, preset)
    steps = StepTimer(log)
    started = time.perf_counter()
    lm = steps.run("language model", lambda: False, lambda: _prepare_lm(preset, lm_path, progress))
    assert lm is not None  # never cached: a fetched LM is only verified
    lm_dir, provenance = lm
    if prebuilt is not None:
        prebuilt.check_lm(provenance)
        steps.run("vision side (committed)", paths.vision_weights.exists,
                  lambda: prebuilt.restore_vision(paths, caption_codebook(_caption_targets(lm_dir, preset))))
    steps.run("vision side", paths.vision_weights.exists, lambda: _train_vision(preset, lm_dir, paths, progress))
    steps.run("target VLM", lambda: (paths.target / "model.safetensors").exists(),
              lambda: _assemble(preset, lm_dir, paths))
    if prebuilt is not None:
        steps.run("drafts (committed)", lambda: all((paths.draft(n) / "model.safetensors").exists()
                                                    for n in ("vispec", "eagle")),
                  lambda: prebuilt.restore_drafts(paths))
    drafts_done = all((paths.draft(n) / "model.safetensors").exists() for n in ("vispec", "eagle"))
    steps.run("answers + teacher-forced data", lambda: drafts_done or paths.grounding.exists(),
              lambda: _generate_data(paths, preset, progress))
    stage1 = paths.run("stage1") / "draft"
    steps.run("stage 1 (EAGLE)", lambda: drafts_done or (stage1 / "model.safetensors").exists(),
              lambda: _train_draft(paths, "stage1", _train_config(
                  preset, paths, 1, paths.run("stage1"), None, preset.draft_stage1_steps, progress)))
    steps.run("stage 2 (ViSpec)", lambda: (paths.draft("vispec") / "model.safetensors").exists(),
              lambda: _train_draft(paths, "vispec", _train_config(
                  preset, paths, 2, paths.run("vispec"), stage1, preset.draft_stage2_steps, progress)))
    steps.run("stage 1 continued (blind EAGLE)", lambda: (paths.draft("eagle") / "model.safetensors").exists(),
              lambda: _train_draft(paths, "eagle", _train_config(
                  preset, paths, 1, paths.run("eagle"), stage1, preset.draft_stage2_steps, progress)))
    world = World(preset, paths, dict(provenance))
    if set(steps.seconds) != {"language model"} or not paths.manifest.exists():  # else nothing changed
        write_manifest(world, steps.seconds, time.perf_counter() - started,
                       prebuilt=None if prebuilt is None else prebuilt.manifest)
    return world


def _assemble(preset: WorldPreset, lm_dir: Path, paths: WorldPaths) -> None:
    from vispec_vllm.world.target import assemble_target

    assemble_target(lm_dir, paths.vision_weights, preset.vision, paths.target)


def write_manifest(world: World, seconds: dict[str, float], total: float, prebuilt: dict | None = None) -> Path:
    paths = world.paths
    previous = json.loads(paths.manifest.read_text()) if paths.manifest.exists() else {}
    step_seconds = {**previous.get("step_seconds", {}), **seconds}
    manifest = {
        "preset": world.preset.to_json(),
        "command": shlex.join([Path(sys.executable).name, *sys.argv]),
        "built": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "language_model": world.lm_provenance,
        "step_seconds": step_seconds,
        "this_run_seconds": round(total, 1),
        "vision": json.loads(paths.vision_report.read_text()) if paths.vision_report.exists() else None,
        "grounding": _grounding_summary(paths),
        "committed_parts": prebuilt,
        "artifacts_sha256": artifact_hashes(paths.root),
        "note": "a real pretrained LM (Q4-derived weights) with a vision side trained here on synthetic scenes; "
                "not a real VLM's figures",
    }
    paths.manifest.write_text(json.dumps(manifest, indent=1))
    return paths.manifest


def _grounding_summary(paths: WorldPaths) -> dict | None:
    if not paths.grounding.exists():
        return None
    report = json.loads(paths.grounding.read_text())
    return {split: {k: v for k, v in r.items() if k != "examples"} for split, r in report.items()}
