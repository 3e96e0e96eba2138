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


def _serving_module():
    import importlib.util

    spec = importlib.util.spec_from_file_location("serving_benchmark", ROOT / "benchmarks" / "serving.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def test_sampled_runs_pass_temperature_and_draft_sampling_and_compare_no_answers():
    serving = _serving_module()
    sampled = serving.Sampling(1.0, "probabilistic")
    assert sampled.fixed_k_config(Path("/d"), 2) == {"method": "eagle", "model": "/d", "num_speculative_tokens": 2,
                                                    "draft_sample_method": "probabilistic"}
    assert "draft_sample_method" not in serving.Sampling(0.0, "greedy").fixed_k_config(Path("/d"), 2)
    args = serving.bench_serve_args("http://h", Path("/t"), Path("/r"), 4, 8, 16, Path("/o"), "n.json", 1.0)
    assert args[args.index("--temperature") + 1] == "1"
    assert serving.bench_serve_args("http://h", Path("/t"), Path("/r"), 4, 8, 16, Path("/o"), "n.json")[
        args.index("--temperature") + 1] == "0"
    points = [serving.Point(arm, 1, 0, 8, tok_s, 1.0, 1.0, None if arm == ARMS[0] else 1.5, 100)
              for arm, tok_s in zip(ARMS, (10.0, 12.0, 13.0), strict=True)]
    rows = serving.summarise(points)  # T > 0: identical_to_target stays None
    assert [r["identical"] for r in rows] == [None, None, None]
    assert [r["speedup"] for r in rows] == [[1.0], [1.2], [1.3]]
    points[1].identical_to_target, points[2].identical_to_target = 8, 7  # greedy
    assert [r["identical"] for r in serving.summarise(points)] == [None, 8, 7]


def test_world_presets_serve_their_world_and_tiny_needs_explicit_models():
    from vispec_vllm.world.presets import PRESETS as WORLDS

    serving = _serving_module()
    assert {p.world for p in serving.PRESETS.values()} - {None} <= set(WORLDS)
    assert serving.parse_args(["--preset", "full"]).preset == "full"
    with pytest.raises(SystemExit):
        serving.parse_args(["--preset", "tiny"])  # no world of its own
    args = serving.parse_args(["--preset", "tiny", "--target", "t", "--vispec", "v", "--eagle", "e"])
    assert args.target == Path("t")


def test_calibration_prompts_follow_the_requests_in_the_same_split(tmp_path):
    from vispec_vllm.world.splits import split_samples

    serving = _serving_module()
    requests, _ = serving.write_requests(serving.REQUESTS_SPLIT, 3, tmp_path / "requests")
    _, prompts = serving.write_requests(serving.REQUESTS_SPLIT, 2, tmp_path / "calibration", first=3)
    samples = split_samples(serving.REQUESTS_SPLIT, 5)
    assert [json.loads(line)["prompt"] for line in requests.read_text().splitlines()] == [
        s.question for s in samples[:3]]
    assert [p["text"] for p in json.loads(prompts.read_text())] == [s.question for s in samples[3:]]
    assert not {s.scene_seed for s in samples[:3]} & {s.scene_seed for s in samples[3:]}  # other images


@pytest.mark.parametrize("servers", ["all at once", "one at a time"])
def test_serving_benchmark_tiny_preset_end_to_end(tiny_target, trained_draft, tmp_path, servers):
    blind_draft = trained_draft.parents[1] / "stage1" / "draft"  # the same run's text-only stage-1 EAGLE draft
    out = tmp_path / "serving"
    command = [sys.executable, str(ROOT / "benchmarks" / "serving.py"), "--preset", "tiny",
               "--target", str(tiny_target("qwen2_5_vl")), "--vispec", str(trained_draft),
               "--eagle", str(blind_draft), "--out", str(out)]
    command += ["--one-server-at-a-time"] if servers == "one at a time" else []
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
    assert report["preset"]["one_server_at_a_time"] == (servers == "one at a time")
    assert "where the time goes" in done.stdout  # the ViSpec calibration's step profile
    table = done.stdout[done.stdout.index("conc  arm"):]
    assert len([line for line in table.splitlines() if line.strip().startswith(("1 ", "2 "))]) == 6
    medians = {(r["arm"], r["concurrency"]): statistics.median(r["output_tokens_per_s"]) for r in report["rows"]}
    assert f"{medians[('ViSpec', 2)]:.1f}" in table
