"""Inside vLLM, the ViSpec draft proposes exactly what the reference `ViSpecDraft` proposes when fed the same
target hidden states and image embeddings: at prefill and decode, after one and two images, after a
prefix-cache hit, and with chunked prefill; with trained drafts for all three families, also in the steps
after a partially accepted one. This is what proves the vision path is really used."""

import copy

import pytest
import torch
from conftest import vllm_engine
from parity import _is_dropped_slot, compare, drafter_of, load_oracle

from vispec_vllm.engine.recorder import ProposalRecorder
from vispec_vllm.factory import make_test_image, target_info
from vispec_vllm.media import image_part

pytestmark = pytest.mark.vllm

LONG_QUESTION = "Describe the picture in detail: the shapes, the colours, and the story behind them. " * 3
# Long enough that, with 32-token blocks, the image lies wholly inside the cached prefix of a repeat.
ONE_IMAGE = [{"role": "user", "content": [image_part(make_test_image(1)), {"type": "text", "text": LONG_QUESTION}]}]
TWO_IMAGES = [
    {
        "role": "user",
        "content": [
            {"type": "text", "text": "Compare"},
            image_part(make_test_image(2)),
            {"type": "text", "text": "with this other picture, please"},
            image_part(make_test_image(3)),
            {"type": "text", "text": "now."},
        ],
    }
]
TEXT_ONLY = [{"role": "user", "content": "Tell me a story about a cat and a dog."}]


def record(target, draft, max_tokens: int = 8, **engine_kwargs):
    from vllm import SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    with vllm_engine(
        model=str(target),
        limit_mm_per_prompt={"image": 2},
        block_size=32,
        speculative_config={"method": "eagle", "model": str(draft), "num_speculative_tokens": 3},
        **engine_kwargs,
    ) as llm:
        recorder = ProposalRecorder()
        drafter_of(llm).recorder = recorder
        llm.chat([ONE_IMAGE, TWO_IMAGES, TEXT_ONLY], params, use_tqdm=False)
        llm.chat([ONE_IMAGE], params, use_tqdm=False)  # same prompt again: a prefix-cache hit
    return recorder


@pytest.fixture(scope="module")
def qwen(tiny_target, tiny_draft):
    return tiny_target("qwen2_5_vl"), tiny_draft("qwen2_5_vl")


@pytest.fixture(scope="module")
def recorded(qwen):
    target, draft = qwen
    return record(target, draft)


def test_drafts_equal_reference_at_prefill_decode_images_and_cache_hit(qwen, recorded):
    target, draft = qwen
    report = compare(recorded, load_oracle(draft, target), target_info(target).image_token_id)
    assert report.mismatched == []
    assert report.compared >= 4 * 8 // 2  # prefill + >= 3 decode rounds for each of the 4 requests
    assert report.with_images >= 3 * 4
    first_position = {}
    for call in recorded.calls:
        for req_id in call.req_ids:
            first_position.setdefault(req_id, call.positions[req_id][0])
    one_image_key = recorded.image_spans[recorded.calls[0].req_ids[0]][0]
    repeat = [r for r, spans in recorded.image_spans.items() if spans and spans[0] == one_image_key][-1]
    offset, length, _ = one_image_key
    assert first_position[repeat] > offset + length, "the repeat's image should lie inside its prefix-cache hit"
    # 64-token images, 32-token blocks: after prefill the draft attention reads no whole dropped block
    decode_skips = [c.skipped_keys[r] for c in recorded.calls for r in c.req_ids
                    if recorded.image_spans[r] and c.positions[r][0] >= recorded.prompt_lengths[r]]
    assert decode_skips and min(decode_skips) >= 32


def test_changing_the_adaptor_changes_the_reference_on_image_rows_only(qwen, recorded):
    target, draft = qwen
    oracle = load_oracle(draft, target)
    changed = copy.deepcopy(oracle)
    with torch.no_grad():
        changed.imadpt.o_proj.weight.mul_(-3.0)
    image_id = target_info(target).image_token_id
    report = compare(recorded, changed, image_id)
    assert len(report.mismatched) > 0
    text_only = ProposalRecorder(
        calls=[c for c in recorded.calls if any(not recorded.image_spans[r] for r in c.drafts)],
        hidden_states=recorded.hidden_states,
        image_embeddings=recorded.image_embeddings,
        next_tokens=recorded.next_tokens,
        image_spans=recorded.image_spans,
    )
    for call in text_only.calls:
        call.drafts = {r: d for r, d in call.drafts.items() if not recorded.image_spans[r]}
    assert compare(text_only, changed, image_id).mismatched == []


def test_chunked_prefill_drafts_equal_reference(qwen):
    target, draft = qwen
    recorder = record(target, draft, max_num_batched_tokens=32)
    report = compare(recorder, load_oracle(draft, target), target_info(target).image_token_id, skip_dropped=True)
    partial_prefill_text_ends = [
        (call, r)
        for call in recorder.calls
        for r in call.drafts
        if call.positions[r][-1] + 1 < recorder.prompt_lengths[r]
        and not _is_dropped_slot(recorder.image_spans[r], call.positions[r][-1], 2)
    ]
    assert partial_prefill_text_ends, "max_num_batched_tokens=32 must end some prefill chunks at text slots"
    assert report.mismatched == []
    assert report.compared > 0


def test_changing_the_adaptor_inside_vllm_changes_image_proposals_only(qwen):
    from vllm import SamplingParams

    from vispec_vllm.engine.image_state import AdaptorOutputCache

    target, draft = qwen
    params = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
    spec = {"method": "eagle", "model": str(draft), "num_speculative_tokens": 3}
    with vllm_engine(model=str(target), limit_mm_per_prompt={"image": 2}, speculative_config=spec) as llm:
        drafter = drafter_of(llm)

        def drafts_by_prompt():
            drafter.recorder = ProposalRecorder()
            llm.chat([ONE_IMAGE, TEXT_ONLY], params, use_tqdm=False)
            per_request: dict[str, list] = {}
            for call in drafter.recorder.calls:
                for req_id, tokens in call.drafts.items():
                    per_request.setdefault(req_id.split("-")[0], []).append(tokens)
            return per_request

        before = drafts_by_prompt()
        with torch.no_grad():
            drafter.model.model.imadpt.o_proj.weight.mul_(-3.0)
        budget = drafter.image_states.adaptor_cache.max_bytes
        drafter.image_states.adaptor_cache = AdaptorOutputCache(budget)  # forget adaptor outputs of the old weights
        llm.reset_prefix_cache()
        after = drafts_by_prompt()
    image_key, text_key = sorted(before)[0], sorted(before)[1]
    image_after, text_after = sorted(after)[0], sorted(after)[1]
    assert before[image_key] != after[image_after]
    assert before[text_key] == after[text_after]


def test_stage1_eagle_draft_equals_reference(tiny_target, tiny_draft):
    """A stage-1 checkpoint (no adaptor) drafts from the target's vision features at image slots."""
    target, draft = tiny_target("qwen2_5_vl"), tiny_draft("qwen2_5_vl", stage="eagle")
    recorder = record(target, draft)
    report = compare(recorder, load_oracle(draft, target), target_info(target).image_token_id)
    assert report.mismatched == []
    assert report.with_images > 0


@pytest.mark.parametrize("family", ["qwen2_5_vl", "llava", "llava_next"])
def test_trained_drafts_equal_reference_also_after_partially_accepted_steps(family, tiny_target, trained_family_draft):
    num_speculative_tokens = 3
    target, draft = tiny_target(family), trained_family_draft(family)
    # no prefix caching: a hit on a shared chat-template prefix would hide positions the oracle needs
    recorder = record(target, draft, max_tokens=24, enable_prefix_caching=False)
    report = compare(recorder, load_oracle(draft, target), target_info(target).image_token_id)
    # a decode step's valid query is the bonus token plus the accepted drafts of the step before
    accepted_before = [len(call.positions[r]) - 1 for call in recorder.calls for r in call.drafts
                       if call.positions[r][0] >= recorder.prompt_lengths[r]]
    partial = [n for n in accepted_before if 0 < n < num_speculative_tokens]
    print(f"{family}: {report.compared} proposals compared ({report.with_images} after an image); drafts "
          f"accepted in the step before each decode proposal: {sorted(accepted_before)}")
    assert report.mismatched == []
    assert report.with_images > 0 and partial and 0 in accepted_before
