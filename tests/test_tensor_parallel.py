"""Tensor parallelism on the CPU: target and ViSpec draft with `tensor_parallel_size=2` (the draft's layer sharded
like vLLM's EAGLE drafts, the image adaptor replicated) give the target's own greedy output with drafts accepted.

vLLM-CPU binds each worker to a NUMA node by default and refuses two workers on a one-node machine; one core per
rank (`VLLM_CPU_OMP_THREADS_BIND="0|1"`) runs it here. The reference is the target alone at the same TP=2 (the
same all-reduce order); float32.
"""

from __future__ import annotations

import os

import pytest
from conftest import vllm_engine

from vispec_vllm.factory import make_test_image
from vispec_vllm.media import image_part

pytestmark = pytest.mark.vllm

QUESTIONS = ("Describe the picture in detail.", "What is in this image?", "What is the scene?")


def conversations() -> list[list[dict]]:
    convs = [[{"role": "user", "content": [image_part(make_test_image(1700 + i)),
                                           {"type": "text", "text": QUESTIONS[i % 3]}]}] for i in range(5)]
    return [*convs, [{"role": "user", "content": "Tell me about the old house."}]]


@pytest.mark.skipif((os.cpu_count() or 1) < 2, reason="tensor_parallel_size=2 needs two CPU cores, one per rank")
def test_tensor_parallel_2_is_lossless_with_accepted_drafts(tiny_target, trained_draft, monkeypatch):
    from vllm import SamplingParams

    from vispec_vllm.engine.metrics import SpecDecodeCounters

    monkeypatch.setenv("VLLM_CPU_OMP_THREADS_BIND", "0|1")
    params = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
    common = dict(model=str(tiny_target("qwen2_5_vl")), tensor_parallel_size=2, limit_mm_per_prompt={"image": 1},
                  disable_log_stats=False)
    with vllm_engine(**common) as llm:
        expected = [list(o.outputs[0].token_ids) for o in llm.chat(conversations(), params, use_tqdm=False)]
    spec = {"method": "eagle", "model": str(trained_draft), "num_speculative_tokens": 3}
    with vllm_engine(**common, speculative_config=spec) as llm:
        got = [list(o.outputs[0].token_ids) for o in llm.chat(conversations(), params, use_tqdm=False)]
        counters = SpecDecodeCounters.from_metrics(llm.get_metrics())
    print(f"TP=2: accepted {counters.accepted_tokens} of {counters.draft_tokens} draft tokens")
    assert got == expected
    assert 0 < counters.accepted_tokens < counters.draft_tokens
