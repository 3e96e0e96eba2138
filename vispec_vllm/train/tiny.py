"""A trained ViSpec draft for a tiny factory target, end to end on the CPU in about a minute.

Data: the target's own greedy answers (vLLM) to synthetic image and text prompts, teacher-forced through the
target (transformers). Training: stage 1 (EAGLE) on text + image data, then stage 2 (ViSpec, MTP) on both.
Tests, benchmarks and the demo call `train_tiny_draft` to get a draft whose proposals the target accepts.
"""

from __future__ import annotations

import contextlib
import json
import random
from dataclasses import dataclass
from pathlib import Path

from vispec_vllm.data.manifest import DatasetSpec
from vispec_vllm.train.config import TrainConfig

_SUBJECTS = ("the dog", "a red car", "the old house", "two children", "the blue boat", "a tall tree",
             "the white cat", "a small bird", "the green field", "a woman")
_IMAGE_QUESTIONS = ("Describe the picture in detail.", "What is in this image?", "What color is the sky?",
                    "Where is the light in the picture?", "What can you see on the left side?",
                    "Describe the shapes in the image.", "How many objects are there?", "What is the scene?")
_TEXT_QUESTIONS = ("Tell me about {}.", "Where is {}?", "What does {} look like?", "Why is {} here?",
                   "Describe {} in the morning.", "What would {} do next?")


@dataclass(frozen=True)
class TinySources:
    image_json: Path
    text_json: Path
    image_folder: Path


def write_tiny_sources(work_dir: Path, *, num_image: int = 16, num_text: int = 16, seed: int = 0) -> TinySources:
    """LLaVA-style image records (factory test images) and ShareGPT-style text records."""
    from vispec_vllm.factory import make_test_image

    rng = random.Random(seed)
    image_folder = work_dir / "images"
    image_folder.mkdir(parents=True, exist_ok=True)
    image_records, text_records = [], []
    for i in range(num_image):
        name = f"img_{i:03d}.png"
        if not (image_folder / name).exists():
            make_test_image(seed * 1000 + i).save(image_folder / name)
        question = rng.choice(_IMAGE_QUESTIONS)
        image_records.append({"id": f"img-{i}", "image": name, "conversations": [
            {"from": "human", "value": f"<image>\n{question}"}, {"from": "gpt", "value": "A picture."}]})
    for i in range(num_text):
        question = rng.choice(_TEXT_QUESTIONS).format(rng.choice(_SUBJECTS))
        text_records.append({"id": f"txt-{i}", "conversations": [
            {"from": "human", "value": question}, {"from": "gpt", "value": "It is near the water."}]})
    sources = TinySources(work_dir / "image_data.json", work_dir / "text_data.json", image_folder)
    sources.image_json.write_text(json.dumps(image_records, indent=1))
    sources.text_json.write_text(json.dumps(text_records, indent=1))
    return sources


def tiny_spec(target_dir: Path, source: Path, image_folder: Path | None, *, max_new_tokens: int,
              shard_size: int = 8) -> DatasetSpec:
    from vispec_vllm.data.pipeline import resolve_dtype

    return DatasetSpec(target=str(Path(target_dir).resolve()), source=str(source.resolve()),
                       image_folder=str(image_folder.resolve()) if image_folder else None, start=0, end=None,
                       shuffle_seed=None, shard_size=shard_size, answers="generate", system_prompt="",
                       extra_instruction="", max_new_tokens=max_new_tokens, max_len=1024,
                       dtype=resolve_dtype(target_dir, "auto"))


def generate_tiny_data(target_dir: Path, work_dir: Path, *, seed: int = 0, llm=None, max_new_tokens: int = 64,
                       num_image: int = 16, num_text: int = 16) -> tuple[Path, Path]:
    """(image data dir, text data dir); an existing `llm` (vLLM LLM of the target) is reused if given."""
    from vispec_vllm.data.pipeline import run_extract, run_generate, vllm_target

    sources = write_tiny_sources(work_dir, num_image=num_image, num_text=num_text, seed=seed)
    image_spec = tiny_spec(target_dir, sources.image_json, sources.image_folder, max_new_tokens=max_new_tokens)
    text_spec = tiny_spec(target_dir, sources.text_json, None, max_new_tokens=max_new_tokens)
    image_dir, text_dir = work_dir / "data_image", work_dir / "data_text"
    engine_options = {"enforce_eager": True, "max_model_len": 1024, "max_num_seqs": 16}
    with contextlib.nullcontext(llm) if llm is not None else vllm_target(image_spec, **engine_options) as engine:
        run_generate(image_spec, image_dir, llm=engine, progress=False)
        run_generate(text_spec, text_dir, llm=engine, progress=False)
    run_extract(image_spec, image_dir, device="cpu", progress=False)
    run_extract(text_spec, text_dir, device="cpu", progress=False)
    return image_dir, text_dir


def tiny_train_config(stage: int, target_dir: Path, data: list[Path], out: Path, init: Path | None, *, steps: int,
                      seed: int, draft_vocab_size: int | None = None, num_q: int = 2) -> TrainConfig:
    """Settings for tiny models: a large lr, short warmup, batches of 4, fp32 on the CPU."""
    return TrainConfig(stage=stage, target=Path(target_dir), data=data, out=out, init=init, lr=2e-3,
                       max_steps=steps, warmup_steps=max(1, steps // 20), batch_size=4, seed=seed,
                       save_every=steps, keep_checkpoints=1, precision="fp32", device="cpu", progress=False,
                       draft_vocab_size=draft_vocab_size, num_q=num_q)


def train_tiny_draft(target_dir: Path, work_dir: Path, *, seed: int = 0, steps: int = 300, llm=None,
                     max_new_tokens: int = 64, draft_vocab_size: int | None = None,
                     data: tuple[Path, Path] | None = None, num_q: int = 2) -> Path:
    """A trained stage-2 ViSpec draft (official format) for the factory target `target_dir`.

    draft_vocab_size: a reduced draft vocabulary, chosen in stage 1 (the export then holds `d2t`).
    num_q: stage 2's learned queries per image (num_q - 1 compressed tokens and the global feature).
    data: (image, text) data directories of an earlier `generate_tiny_data` to train on, instead of new ones.
    Idempotent: a finished `work_dir` is returned as is, whatever the arguments (give each setting its own
    `work_dir`); an interrupted one resumes.
    """
    from vispec_vllm.train.trainer import EXPORT_DIR, train

    work_dir = Path(work_dir)
    final = work_dir / "stage2" / EXPORT_DIR
    if (final / "model.safetensors").exists():
        return final
    work_dir.mkdir(parents=True, exist_ok=True)
    image_dir, text_dir = data or generate_tiny_data(target_dir, work_dir, seed=seed, llm=llm,
                                                     max_new_tokens=max_new_tokens)
    stage1 = train(tiny_train_config(1, target_dir, [text_dir, image_dir], work_dir / "stage1", None,
                                     steps=steps, seed=seed, draft_vocab_size=draft_vocab_size))
    return train(tiny_train_config(2, target_dir, [image_dir, text_dir], work_dir / "stage2", stage1,
                                   steps=steps, seed=seed, num_q=num_q))
