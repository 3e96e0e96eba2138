"""Inside vLLM, the image path recovers per request: a request whose images fail is drafted text-only while the
batch around it keeps its images, and an image whose adaptor output was evicted is re-encoded when it returns
inside a prefix-cache hit. Greedy output stays the target's own (float32) and drafts are accepted.

Both engines take a 64-token budget and no video: vLLM's encoder cache then holds one 64-token image, so an earlier
image leaves it as soon as another one is encoded.
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from conftest import vllm_engine

pytestmark = pytest.mark.vllm

ENGINE = dict(limit_mm_per_prompt={"image": 1, "video": 0}, max_num_batched_tokens=64, block_size=32)
LONG_QUESTION = "Describe the picture in detail: the shapes, the colours, and the story behind them. " * 2
MAX_TOKENS = 16


def image_prompt(seed: int, question: str = "What is in this image?") -> list[dict]:
    from vispec_vllm.factory import make_test_image
    from vispec_vllm.media import image_part

    return [{"role": "user", "content": [image_part(make_test_image(seed)), {"type": "text", "text": question}]}]


FIRST_BATCH = [image_prompt(900 + i) for i in range(4)] + [[{"role": "user", "content": "Tell me about a red tree."}]]
SECOND_BATCH = [image_prompt(910 + i) for i in range(3)]
# one at a time: the image of A, evicted by B's, comes back with A inside the prefix cache
EVICT_AND_RETURN = [image_prompt(seed, LONG_QUESTION) for seed in (920, 921, 920)]


def generate(llm, conversations) -> list[list[int]]:
    from vllm import SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True)
    return [list(o.outputs[0].token_ids) for o in llm.chat(conversations, params, use_tqdm=False)]


def one_by_one(llm, conversations) -> list[list[int]]:
    return [generate(llm, [conversation])[0] for conversation in conversations]


@pytest.fixture(scope="module")
def target_alone(tiny_target) -> dict[str, list[list[int]]]:
    with vllm_engine(model=str(tiny_target("qwen2_5_vl")), **ENGINE) as llm:
        outputs = {"first": generate(llm, FIRST_BATCH)}
        llm.reset_prefix_cache()
        outputs["second"] = generate(llm, SECOND_BATCH)
        llm.reset_prefix_cache()
        outputs["evict_and_return"] = one_by_one(llm, EVICT_AND_RETURN)
    return outputs


def spec_engine(target, draft):
    spec = {"method": "eagle", "model": str(draft), "num_speculative_tokens": 3}
    return vllm_engine(model=str(target), speculative_config=spec, disable_log_stats=False, **ENGINE)


def counter(llm, name: str) -> int:
    return int({m.name: m for m in llm.get_metrics()}[name].value)


def proposals_of(recorder, req_ids):
    """The recorder, with the drafts of `req_ids` only."""
    calls = [replace(c, drafts={r: d for r, d in c.drafts.items() if r in req_ids}) for c in recorder.calls]
    return replace(recorder, calls=calls)


def test_a_request_whose_image_fails_is_drafted_text_only_and_the_others_keep_their_images(
    tiny_target, trained_draft, target_alone
):
    from parity import compare, drafter_of, load_oracle

    from vispec_vllm.engine.metrics import SpecDecodeCounters
    from vispec_vllm.engine.recorder import ProposalRecorder
    from vispec_vllm.factory import target_info

    target = tiny_target("qwen2_5_vl")
    with spec_engine(target, trained_draft) as llm:
        drafter = drafter_of(llm)
        store = drafter.image_states
        adapt = store.adapt
        adapted: list[torch.Tensor] = []

        def adapt_failing_first(embedding: torch.Tensor) -> torch.Tensor:  # [N, H] -> [num_q, H]
            adapted.append(embedding)
            if len(adapted) == 1:
                raise RuntimeError("injected adaptor failure")
            return adapt(embedding)

        store.adapt = adapt_failing_first
        drafter.recorder = recorder = ProposalRecorder()
        first = generate(llm, FIRST_BATCH)
        failed_after_first = store.text_only_requests
        first_batch = set(recorder.image_spans)
        llm.reset_prefix_cache()
        second = generate(llm, SECOND_BATCH)
        counters = SpecDecodeCounters.from_metrics(llm.get_metrics())

    images = {r: [key for _, _, key in spans] for r, spans in recorder.image_spans.items()}
    without_adaptor_output = {r for r, keys in images.items() if keys and store.adaptor_cache.get(keys[0]) is None}
    print(f"{len(adapted)} images adapted (the first failed); text-only requests: {without_adaptor_output}; "
          f"accepted {counters.accepted_tokens} of {counters.draft_tokens} draft tokens")
    assert first == target_alone["first"] and second == target_alone["second"]
    assert [len(t) for t in first + second] == [MAX_TOKENS] * 8
    assert counters.accepted_tokens > 0
    assert failed_after_first == 1 and store.text_only_requests == 1  # the second batch had no failure
    assert len(without_adaptor_output) == 1 and without_adaptor_output <= first_batch
    # every other request, the second batch included, drafted with its image: the reference draft agrees
    served = {r for r, keys in images.items() if keys} - without_adaptor_output
    assert len(served) == 6 and len(served - first_batch) == 3
    oracle = load_oracle(trained_draft, target)
    parity = compare(proposals_of(recorder, served), oracle, target_info(target).image_token_id, skip_dropped=True)
    assert parity.mismatched == [] and parity.with_images > 0


def test_an_evicted_image_inside_a_prefix_hit_is_reencoded(tiny_target, trained_draft, target_alone, monkeypatch):
    from parity import compare, drafter_of, load_oracle

    from vispec_vllm.engine.metrics import SpecDecodeCounters
    from vispec_vllm.engine.recorder import ProposalRecorder
    from vispec_vllm.factory import target_info

    one_adaptor_output = 2 * 128 * 4  # num_q x H float32 of the trained draft
    monkeypatch.setenv("VISPEC_ADAPTOR_CACHE_BYTES", str(one_adaptor_output))
    target = tiny_target("qwen2_5_vl")
    with spec_engine(target, trained_draft) as llm:
        drafter = drafter_of(llm)
        store = drafter.image_states
        assert store.adaptor_cache.max_bytes == one_adaptor_output == store.num_q * store.hidden_size * 4
        drafter.recorder = recorder = ProposalRecorder()
        outputs = one_by_one(llm, EVICT_AND_RETURN[:1])
        (key,) = [k for _, _, k in next(iter(recorder.image_spans.values()))]
        first_output = store.adaptor_cache.get(key).clone()
        outputs += one_by_one(llm, EVICT_AND_RETURN[1:2])
        assert store.adaptor_cache.get(key) is None and key not in drafter.runner.encoder_cache  # evicted from both
        hits, before = counter(llm, "vllm:prefix_cache_hits"), SpecDecodeCounters.from_metrics(llm.get_metrics())
        outputs += one_by_one(llm, EVICT_AND_RETURN[2:])
        hit_tokens = counter(llm, "vllm:prefix_cache_hits") - hits
        repeat_counters = SpecDecodeCounters.from_metrics(llm.get_metrics()) - before

    repeat = list(recorder.image_spans)[-1]
    (offset, length, repeat_key) = recorder.image_spans[repeat][0]
    print(f"repeat: {hit_tokens} prompt tokens from the prefix cache (image at [{offset}, {offset + length})); "
          f"{store.reencoded_images} image re-encoded; accepted {repeat_counters.accepted_tokens} of "
          f"{repeat_counters.draft_tokens} draft tokens")
    assert outputs == target_alone["evict_and_return"]
    assert repeat_key == key and hit_tokens >= offset + length  # the image lay inside the prefix-cache hit
    assert store.reencoded_images == 1 and store.text_only_requests == 0
    repeat_output = store.requests[repeat].spans[0].adaptor_output
    assert torch.allclose(repeat_output, first_output, rtol=0, atol=1e-6)
    assert repeat_counters.accepted_tokens > 0
    oracle = load_oracle(trained_draft, target)
    parity = compare(proposals_of(recorder, {repeat}), oracle, target_info(target).image_token_id, skip_dropped=True)
    assert parity.mismatched == [] and parity.with_images > 0
