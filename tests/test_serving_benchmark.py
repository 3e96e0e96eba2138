"""The serving benchmark (`benchmarks/serving.py`) end to end on its tiny preset: both drafts calibrated by
`python -m vispec_vllm.calibrate`, three real `vllm serve` processes, vLLM's own `vllm bench serve` client sending
image requests at concurrency 1 and 2, twice, arms alternated. Checks every point was measured, the summary's
speedups are the points' ratios, the ViSpec server accepted drafts, its answers equal the target's (greedy
float32), and the table, plot and per-run JSON were written. Timing figures themselves are not checked."""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.vllm

ROOT = Path(__file__).resolve().parent.parent
ARMS = ("target alone", "blind EAGLE", "ViSpec")
CONCURRENCIES = (1, 2)
REPEATS = 2


def test_serving_benchmark_tiny_preset_end_to_end(tiny_target, trained_draft, tmp_path):
    blind_draft = trained_draft.parents[1] / "stage1" / "draft"  # the same run's text-only stage-1 EAGLE draft
    out = tmp_path / "serving"
    command = [sys.executable, str(ROOT / "benchmarks" / "serving.py"), "--preset", "tiny",
               "--target", str(tiny_target("qwen2_5_vl")), "--vispec", str(trained_draft),
               "--eagle", str(blind_draft), "--out", str(out)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=1200)
    print(done.stdout[-3000:])
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:] + (out / "serving.log").read_text()[-3000:]

    report = json.loads((out / "serving.json").read_text())
    points = report["points"]
    assert sorted((p["arm"], p["concurrency"], p["repeat"]) for p in points) == sorted(
        (a, c, r) for a in ARMS for c in CONCURRENCIES for r in range(REPEATS))
    for point in points:
        assert point["prompts"] == max(2, 2 * point["concurrency"])
        assert point["output_tokens"] > 0 and point["output_tokens_per_s"] > 0
        if point["arm"] == "target alone":
            assert point["acceptance_length"] is None
        else:
            assert point["identical_to_target"] == point["prompts"], point  # lossless through the whole server
            assert point["acceptance_length"] >= 1.0
    vispec_al = [p["acceptance_length"] for p in points if p["arm"] == "ViSpec"]
    assert max(vispec_al) > 1.0, "the ViSpec server accepted no draft token"

    by_key = {(p["arm"], p["concurrency"], p["repeat"]): p for p in points}
    for row in report["rows"]:
        expected = [by_key[(row["arm"], row["concurrency"], r)]["output_tokens_per_s"]
                    / by_key[("target alone", row["concurrency"], r)]["output_tokens_per_s"] for r in range(REPEATS)]
        assert sorted(row["speedup"]) == pytest.approx(sorted(expected))
    for arm in ("blind EAGLE", "ViSpec"):  # each draft was served with its own calibrated schedule
        spec = report["speculative_configs"][arm]
        assert spec["num_speculative_tokens_per_batch_size"], spec
        assert json.loads((out / f"calibration-{arm.replace(' ', '_')}.json").read_text())["speculative_config"] == spec

    run = json.loads((out / "runs" / "r0-c2-ViSpec.json").read_text())  # vllm bench serve's own result file
    assert run["max_concurrency"] == 2 and run["completed"] == 4 and "spec_decode_acceptance_length" in run
    assert (out / "serving.png").stat().st_size > 10_000
    assert "where the time goes" in done.stdout  # the ViSpec calibration's step profile
    table = done.stdout[done.stdout.index("conc  arm"):]
    assert len([line for line in table.splitlines() if line.strip().startswith(("1 ", "2 "))]) == 6
    medians = {(r["arm"], r["concurrency"]): statistics.median(r["output_tokens_per_s"]) for r in report["rows"]}
    assert f"{medians[('ViSpec', 2)]:.1f}" in table
