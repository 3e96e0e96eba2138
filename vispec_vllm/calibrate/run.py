"""One calibration: start the engine, measure acceptance and step times, plan the schedule."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TextIO

from vispec_vllm.calibrate.measure import (
    BatchMeasurement,
    CalibrationError,
    EngineSettings,
    blocks_per_k,
    live_parts,
    measure_acceptance,
    measure_batch,
    start_engine,
)
from vispec_vllm.calibrate.plan import Plan, conditional_acceptance, plan_schedule
from vispec_vllm.calibrate.probes import StepRecorder
from vispec_vllm.calibrate.prompts import Conversation
from vispec_vllm.engine.metrics import SpecDecodeCounters


@dataclass(frozen=True)
class RunOptions:
    batch_sizes: tuple[int, ...]  # ascending
    max_num_seqs: int  # the schedule covers 1..max_num_seqs
    steps: int  # timed decode steps per batch size and K
    max_tokens: int  # answer length in the acceptance pass
    temperature: float
    profile: bool


@dataclass(frozen=True)
class Calibration:
    settings: EngineSettings
    options: RunOptions
    prompts: int
    acceptance: SpecDecodeCounters
    conditional_acceptance: list[float]
    measurements: list[BatchMeasurement]
    plan: Plan

    @property
    def speculative_config(self) -> dict:
        """What `--speculative-config` (or `LLM(speculative_config=...)`) takes."""
        return self.settings.speculative_config(self.plan.schedule)


def calibrate(settings: EngineSettings, options: RunOptions, conversations: Sequence[Conversation],
              out: TextIO) -> Calibration:
    from tqdm import tqdm
    from vllm import SamplingParams

    from vispec_vllm.world.engines import shutdown

    k = settings.num_speculative_tokens
    print(f"[calibrate] starting vLLM: target {settings.target}, draft {settings.draft}, K <= {k}", file=out)
    llm = start_engine(settings)
    try:
        parts = live_parts(llm)
        if options.profile and not getattr(parts.drafter, "is_vispec", False):
            raise CalibrationError("--profile times the ViSpec proposer's parts; the draft is not a ViSpec draft")
        print(f"[calibrate] acceptance at K={k} on {len(conversations)} prompts ...", file=out)
        answers = SamplingParams(temperature=options.temperature, max_tokens=options.max_tokens)
        counters = measure_acceptance(llm, parts, conversations, answers, k)
        decoding = SamplingParams(temperature=options.temperature, ignore_eos=True, max_tokens=None)  # until aborted
        recorder = StepRecorder(parts)
        phases = len(options.batch_sizes) * ((k + 1) * blocks_per_k(options.steps) + options.profile)
        with tqdm(total=phases, desc="[calibrate] step times", file=out, dynamic_ncols=True) as bar:
            def advance(label: str) -> None:
                bar.set_postfix_str(label)
                bar.update()

            measurements = [measure_batch(llm, recorder, conversations, decoding, b, k, options.steps,
                                          options.profile, advance) for b in options.batch_sizes]
    finally:
        shutdown(llm)
    conditional = conditional_acceptance(counters.accepted_per_position, counters.drafts)
    plan = plan_schedule([m.timing for m in measurements], conditional, k, options.max_num_seqs)
    return Calibration(settings, options, len(conversations), counters, conditional, measurements, plan)
