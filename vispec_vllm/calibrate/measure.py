"""Measurements on one in-process vLLM engine (target + draft, K = num_speculative_tokens at most).

The engine starts with the schedule [(1, max batch, K)], so vLLM's scheduler holds a dense batch-size -> K
lookup; the calibration overwrites that lookup to force each K in turn (`force_k`). Then:
- acceptance: the prompts run to their end at K, and vLLM's per-position counters give the acceptance;
- step times: at each batch size b, b requests (the prompts, cycled; no EOS stop) decode while K cycles from
  K down to 0 in blocks of BLOCK_STEPS steps, until each K has `steps` decode steps in which all b rows verify
  K drafts timed (schedule to next schedule), with the drafter's `propose` timed inside them; then the requests
  are aborted. With `profile`, `steps` more steps at K are timed part by part (`profile.py`).
"""

from __future__ import annotations

import itertools
import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vispec_vllm.calibrate.plan import BatchTiming
from vispec_vllm.calibrate.probes import LiveParts, StepRecord, StepRecorder
from vispec_vllm.calibrate.profile import PROFILE_PROBES, PROPOSE, StepProfile, step_profile
from vispec_vllm.calibrate.prompts import Conversation
from vispec_vllm.engine.metrics import SpecDecodeCounters
from vispec_vllm.speculative_config import eagle_config

# K cycles through its values in blocks of this many timed steps, so a burst of load from other processes, and the
# growing context, fall on every K alike
BLOCK_STEPS = 8


class CalibrationError(RuntimeError):
    """A measurement could not be taken; the message says why and what to change."""


@dataclass(frozen=True)
class EngineSettings:
    target: Path
    draft: Path
    num_speculative_tokens: int
    max_batch_size: int
    images_per_prompt: int
    dtype: str = "auto"
    max_model_len: int | None = None
    enforce_eager: bool = False
    extra: dict[str, Any] | None = None  # more vllm.LLM keyword arguments
    draft_sample_method: str = "greedy"  # vLLM's speculative-config option (see speculative_config.py)

    def speculative_config(self, schedule: Sequence[Sequence[int]]) -> dict:
        """The speculative config with a `num_speculative_tokens_per_batch_size` schedule."""
        return eagle_config(self.draft, self.num_speculative_tokens, schedule=schedule,
                            draft_sample_method=self.draft_sample_method)


@dataclass(frozen=True)
class BatchMeasurement:
    batch_size: int
    steps: int  # timed steps per K
    step_ms: tuple[float, ...]  # [K] median step period
    propose_ms: tuple[float, ...]  # [K] median time in the drafter's propose
    verify_ms: tuple[float, ...]  # [K] median step period less propose: the target's verify step at K+1 tokens a row
    profile: StepProfile | None = None

    @property
    def timing(self) -> BatchTiming:
        return BatchTiming(self.batch_size, self.step_ms, self.verify_ms[0])

    @property
    def draft_ms_per_token(self) -> float:
        """What one more draft token per row adds to propose, averaged over K = 1..num_speculative_tokens."""
        return (self.propose_ms[-1] - self.propose_ms[0]) / (len(self.propose_ms) - 1)

    @property
    def draft_cost_ratio(self) -> float:
        """c: a draft token's cost relative to the target's step at one token a row."""
        return self.draft_ms_per_token / self.verify_ms[0]


def start_engine(settings: EngineSettings):
    from vllm import LLM

    spec = settings.speculative_config([[1, settings.max_batch_size, settings.num_speculative_tokens]])
    options: dict[str, Any] = dict(model=str(settings.target), dtype=settings.dtype, seed=0,
                                   max_num_seqs=settings.max_batch_size, speculative_config=spec,
                                   limit_mm_per_prompt={"image": max(1, settings.images_per_prompt)},
                                   disable_log_stats=False, enforce_eager=settings.enforce_eager)
    if settings.max_model_len is not None:
        options["max_model_len"] = settings.max_model_len
    options.update(settings.extra or {})
    return LLM(**options)


def live_parts(llm) -> LiveParts:
    """The scheduler, runner and drafter of an engine running in this process (VLLM_ENABLE_V1_MULTIPROCESSING=0)."""
    core = getattr(llm.llm_engine.engine_core, "engine_core", None)
    worker = getattr(getattr(core, "model_executor", None), "driver_worker", None)
    if worker is None:
        raise CalibrationError("the engine's model runner is not in this process: calibration needs "
                               "VLLM_ENABLE_V1_MULTIPROCESSING=0 and tensor_parallel_size 1")
    runner = worker.worker.model_runner
    if getattr(runner, "drafter", None) is None or core.scheduler.dynamic_sd_lookup is None:
        raise CalibrationError("the engine runs no draft with a batch-size schedule")
    return LiveParts(core.scheduler, runner, runner.drafter)


def force_k(scheduler, k: int) -> None:
    """Every batch size gets K drafts from the next schedule() on."""
    lookup = scheduler.dynamic_sd_lookup
    lookup[1:] = [k] * (len(lookup) - 1)


def measure_acceptance(llm, parts: LiveParts, conversations: Sequence[Conversation], params, k: int
                       ) -> SpecDecodeCounters:
    force_k(parts.scheduler, k)
    before = SpecDecodeCounters.from_metrics(llm.get_metrics())
    llm.chat(list(conversations), params, use_tqdm=False)
    counters = SpecDecodeCounters.from_metrics(llm.get_metrics()) - before
    if counters.drafts == 0:
        raise CalibrationError("no draft was verified while answering the prompts: raise --max-tokens")
    return counters


def measure_batch(llm, recorder: StepRecorder, conversations: Sequence[Conversation], params, batch_size: int,
                  num_speculative_tokens: int, steps: int, profile: bool, advance: Callable[[str], None]
                  ) -> BatchMeasurement:
    """Step times of `batch_size` concurrent requests at K = num_speculative_tokens .. 0 (see the module doc);
    `advance(label)` is called after each block of steps."""
    recorder.records.clear()
    request_ids = llm.enqueue_chat(list(itertools.islice(itertools.cycle(conversations), batch_size)), params,
                                   use_tqdm=False)
    ks = range(num_speculative_tokens, -1, -1)
    per_k: dict[int, list[tuple[StepRecord, float]]] = {k: [] for k in ks}
    step_profile_at_k = None
    try:
        with recorder.recording((PROPOSE,)):
            for block in range(blocks_per_k(steps)):
                for k in ks:
                    per_k[k] += _run_phase(llm, recorder, batch_size, k, min(BLOCK_STEPS, steps - len(per_k[k])))
                    advance(f"batch {batch_size}, K={k}, block {block + 1}")
        if profile:
            with recorder.recording(PROFILE_PROBES):
                profiled = _run_phase(llm, recorder, batch_size, num_speculative_tokens, steps)
            step_profile_at_k = step_profile(profiled, batch_size, num_speculative_tokens)
            advance(f"batch {batch_size}, profile")
    finally:
        llm.llm_engine.abort_request(request_ids, internal=True)
    ascending = range(num_speculative_tokens + 1)
    return BatchMeasurement(
        batch_size, steps,
        step_ms=tuple(statistics.median(period for _, period in per_k[k]) for k in ascending),
        propose_ms=tuple(statistics.median(r.ms.get(PROPOSE.name, 0.0) for r, _ in per_k[k]) for k in ascending),
        verify_ms=tuple(statistics.median(period - r.ms.get(PROPOSE.name, 0.0) for r, period in per_k[k])
                        for k in ascending),
        profile=step_profile_at_k,
    )


def blocks_per_k(steps: int) -> int:
    return -(-steps // BLOCK_STEPS)


def _run_phase(llm, recorder: StepRecorder, batch_size: int, k: int, steps: int) -> list[tuple[StepRecord, float]]:
    """Force K and step the engine until `steps` steady (batch_size, K) steps have been timed."""
    force_k(recorder.parts.scheduler, k)
    first = len(recorder.records)
    # room for prefill chunks, the step that still verifies the previous K's drafts, and stray mixed steps
    limit = 3 * steps + 4 * batch_size + 16
    for _ in range(limit):
        llm.llm_engine.step()
        timed = recorder.periods(first, batch_size, k)
        if len(timed) >= steps:
            return timed[:steps]
    raise CalibrationError(
        f"batch {batch_size}, K={k}: {len(recorder.periods(first, batch_size, k))} of {steps} decode steps had all "
        f"{batch_size} requests decoding within {limit} engine steps; the KV cache may be too small for "
        f"{batch_size} requests (raise gpu_memory_utilization / VLLM_CPU_KVCACHE_SPACE) or --max-model-len too "
        "short for the prompts plus the timed tokens")
