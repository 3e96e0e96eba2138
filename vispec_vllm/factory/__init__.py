"""Tiny, deterministic, offline-built VLM checkpoints for tests: targets here, EAGLE/ViSpec drafts in `drafts`.

    build_tiny_target("qwen2_5_vl", "models/qwen", seed=0)   # also "llava", "llava_next"
    target_info("models/qwen").image_token_id
    make_test_image(seed=3)                                   # deterministic 224x224 RGB PIL image

Command line: `python -m vispec_vllm.factory --family qwen2_5_vl --out DIR [--seed N]` or `--all --out ROOT`.
"""

from __future__ import annotations

from typing import Any

from vispec_vllm.factory.images import make_test_image
from vispec_vllm.factory.info import TargetInfo, target_info
from vispec_vllm.factory.targets import FACTORY_VERSION, FAMILIES, build_tiny_target

__all__ = [
    "FACTORY_VERSION",
    "FAMILIES",
    "TargetInfo",
    "build_tiny_draft",
    "build_tiny_target",
    "make_test_image",
    "target_info",
]


def __getattr__(name: str) -> Any:
    if name == "build_tiny_draft":  # lives with the draft code; imported on first use
        from vispec_vllm.factory.drafts import build_tiny_draft

        return build_tiny_draft
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
