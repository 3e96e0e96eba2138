"""The calibration as JSON (schedule, measurements, predictions, profile) and as readable tables."""

from __future__ import annotations

import json
import shlex

from vispec_vllm.calibrate.measure import BatchMeasurement
from vispec_vllm.calibrate.plan import BatchPrediction
from vispec_vllm.calibrate.profile import REST, StepProfile
from vispec_vllm.calibrate.run import Calibration


def to_json(calibration: Calibration) -> dict:
    import vllm

    settings, options, counters = calibration.settings, calibration.options, calibration.acceptance
    return {
        "speculative_config": calibration.speculative_config,
        "num_speculative_tokens_per_batch_size": [list(entry) for entry in calibration.plan.schedule],
        "max_num_seqs": options.max_num_seqs,
        "settings": {"target": str(settings.target), "draft": str(settings.draft),
                     "num_speculative_tokens": settings.num_speculative_tokens,
                     "batch_sizes": list(options.batch_sizes), "steps": options.steps,
                     "temperature": options.temperature, "max_tokens": options.max_tokens,
                     "prompts": calibration.prompts, "dtype": settings.dtype, "vllm": vllm.__version__},
        "acceptance": {"drafts": counters.drafts, "accepted_per_position": list(counters.accepted_per_position),
                       "rate_per_position": counters.per_position_rate,
                       "conditional_per_position": calibration.conditional_acceptance,
                       "mean_acceptance_length": counters.mean_acceptance_length},
        "batches": [_batch_json(m, p) for m, p in zip(calibration.measurements, calibration.plan.predictions,
                                                      strict=True)],
    }


def _batch_json(measurement: BatchMeasurement, prediction: BatchPrediction) -> dict:
    entry = {
        "batch_size": measurement.batch_size,
        "steps": measurement.steps,
        "step_ms": list(measurement.step_ms),
        "verify_ms": list(measurement.verify_ms),
        "propose_ms": list(measurement.propose_ms),
        "target_ms_query_1": measurement.verify_ms[0],
        "target_ms_query_k_plus_1": measurement.verify_ms[-1],
        "draft_ms_per_token": measurement.draft_ms_per_token,
        "draft_cost_ratio": measurement.draft_cost_ratio,
        "predicted_tokens_per_s": list(prediction.tokens_per_s),
        "best_k": prediction.best_k,
        "predicted_speedup": prediction.speedup,
    }
    if measurement.profile is not None:
        entry["profile"] = _profile_json(measurement.profile)
    return entry


def _profile_json(profile: StepProfile) -> dict:
    return {"k": profile.k, "steps": profile.steps, "step_ms": profile.step_ms, "parts_ms": profile.parts_ms,
            "draft_forwards_per_step": profile.draft_forwards_per_step,
            "draft_lm_heads_per_step": profile.draft_lm_heads_per_step}


def format_report(calibration: Calibration) -> str:
    return "\n".join([_acceptance_line(calibration), "", _measured_table(calibration), "",
                      _predicted_table(calibration), "", _schedule_lines(calibration)])


def _acceptance_line(calibration: Calibration) -> str:
    counters = calibration.acceptance
    return (f"acceptance at K={calibration.settings.num_speculative_tokens} ({calibration.prompts} prompts, "
            f"T={calibration.options.temperature:g}, {counters.drafts} draft rounds): per position "
            f"{_numbers(counters.per_position_rate)}, conditional {_numbers(calibration.conditional_acceptance)}, "
            f"mean acceptance length {counters.mean_acceptance_length:.2f}")


def _measured_table(calibration: Calibration) -> str:
    k = calibration.settings.num_speculative_tokens
    head = "".join(f"{f'K={i}':>8}" for i in range(k + 1))
    lines = [f"measured decode steps, ms (median of {calibration.options.steps} steps)",
             "  K=i: the whole step; target: the step less the draft's propose, at 1 and K+1 tokens a row;",
             "  draft 1st: the draft's first pass (K=0); per token: what a draft token adds; c = per token / "
             "target q=1",
             f"{'batch':>5} | {head} | {'target q=1':>10} {f'q={k + 1}':>6} | {'draft 1st':>9} "
             f"{'per token':>9} {'c':>5}"]
    for m in calibration.measurements:
        steps = "".join(f"{t:8.2f}" for t in m.step_ms)
        lines.append(f"{m.batch_size:>5} | {steps} | {m.verify_ms[0]:10.2f} {m.verify_ms[-1]:6.2f} | "
                     f"{m.propose_ms[0]:9.2f} {m.draft_ms_per_token:9.2f} {m.draft_cost_ratio:5.2f}")
    return "\n".join(lines)


def _predicted_table(calibration: Calibration) -> str:
    k = calibration.settings.num_speculative_tokens
    head = "".join(f"{f'K={i}':>9}" for i in range(k + 1))
    lines = ["predicted tokens/s (speedup: best K over the target alone, i.e. the K=0 step less the draft's pass)",
             f"{'batch':>5} | {head} | best K  speedup"]
    for p in calibration.plan.predictions:
        rates = "".join(f"{r:9.1f}" for r in p.tokens_per_s)
        lines.append(f"{p.batch_size:>5} | {rates} | {p.best_k:>6}  {p.speedup:6.2f}x")
    return "\n".join(lines)


def _schedule_lines(calibration: Calibration) -> str:
    config = calibration.speculative_config
    schedule = config["num_speculative_tokens_per_batch_size"]
    lines = [f"schedule for batch sizes 1..{calibration.options.max_num_seqs} (vLLM keeps the last K beyond): "
             f"{json.dumps(schedule)}"]
    if all(p.speedup < 1 for p in calibration.plan.predictions):
        lines.append("predicted speedup below 1 at every measured batch size: the target alone, without a draft, "
                     "is faster here (at K=0 the draft still runs its first pass)")
    lines += ["serve with:", f"  --speculative-config {shlex.quote(json.dumps(config))}"]
    return "\n".join(lines)


def format_profile(calibration: Calibration) -> str:
    profiles = [m.profile for m in calibration.measurements if m.profile is not None]
    k = calibration.settings.num_speculative_tokens
    lines = [f"where the time goes: one decode step at K={k} (mean over {calibration.options.steps} steps)",
             f"{'part':<26}" + "".join(f"{f'batch {p.batch_size}':>18}" for p in profiles),
             f"{'':<26}" + "".join(f"{'ms':>10}{'%':>8}" for _ in profiles)]
    for part in profiles[0].parts_ms:
        cells = "".join(f"{p.parts_ms[part]:10.3f}{100 * p.parts_ms[part] / p.step_ms:7.1f}%" for p in profiles)
        lines.append(f"{part:<26}{cells}")
    lines.append(f"{'step':<26}" + "".join(f"{p.step_ms:10.3f}{100.0:7.1f}%" for p in profiles))
    lines.append(f"{'draft forwards per step':<26}" + "".join(f"{p.draft_forwards_per_step:10.1f}{'':8}"
                                                              for p in profiles))
    lines.append(f"({REST}: engine core loop, output processing and detokenising)")
    return "\n".join(lines)


def _numbers(values: list[float]) -> str:
    return "[" + ", ".join(f"{v:.2f}" for v in values) + "]"
