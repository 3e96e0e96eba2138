"""The two data stages end to end: vLLM answers, then the teacher-forced target pass, with manifests."""

from __future__ import annotations

import contextlib
import dataclasses
import json
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

from vispec_vllm.data.answers import generate_answers, load_slice
from vispec_vllm.data.extract import TeacherForcedTarget, extract_shards
from vispec_vllm.data.manifest import DatasetSpec, claim_spec, write_manifest


def resolve_dtype(target_dir: Path, dtype: str) -> str:
    """'auto' = the dtype in the target's config.json (float32 when it names none)."""
    if dtype != "auto":
        return dtype
    config = json.loads((Path(target_dir) / "config.json").read_text())
    for section in (config, config.get("text_config") or {}):
        for key in ("dtype", "torch_dtype"):
            if isinstance(section.get(key), str):
                return section[key]
    return "float32"


def target_summary(target_dir: Path) -> dict:
    from vispec_vllm.factory import target_info

    info = target_info(Path(target_dir))
    summary = dataclasses.asdict(info) if dataclasses.is_dataclass(info) else dict(vars(info))
    summary = {k: (str(v) if isinstance(v, Path) else v) for k, v in summary.items()}
    return {"path": str(Path(target_dir).resolve()), "name": Path(target_dir).name, **summary}


def load_processor(target_dir: Path, processor_kwargs: dict | None = None):
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(str(target_dir), **(processor_kwargs or {}))


def image_token_id(target_dir: Path) -> int:
    from vispec_vllm.factory import target_info

    return int(target_info(Path(target_dir)).image_token_id)


def update_manifest(spec: DatasetSpec, out_dir: Path) -> dict:
    return write_manifest(out_dir, spec, len(load_slice(spec)), target_summary(Path(spec.target)))


@contextlib.contextmanager
def vllm_target(spec: DatasetSpec, **engine_kwargs) -> Iterator[object]:
    """A vLLM engine for the target, shut down on exit (its worker processes would otherwise linger)."""
    from vllm import LLM

    options = {"dtype": spec.dtype, "limit_mm_per_prompt": {"image": 1}, "seed": 0}
    if spec.processor_kwargs:
        options["mm_processor_kwargs"] = spec.processor_kwargs
    options.update({k: v for k, v in engine_kwargs.items() if v is not None})
    llm = LLM(model=spec.target, **options)
    try:
        yield llm
    finally:
        with contextlib.suppress(Exception):
            llm.llm_engine.engine_core.shutdown()


def run_generate(
    spec: DatasetSpec,
    out_dir: Path,
    *,
    llm=None,
    engine_kwargs: dict | None = None,
    records_per_call: int = 512,
    progress: bool = True,
    after_shard: Callable[[int], None] | None = None,
) -> int:
    """Stage A. Uses `llm` when given (any object with vLLM's `LLM.chat`), else starts and stops an engine."""
    if spec.answers != "generate":
        raise ValueError("answers='dataset' uses the dataset's own answers: there is nothing to generate")
    claim_spec(out_dir, spec)
    processor = load_processor(Path(spec.target), spec.processor_kwargs)
    with contextlib.nullcontext(llm) if llm is not None else vllm_target(spec, **(engine_kwargs or {})) as engine:
        return generate_answers(engine, spec, out_dir, processor, records_per_call=records_per_call,
                                progress=progress, after_shard=after_shard)


def run_extract(
    spec: DatasetSpec,
    out_dir: Path,
    *,
    device: str | None = None,
    progress: bool = True,
    after_shard: Callable[[int], None] | None = None,
) -> dict:
    """Stage B; returns the manifest."""
    claim_spec(out_dir, spec)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    target_dir = Path(spec.target)
    target = TeacherForcedTarget(target_dir, dtype=getattr(torch, spec.dtype), device=device)
    processor = load_processor(target_dir, spec.processor_kwargs)
    try:
        extract_shards(target, spec, out_dir, processor, image_token_id(target_dir), progress=progress,
                       after_shard=after_shard)
    finally:
        manifest = update_manifest(spec, out_dir)  # also after an interruption: it lists the finished shards
    return manifest
