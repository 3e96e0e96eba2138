"""Lossless with accepted drafts: with a trained ViSpec draft, vLLM's greedy output is token-identical to the
target alone (float32), and every scenario runs both paths of verification (drafts accepted and rejected).

Per target family (Qwen2.5-VL, LLaVA-1.5, LLaVA-NeXT), with the project's own trained tiny drafts (built once,
cached; `trained_family_draft`): text only, one image, three images, a mixed batch of 16, the same image prompt
twice (a prefix-cache hit, seen in vLLM's counters), a prompt with an image near max_model_len, and chunked
prefill with an image split across chunks, at K=3 and num_q 2; the mixed batch again at K = 1, 2, 5 and with a
num_q 3 draft. A random draft's proposals are all rejected, which would prove nothing about the accept path.
"""

from __future__ import annotations

import pytest
from conftest import vllm_engine

from vispec_vllm.factory import make_test_image
from vispec_vllm.media import image_part

pytestmark = pytest.mark.vllm

MAX_MODEL_LEN = 2048
MAX_TOKENS = 24
NEAR_MAX_ROOM = 12  # tokens left before max_model_len after the near-max prompt: generation stops there
# Chunked-prefill token budget per family: small enough to split the images of a request across chunks, but it
# must hold every image of one request (three here): with less, vLLM 0.32's scheduler was seen spinning without
# scheduling anything (96 tokens for three 64-token LLaVA images).
CHUNK_BUDGET = {"qwen2_5_vl": 224, "llava": 224, "llava_next": 1056}
QUESTIONS = ("Describe the picture in detail.", "What is in this image?", "What is the scene?",
             "How many objects are there?")
FAMILIES = ["qwen2_5_vl", "llava", "llava_next"]


def user(*parts) -> list[dict]:
    content = [p if isinstance(p, dict) else {"type": "text", "text": p} for p in parts]
    return [{"role": "user", "content": content}]


def image(seed: int) -> dict:
    return image_part(make_test_image(seed))


def mixed_batch() -> list:
    mixed = []
    for i in range(16):
        kind = i % 4
        if kind == 0:
            mixed.append(user(f"Tell me about the old house number {i}."))
        elif kind == 1:
            mixed.append(user(image(100 + i), QUESTIONS[i % 4]))
        elif kind == 2:
            mixed.append(user(image(200 + i), "and", image(300 + i), QUESTIONS[(i + 1) % 4]))
        else:
            mixed.append(user(QUESTIONS[i % 4], image(400 + i)))
    return mixed


def scenarios() -> dict[str, list]:
    return {
        "text_only": [user("Tell me about the white cat."), user("Where is the blue boat?")],
        "one_image": [user(image(1), "Describe the picture in detail.")],
        "three_images": [user("First", image(2), "second", image(3), "third", image(4), "What is the scene?")],
        "mixed_16": mixed_batch(),
        "repeat": [user(image(5), "What is in this image? " * 12)] * 2,
    }


def generate(llm, batches: dict[str, list]) -> dict[str, tuple[list[list[int]], object]]:
    """Per scenario: the greedy token ids and the speculative-decoding counters it added (None: no speculation)."""
    from vllm import SamplingParams

    from vispec_vllm.engine.metrics import SpecDecodeCounters

    params = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True)
    results = {}
    for name, batch in batches.items():
        before = SpecDecodeCounters.from_metrics(llm.get_metrics())
        if name == "repeat":  # one at a time, so the second request finds the first in the prefix cache
            outputs = [llm.chat([conv], params, use_tqdm=False)[0] for conv in batch]
        else:
            outputs = llm.chat(batch, params, use_tqdm=False)
        counters = SpecDecodeCounters.from_metrics(llm.get_metrics()) - before
        results[name] = ([list(o.outputs[0].token_ids) for o in outputs], counters)
    return results


def prefix_cache_hits(llm) -> int:
    return int(next(m.value for m in llm.get_metrics() if m.name == "vllm:prefix_cache_hits"))


def assert_lossless_with_both_paths(name: str, got, expected) -> None:
    tokens, counters = got
    assert tokens == expected[0], name
    assert 0 < counters.accepted_tokens < counters.draft_tokens, (name, counters)


def speculative(draft, k: int) -> dict:
    return {"method": "eagle", "model": str(draft), "num_speculative_tokens": k}


@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_output_is_identical_to_target_alone_with_accepted_drafts(family, tiny_target, trained_family_draft):
    from parity import drafter_of
    from vllm import SamplingParams

    from vispec_vllm.engine.recorder import ProposalRecorder

    target, draft = tiny_target(family), trained_family_draft(family)
    common = dict(model=str(target), max_model_len=MAX_MODEL_LEN, max_num_seqs=16, limit_mm_per_prompt={"image": 3},
                  block_size=32, disable_log_stats=False)
    batches = scenarios()
    with vllm_engine(**common) as llm:
        expected = generate(llm, batches)
        near_max_len = len(llm.chat(batches["one_image"], SamplingParams(max_tokens=1), use_tqdm=False)[0]
                           .prompt_token_ids) + NEAR_MAX_ROOM
    with vllm_engine(**common, speculative_config=speculative(draft, 3)) as llm:
        hits_before = prefix_cache_hits(llm)
        got = generate(llm, batches)
        hits = prefix_cache_hits(llm) - hits_before
    # the image prompt again, in engines whose max_model_len leaves it NEAR_MAX_ROOM tokens
    near_max = {"near_max_len": batches["one_image"]}
    with vllm_engine(**common | {"max_model_len": near_max_len}) as llm:
        expected |= generate(llm, near_max)
    with vllm_engine(**common | {"max_model_len": near_max_len}, speculative_config=speculative(draft, 3)) as llm:
        got |= generate(llm, near_max)
    summary = {name: (c.accepted_tokens, c.draft_tokens) for name, (_, c) in got.items()}
    print(f"{family} K=3: accepted/drafted per scenario {summary}; prefix-cache hit tokens {hits}")
    assert hits > 0
    assert len(expected["near_max_len"][0][0]) == NEAR_MAX_ROOM < MAX_TOKENS  # it ran into max_model_len
    for name in expected:
        assert_lossless_with_both_paths(name, got[name], expected[name])

    with vllm_engine(**common, speculative_config=speculative(draft, 3),
                     max_num_batched_tokens=CHUNK_BUDGET[family]) as llm:
        drafter_of(llm).recorder = recorder = ProposalRecorder()
        chunked = generate(llm, {name: batches[name] for name in ("one_image", "three_images", "mixed_16")})
    split_images = [  # a prefill chunk ended inside an image: the image was split across chunks
        r for call in recorder.calls for r in call.drafts
        if call.positions[r][-1] + 1 < recorder.prompt_lengths[r]
        and any(offset <= call.positions[r][-1] + 1 < offset + length
                for offset, length, _ in recorder.image_spans[r])
    ]
    print(f"{family} chunked prefill ({CHUNK_BUDGET[family]} tokens): {len(split_images)} prefill chunks ended "
          "inside an image")
    assert split_images
    for name, result in chunked.items():
        assert_lossless_with_both_paths(f"{name} (chunked prefill)", result, expected[name])


@pytest.mark.parametrize("family", FAMILIES)
def test_mixed_batch_is_lossless_at_every_k_and_with_num_q_3(family, tiny_target, trained_family_draft):
    target = tiny_target(family)
    common = dict(model=str(target), max_model_len=MAX_MODEL_LEN, max_num_seqs=16, limit_mm_per_prompt={"image": 3},
                  block_size=32, disable_log_stats=False)
    batch = {"mixed_16": mixed_batch()}
    with vllm_engine(**common) as llm:
        expected = generate(llm, batch)["mixed_16"]
    runs = [(k, 2) for k in (1, 2, 5)] + [(3, 3)]
    for k, num_q in runs:
        draft = trained_family_draft(family, num_q=num_q)
        with vllm_engine(**common, speculative_config=speculative(draft, k)) as llm:
            got = generate(llm, batch)["mixed_16"]
        print(f"{family} K={k} num_q={num_q}: accepted {got[1].accepted_tokens} of {got[1].draft_tokens}")
        assert_lossless_with_both_paths(f"K={k}, num_q={num_q}", got, expected)
