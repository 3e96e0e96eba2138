"""Where the time of a decode step goes: exclusive parts from the probes' inclusive times, averaged over steps.

Parts (each measured inside the step, none counted twice):
  scheduler                 Scheduler.schedule + update_from_output
  input preparation         the runner's execute_model less the target's forward and lm_head (state updates,
                            input and attention-metadata building)
  target forward            the runner's _model_forward (the verify pass over all rows' query tokens)
  target lm_head            the target's compute_logits
  sampling / rejection      the runner's _sample (vLLM's sampler, or its rejection sampler when drafts are verified)
  draft forwards            the ViSpec proposer's _forward (attention metadata + draft model), all passes
  draft lm_head + sampling  the proposer's _sample_draft_tokens (logits and the draft tokens)
  proposer bookkeeping      the rest of the proposer's propose (EAGLE shift, positions, image tables, chain updates)
  runner bookkeeping        the runner's sample_tokens less sampling and propose (next-token preparation,
                            the host copy of sampled and draft tokens)
  rest of the step          the step period less all the above: engine core, output processing, detokenising
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from vispec_vllm.calibrate.probes import Probe, StepRecord

PROPOSE = Probe("propose", "drafter", "propose")
PROFILE_PROBES = (
    Probe("update_from_output", "scheduler", "update_from_output"),
    Probe("execute_model", "runner", "execute_model"),
    Probe("target_forward", "runner", "_model_forward"),
    Probe("target_lm_head", "target_model", "compute_logits"),
    Probe("sample_tokens", "runner", "sample_tokens"),
    Probe("sampling", "runner", "_sample"),
    PROPOSE,
    Probe("draft_forward", "drafter", "_forward"),
    Probe("draft_lm_head", "drafter", "_sample_draft_tokens"),
)
REST = "rest of the step"


@dataclass(frozen=True)
class StepProfile:
    batch_size: int
    k: int
    steps: int
    step_ms: float  # mean step period
    parts_ms: dict[str, float]  # exclusive, mean per step; with REST they add up to step_ms
    draft_forwards_per_step: float
    draft_lm_heads_per_step: float


def exclusive_parts(ms: Mapping[str, float]) -> dict[str, float]:
    """Inclusive probe times of one step (missing probes: 0) -> exclusive parts, without REST."""
    def t(name: str) -> float:
        return ms.get(name, 0.0)

    return {
        "scheduler": t("schedule") + t("update_from_output"),
        "input preparation": t("execute_model") - t("target_forward") - t("target_lm_head"),
        "target forward": t("target_forward"),
        "target lm_head": t("target_lm_head"),
        "sampling / rejection": t("sampling"),
        "draft forwards": t("draft_forward"),
        "draft lm_head + sampling": t("draft_lm_head"),
        "proposer bookkeeping": t("propose") - t("draft_forward") - t("draft_lm_head"),
        "runner bookkeeping": t("sample_tokens") - t("sampling") - t("propose"),
    }


def step_profile(steps: Sequence[tuple[StepRecord, float]], batch_size: int, k: int) -> StepProfile:
    """Mean exclusive parts over (record, period ms) pairs of one batch size and K."""
    count = len(steps)
    parts = [exclusive_parts(record.ms) for record, _ in steps]
    mean_parts = {name: sum(p[name] for p in parts) / count for name in parts[0]}
    step_ms = sum(period for _, period in steps) / count
    mean_parts[REST] = step_ms - sum(mean_parts.values())
    return StepProfile(
        batch_size, k, count, step_ms, mean_parts,
        draft_forwards_per_step=sum(r.calls["draft_forward"] for r, _ in steps) / count,
        draft_lm_heads_per_step=sum(r.calls["draft_lm_head"] for r, _ in steps) / count,
    )
