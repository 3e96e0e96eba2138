"""From measured decode steps and per-position acceptance to a batch-size schedule for vLLM's
`num_speculative_tokens_per_batch_size` (pure: no engine, no timing).

At batch size b and K drafts per row, a decode step yields b * (1 + sum_{i<K} prod_{j<=i} a_j) tokens, a_j being
the conditional acceptance of draft position j (a chain: position j counts only after positions < j were
accepted), and takes step_ms(b, K): the target's verify pass over b*(K+1) tokens plus the draft's passes (at
K=0 the draft still runs its first pass, which keeps its KV in sync). The best K maximises tokens per second.
Between two measured batch sizes step_ms is interpolated linearly; outside them the nearest measured batch
size's step times hold, so its K carries on (as vLLM carries the last range's K on to max_num_seqs).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

Schedule = list[tuple[int, int, int]]  # inclusive (first batch size, last batch size, K), vLLM's format


@dataclass(frozen=True)
class BatchTiming:
    """Decode steps measured at one batch size."""

    batch_size: int
    step_ms: tuple[float, ...]  # [K]: a whole decode step with K drafts per row, K = 0, 1, ...
    target_alone_ms: float  # the K=0 step less the draft's pass: the target's own step, estimated


@dataclass(frozen=True)
class BatchPrediction:
    batch_size: int
    tokens_per_s: tuple[float, ...]  # [K], predicted
    best_k: int
    speedup: float  # tokens per second at best_k over the target alone's


@dataclass(frozen=True)
class Plan:
    schedule: Schedule  # covers 1..max_num_seqs
    predictions: list[BatchPrediction]  # one per measured batch size


def conditional_acceptance(accepted_per_position: Sequence[int], drafts: int) -> list[float]:
    """a_j = P(position j accepted | positions < j accepted), from vLLM's counters: rounds whose draft
    position j was accepted (`spec_decode_num_accepted_tokens_per_pos`) and rounds (`spec_decode_num_drafts`)."""
    if drafts <= 0:
        raise ValueError("no draft rounds were counted, so acceptance is unknown")
    reached = [drafts, *accepted_per_position]
    return [accepted / before if before else 0.0 for before, accepted in zip(reached[:-1], reached[1:], strict=True)]


def tokens_per_row(acceptance: Sequence[float], k: int) -> float:
    """Expected tokens a row gains in one step with k drafts: the bonus token plus accepted drafts."""
    expected, reach = 1.0, 1.0
    for rate in acceptance[:k]:
        reach *= rate
        expected += reach
    return expected


def step_ms_at(timings: Sequence[BatchTiming], batch_size: int, k: int) -> float:
    """step_ms(batch_size, k), linear between measured batch sizes, held flat beyond them."""
    below = [t for t in timings if t.batch_size <= batch_size]
    above = [t for t in timings if t.batch_size >= batch_size]
    if not below:
        return above[0].step_ms[k]
    if not above:
        return below[-1].step_ms[k]
    low, high = below[-1], above[0]
    if low.batch_size == high.batch_size:
        return low.step_ms[k]
    share = (batch_size - low.batch_size) / (high.batch_size - low.batch_size)
    return low.step_ms[k] + share * (high.step_ms[k] - low.step_ms[k])


def best_k(timings: Sequence[BatchTiming], acceptance: Sequence[float], batch_size: int, max_k: int) -> int:
    """The K with the most tokens per second; the smallest such K on a tie."""
    return max(range(max_k + 1), key=lambda k: tokens_per_row(acceptance, k) / step_ms_at(timings, batch_size, k))


def merge_ranges(k_per_batch_size: Sequence[int]) -> Schedule:
    """[K for batch size 1, 2, ...] -> inclusive ranges of consecutive batch sizes with the same K."""
    schedule: Schedule = []
    for batch_size, k in enumerate(k_per_batch_size, start=1):
        if schedule and schedule[-1][2] == k:
            schedule[-1] = (schedule[-1][0], batch_size, k)
        else:
            schedule.append((batch_size, batch_size, k))
    return schedule


def predict(timing: BatchTiming, acceptance: Sequence[float], max_k: int) -> BatchPrediction:
    rates = tuple(timing.batch_size * tokens_per_row(acceptance, k) * 1000.0 / timing.step_ms[k]
                  for k in range(max_k + 1))
    chosen = best_k([timing], acceptance, timing.batch_size, max_k)
    alone = timing.batch_size * 1000.0 / timing.target_alone_ms
    return BatchPrediction(timing.batch_size, rates, chosen, rates[chosen] / alone)


def plan_schedule(
    timings: Sequence[BatchTiming], acceptance: Sequence[float], num_speculative_tokens: int, max_num_seqs: int
) -> Plan:
    """The best K for every batch size 1..max_num_seqs, K <= num_speculative_tokens, merged into vLLM's ranges."""
    ordered = _checked(timings, acceptance, num_speculative_tokens, max_num_seqs)
    ks = [best_k(ordered, acceptance, b, num_speculative_tokens) for b in range(1, max_num_seqs + 1)]
    return Plan(merge_ranges(ks), [predict(t, acceptance, num_speculative_tokens) for t in ordered])


def _checked(
    timings: Sequence[BatchTiming], acceptance: Sequence[float], num_speculative_tokens: int, max_num_seqs: int
) -> list[BatchTiming]:
    if num_speculative_tokens < 1:
        raise ValueError(f"num_speculative_tokens must be >= 1, got {num_speculative_tokens}")
    if max_num_seqs < 1:
        raise ValueError(f"max_num_seqs must be >= 1, got {max_num_seqs}")
    if not timings:
        raise ValueError("no batch size was measured")
    if len(acceptance) < num_speculative_tokens:
        raise ValueError(f"acceptance has {len(acceptance)} positions, fewer than K={num_speculative_tokens}")
    ordered = sorted(timings, key=lambda t: t.batch_size)
    sizes = [t.batch_size for t in ordered]
    if len(set(sizes)) != len(sizes) or sizes[0] < 1:
        raise ValueError(f"batch sizes must be distinct and positive, got {sizes}")
    for timing in ordered:
        if len(timing.step_ms) <= num_speculative_tokens:
            raise ValueError(f"batch {timing.batch_size}: step times for K=0..{len(timing.step_ms) - 1} only, "
                             f"K up to {num_speculative_tokens} asked for")
        if min(timing.step_ms) <= 0 or timing.target_alone_ms <= 0:
            raise ValueError(f"batch {timing.batch_size}: step times must be positive")
    return ordered
