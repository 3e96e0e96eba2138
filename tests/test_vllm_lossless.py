"""Lossless: with the ViSpec draft, vLLM's greedy output is token-identical to the target alone (float32).

Per target family: text-only, one image, three images, a mixed batch of 16, the same image prompt twice
(prefix-cache hit), a prompt near max_model_len, and chunked prefill with a small token budget.
"""

import pytest
from conftest import vllm_engine

from vispec_vllm.factory import make_test_image
from vispec_vllm.media import image_part

pytestmark = pytest.mark.vllm

MAX_MODEL_LEN = 2048
MAX_TOKENS = 12
# Chunked-prefill token budget per family: small enough to split the long prompts and the batch, but it must
# hold every image of one request (three images here): with less, vLLM 0.32's scheduler was seen spinning
# without scheduling anything (96 tokens for three 64-token LLaVA images).
CHUNK_BUDGET = {"qwen2_5_vl": 224, "llava": 224, "llava_next": 1056}
QUESTIONS = ("Describe the image.", "What is shown here?", "Tell a story about it.", "List the colours.")


def user(*parts) -> list[dict]:
    content = [p if isinstance(p, dict) else {"type": "text", "text": p} for p in parts]
    return [{"role": "user", "content": content}]


def image(seed: int) -> dict:
    return image_part(make_test_image(seed))


def conversations() -> dict[str, list]:
    mixed = []
    for i in range(16):
        kind = i % 4
        if kind == 0:
            mixed.append(user(f"Write a poem number {i} about the sea."))
        elif kind == 1:
            mixed.append(user(image(100 + i), QUESTIONS[i % 4]))
        elif kind == 2:
            mixed.append(user(image(200 + i), "and", image(300 + i), QUESTIONS[(i + 1) % 4]))
        else:
            mixed.append(user(QUESTIONS[i % 4], image(400 + i)))
    return {
        "text_only": [user("Tell me a story about a cat.")],
        "one_image": [user(image(1), "Describe the image in detail.")],
        "three_images": [user("First", image(2), "second", image(3), "third", image(4), "compare them.")],
        "mixed_16": mixed,
        "repeat": [user(image(5), "What is in this picture? " * 12)] * 2,
    }


def near_max_prompt(vocab_size: int) -> list[int]:
    """A text prompt that leaves room for only a few tokens before max_model_len."""
    length = MAX_MODEL_LEN - MAX_TOKENS - 1
    return [(17 * i + 3) % (vocab_size - 32) + 16 for i in range(length)]


def generate_all(llm, vocab_size: int) -> dict[str, list[list[int]]]:
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    params = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True)
    results = {}
    for name, batch in conversations().items():
        if name == "repeat":  # one at a time, so the second request finds the first in the prefix cache
            outputs = [llm.chat([conv], params, use_tqdm=False)[0] for conv in batch]
        else:
            outputs = llm.chat(batch, params, use_tqdm=False)
        results[name] = [list(o.outputs[0].token_ids) for o in outputs]
    near_max = llm.generate([TokensPrompt(prompt_token_ids=near_max_prompt(vocab_size))], params, use_tqdm=False)
    results["near_max_len"] = [list(o.outputs[0].token_ids) for o in near_max]
    return results


@pytest.mark.parametrize("family", ["qwen2_5_vl", "llava", "llava_next"])
def test_greedy_output_is_identical_to_target_alone(family, tiny_target, tiny_draft):
    from vispec_vllm.factory import target_info

    target, draft = tiny_target(family), tiny_draft(family)
    vocab = target_info(target).vocab_size
    common = dict(
        model=str(target), max_model_len=MAX_MODEL_LEN, max_num_seqs=16, limit_mm_per_prompt={"image": 3}, block_size=32
    )
    spec = {"method": "eagle", "model": str(draft), "num_speculative_tokens": 3}
    with vllm_engine(**common) as llm:
        expected = generate_all(llm, vocab)
    with vllm_engine(**common, speculative_config=spec, disable_log_stats=False) as llm:
        got = generate_all(llm, vocab)
        drafted = {m.name: m for m in llm.get_metrics()}["vllm:spec_decode_num_draft_tokens"].value
    with vllm_engine(**common, speculative_config=spec, max_num_batched_tokens=CHUNK_BUDGET[family]) as llm:
        chunked = generate_all(llm, vocab)
    assert drafted > 0
    for name in expected:
        assert got[name] == expected[name], name
        assert chunked[name] == expected[name], f"{name} (chunked prefill)"
    assert all(len(t) == MAX_TOKENS for outs in expected.values() for t in outs)
