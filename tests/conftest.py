"""Shared test fixtures: offline environment, tiny factory models, and vLLM engines that always shut down."""

from __future__ import annotations

import contextlib
import gc
import os
from pathlib import Path
from types import SimpleNamespace

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


TRAIN_WORDS = ("the", "a", "dog", "cat", "red", "blue", "tree", "house", "sits", "runs", "near", "under", "big",
               "small", "water", "field", "sky")


@pytest.fixture(scope="session")
def train_data_dir(tiny_target, tmp_path_factory) -> Path:
    """12 conversations (half with an image) with their own 20-word answers, teacher-forced through the factory
    Qwen2.5-VL (no vLLM)."""
    import json
    import random

    from vispec_vllm.data.manifest import DatasetSpec
    from vispec_vllm.data.pipeline import run_extract
    from vispec_vllm.factory import make_test_image

    target = tiny_target("qwen2_5_vl")
    root = tmp_path_factory.mktemp("train_data")
    rng = random.Random(0)
    records = []
    for i in range(12):
        answer = " ".join(rng.choice(TRAIN_WORDS) for _ in range(20)) + "."
        record = {"id": f"r{i}", "conversations": [{"from": "human", "value": f"Describe thing {i}."},
                                                   {"from": "gpt", "value": answer}]}
        if i % 2 == 0:
            make_test_image(100 + i, size=(112, 112)).save(root / f"{i}.png")
            record["image"] = f"{i}.png"
        records.append(record)
    (root / "data.json").write_text(json.dumps(records))
    spec = DatasetSpec(target=str(target), source=str(root / "data.json"), image_folder=str(root), start=0,
                       end=None, shuffle_seed=None, shard_size=4, answers="dataset", system_prompt="",
                       extra_instruction="", max_new_tokens=0, max_len=512, dtype="float32")
    run_extract(spec, root / "data", device="cpu", progress=False)
    return root / "data"


TINY_RUN_STEPS = 60  # per stage


@pytest.fixture(scope="session")
def tiny_data(tiny_target, tmp_path_factory):
    """The factory Qwen2.5-VL's own vLLM answers to 16 image + 16 text prompts (up to 48 tokens), teacher-forced:
    `dirs` = (image data dir, text data dir), both under `work`. One vLLM engine."""
    from vispec_vllm.train.tiny import generate_tiny_data

    target = tiny_target("qwen2_5_vl")
    work = tmp_path_factory.mktemp("tiny_run")
    return SimpleNamespace(target=target, work=work, dirs=generate_tiny_data(target, work, seed=0, max_new_tokens=48))


@pytest.fixture(scope="session")
def tiny_run(tiny_data):
    """A ViSpec draft trained on `tiny_data` (stage 1, then stage 2; full vocabulary), in `tiny_data.work`."""
    from vispec_vllm.train import train_tiny_draft

    draft = train_tiny_draft(tiny_data.target, tiny_data.work, seed=0, steps=TINY_RUN_STEPS, data=tiny_data.dirs)
    return SimpleNamespace(target=tiny_data.target, work=tiny_data.work, draft=draft)


@pytest.fixture(scope="session")
def trained_draft(model_root, tiny_target) -> Path:
    """A trained ViSpec draft (full vocabulary; built once, ~2 min, then cached with the factory models): random
    drafts are never accepted, so they would not exercise the accept path of rejection sampling."""
    from vispec_vllm.factory import FACTORY_VERSION
    from vispec_vllm.train import train_tiny_draft

    work = model_root / f"qwen2_5_vl-s0-trained-draft-v{FACTORY_VERSION}"
    return train_tiny_draft(tiny_target("qwen2_5_vl"), work, seed=0, steps=TINY_RUN_STEPS, max_new_tokens=48)


@pytest.fixture(scope="session")
def trained_family_draft(model_root, tiny_target, trained_draft):
    """trained_family_draft(family, num_q=2): a trained ViSpec draft of the factory target of `family`, built once
    per (family, num_q) (~1-2 min each on 2 cores), then cached with the factory models. The num_q variants of a
    family share one data set (the target's own answers). Qwen2.5-VL at num_q 2 is `trained_draft`."""
    from vispec_vllm.factory import FACTORY_VERSION
    from vispec_vllm.train import train_tiny_draft

    def build(family: str, num_q: int = 2) -> Path:
        if (family, num_q) == ("qwen2_5_vl", 2):
            return trained_draft
        target = tiny_target(family)
        first = model_root / f"{family}-s0-trained-draft-q2-v{FACTORY_VERSION}"
        if family == "qwen2_5_vl":
            first = trained_draft.parents[1]
        else:
            train_tiny_draft(target, first, seed=0, steps=TINY_RUN_STEPS, max_new_tokens=48)
        if num_q == 2:
            return first / "stage2" / "draft"
        work = model_root / f"{family}-s0-trained-draft-q{num_q}-v{FACTORY_VERSION}"
        return train_tiny_draft(target, work, seed=0, steps=TINY_RUN_STEPS, num_q=num_q,
                                data=(first / "data_image", first / "data_text"))

    return build


REDUCED_VOCAB = 256  # of the factory target's 1024


@pytest.fixture(scope="session")
def trained_reduced_draft(model_root, tiny_target, trained_draft) -> Path:
    """A trained ViSpec draft with a reduced vocabulary (`REDUCED_VOCAB` ids, `d2t`), trained as `trained_draft`
    and on its data; built once (~1 min), then cached with the factory models."""
    from vispec_vllm.factory import FACTORY_VERSION
    from vispec_vllm.train import train_tiny_draft

    full_work = trained_draft.parents[1]  # the draft is <work>/stage2/draft; its data lies in <work>
    work = model_root / f"qwen2_5_vl-s0-trained-draft-vocab{REDUCED_VOCAB}-v{FACTORY_VERSION}"
    return train_tiny_draft(tiny_target("qwen2_5_vl"), work, seed=0, steps=TINY_RUN_STEPS,
                            draft_vocab_size=REDUCED_VOCAB, data=(full_work / "data_image", full_work / "data_text"))


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
