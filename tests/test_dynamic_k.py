"""Dynamic speculation: K changes between steps with the running batch size (vLLM's
`num_speculative_tokens_per_batch_size`), K=0 steps included, and greedy output stays the target's own (float32).

Six requests (three with an image) of different lengths: the running batch shrinks from 6 to 1, so the schedule
below takes the longest requests through K=1, K=2, K=0 and back to K=3. Once with whole prefills, once with a
64-token budget (chunked prefill).
Greedy verification keeps the output the target's whatever the draft proposes, so the draft KV is checked
directly: every proposal, those right after K=0 steps included, must equal what the reference `ViSpecDraft`
drafts from the whole sequence (tests/parity.py). A K=0 step that skipped the draft's KV write would break that.
"""

from __future__ import annotations

from collections import Counter

import pytest
from conftest import vllm_engine

pytestmark = pytest.mark.vllm

NUM_SPECULATIVE_TOKENS = 3
# (first batch size, last batch size, K), inclusive; vLLM clamps K to NUM_SPECULATIVE_TOKENS
SCHEDULE = [(1, 1, 3), (2, 3, 0), (4, 5, 2), (6, 8, 1)]
MAX_TOKENS = (56, 48, 40, 32, 24, 16)  # gaps of 8 keep each batch size alive for at least two steps at K<=3
QUESTIONS = ("Describe the picture in detail.", "What is in this image?", "What is the scene?")


def conversations() -> list[list[dict]]:
    from vispec_vllm.factory import make_test_image
    from vispec_vllm.media import image_part

    convs = []
    for i in range(len(MAX_TOKENS)):
        if i % 2 == 0:
            content = [image_part(make_test_image(700 + i)), {"type": "text", "text": QUESTIONS[i % 3]}]
        else:
            content = [{"type": "text", "text": f"Tell me about the old house number {i}."}]
        convs.append([{"role": "user", "content": content}])
    return convs


def generate(llm) -> list[list[int]]:
    from vllm import SamplingParams

    params = [SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True) for n in MAX_TOKENS]
    return [list(o.outputs[0].token_ids) for o in llm.chat(conversations(), params, use_tqdm=False)]


def count_k_per_call(drafter) -> Counter:
    """Wraps the live proposer's `propose`: counts its calls by (K asked for, batch rows) and checks the shape of
    what it returns."""
    calls: Counter = Counter()
    propose = drafter.propose

    def counting_propose(num_speculative_tokens, *args, **kwargs):
        rows = kwargs["common_attn_metadata"].num_reqs  # vLLM's runner passes everything but K by keyword
        drafts = propose(num_speculative_tokens, *args, **kwargs)
        assert tuple(drafts.shape) == (rows, num_speculative_tokens)
        calls[(num_speculative_tokens, rows)] += 1
        return drafts

    drafter.propose = counting_propose
    return calls


@pytest.fixture(scope="module")
def target_alone(tiny_target) -> list[list[int]]:
    with vllm_engine(model=str(tiny_target("qwen2_5_vl")), limit_mm_per_prompt={"image": 1}) as llm:
        return generate(llm)


@pytest.mark.parametrize("budget", [None, 64])
def test_k_changing_with_batch_size_including_k0_keeps_greedy_output_identical(
    tiny_target, trained_draft, target_alone, budget
):
    from parity import compare, drafter_of, load_oracle

    from vispec_vllm.engine.metrics import SpecDecodeCounters
    from vispec_vllm.engine.recorder import ProposalRecorder
    from vispec_vllm.factory import target_info

    target = tiny_target("qwen2_5_vl")
    spec = {"method": "eagle", "model": str(trained_draft), "num_speculative_tokens": NUM_SPECULATIVE_TOKENS,
            "num_speculative_tokens_per_batch_size": SCHEDULE}
    engine = dict(model=str(target), limit_mm_per_prompt={"image": 1}, speculative_config=spec, disable_log_stats=False)
    if budget is not None:
        engine["max_num_batched_tokens"] = budget
    with vllm_engine(**engine) as llm:
        drafter = drafter_of(llm)
        drafter.recorder = recorder = ProposalRecorder()
        calls = count_k_per_call(drafter)
        got = generate(llm)
        counters = SpecDecodeCounters.from_metrics(llm.get_metrics())

    oracle = load_oracle(trained_draft, target)
    parity = compare(recorder, oracle, target_info(target).image_token_id, skip_dropped=budget is not None)
    proposed = sum(k * rows * n for (k, rows), n in calls.items())
    print(f"propose calls by (K, batch rows): {dict(sorted(calls.items()))}; accepted {counters.accepted_tokens} "
          f"of {counters.draft_tokens} verified draft tokens ({proposed} proposed); {parity.compared} proposals "
          f"checked against the reference ({parity.with_images} after an image)")
    assert got == target_alone
    assert [len(t) for t in got] == list(MAX_TOKENS)
    # K followed the schedule for every batch size the run went through
    for k, rows in calls:
        assert k == next(scheduled for first, last, scheduled in SCHEDULE if first <= rows <= last), (k, rows)
    ks = {k for k, _ in calls}
    assert 0 in ks and len(ks - {0}) >= 2
    # the longest request went through K=0 steps (batch of 2 or 3), then drafted again at K=3 (alone)
    assert calls[(0, 2)] + calls[(0, 3)] > 0 and calls[(3, 1)] > 0
    assert 0 < counters.accepted_tokens < counters.draft_tokens <= proposed
    # the draft KV stayed right through every K change: all proposals are the reference's, those after K=0 too
    assert parity.mismatched == []
    drafted_rows = sum(rows * n for (k, rows), n in calls.items() if k > 0)
    # with chunked prefill, drafts from a chunk end inside an image are discarded by vLLM and not compared
    assert parity.compared == drafted_rows if budget is None else 0 < parity.compared <= drafted_rows
    assert parity.with_images > 0
