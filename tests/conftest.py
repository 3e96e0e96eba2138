"""Shared test fixtures: offline environment, tiny factory models, and vLLM engines that always shut down."""

from __future__ import annotations

import contextlib
import gc
import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB; note: overrides kv_cache_memory_bytes
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Engines run in the test process: faster start, no orphaned workers, and tests can reach the live proposer.
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")

MODEL_CACHE = Path(
    os.environ.get("VISPEC_TEST_MODELS", Path(__file__).resolve().parent.parent / "artifacts" / "test-models")
)


@pytest.fixture(scope="session")
def model_root() -> Path:
    """Factory models are deterministic and idempotent to build, so they are shared across runs."""
    MODEL_CACHE.mkdir(parents=True, exist_ok=True)
    return MODEL_CACHE


@pytest.fixture(scope="session")
def tiny_target(model_root):
    from vispec_vllm.factory import build_tiny_target

    def build(family: str, seed: int = 0) -> Path:
        return build_tiny_target(family, model_root / f"{family}-s{seed}", seed=seed)

    return build


@pytest.fixture(scope="session")
def tiny_draft(model_root, tiny_target):
    from vispec_vllm.factory import build_tiny_draft

    def build(family: str, *, seed: int = 0, num_q: int = 2, stage: str = "vispec") -> Path:
        target = tiny_target(family)
        return build_tiny_draft(target, model_root / f"{family}-draft-{stage}-q{num_q}-s{seed}", seed=seed,
                                num_q=num_q, stage=stage)

    return build


def shutdown_llm(llm) -> None:
    """Stop the engine core and its worker processes (orphans hold ~1.7 GiB each)."""
    with contextlib.suppress(Exception):
        llm.llm_engine.engine_core.shutdown()
    del llm
    gc.collect()


@contextlib.contextmanager
def vllm_engine(**kwargs):
    from vllm import LLM

    defaults = dict(dtype="float32", enforce_eager=True, max_model_len=1024, max_num_seqs=8, seed=0)
    defaults.update(kwargs)
    llm = LLM(**defaults)
    try:
        yield llm
    finally:
        shutdown_llm(llm)
