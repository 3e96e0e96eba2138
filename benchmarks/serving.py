"""Serving benchmark: a real `vllm serve` with the target alone, the vision-blind EAGLE draft and the ViSpec draft,
driven by vLLM's own serving client (`vllm bench serve`) with image requests, at several concurrencies.

    .venv/bin/python benchmarks/serving.py                      # the small world: concurrency 1,4,16,32 (~25 min)
    .venv/bin/python benchmarks/serving.py --preset full        # the full (0.5B) world, 64-token answers (~50 min)
    .venv/bin/python benchmarks/serving.py --preset tiny --target T --vispec V --eagle E        # CI-sized

1. Requests: scenes of the world's held-out-wording split (unseen images and unseen question phrasings), written
   as a `custom_image` JSONL (prompt + PNG data URL), vLLM's own dataset format for image benchmarks.
2. Schedules: each draft gets its own load-adaptive schedule from `python -m vispec_vllm.calibrate`, measured on
   other prompts of the same split (the samples after the benchmark's requests: traffic like the benchmark's,
   never its requests), with --profile for the ViSpec draft: where a decode step's time
   goes at every calibrated batch size (1 and 16 included). `--fixed-k` skips this and drafts K at every load.
3. Three `vllm serve` processes, started once (float32, prefix caching off so every repeat is a cold
   request). For each repeat and each concurrency, the three arms run in turn, in an order rotated from point to
   point. Where three servers do not fit in memory (`--preset full`, or --one-server-at-a-time), one arm is
   served at a time: each repeat starts each arm's server in turn, in an order rotated from repeat to repeat, and
   runs every concurrency on it. Each point runs
   `vllm bench serve --backend openai-chat --dataset-name custom_image --max-concurrency C`
   (vLLM's benchmark module, in this process, with the same arguments; the exact command is in the log).
4. Per point: output tokens/s, TTFT, TPOT, and AL (vLLM's mean acceptance length, bonus token included, from the
   server's counters, as `vllm bench serve` reports it). Speedup = the arm's output tokens/s / the target's in the
   same repeat; median [min-max] over repeats. Greedy float32 answers are compared with the target's.
   `--temperature T --draft-sample-method probabilistic` benchmarks sampling instead (calibrated at T too); sampled
   answers differ between arms by design, so none are compared (tests/test_sampling_cpu.py checks that sampling
   with drafts keeps the target's distribution).
Writes serving.json, serving.png and each run's `vllm bench serve` result JSON under --out.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import io
import json
import os
import statistics
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from vispec_vllm.speculative_config import DRAFT_SAMPLE_METHODS, eagle_config

ROOT = Path(__file__).resolve().parent.parent
ARMS = ("target alone", "blind EAGLE", "ViSpec")
STARTUP_LIMIT_S = 600
REQUESTS_SPLIT = "heldout_questions"  # unseen images with unseen question wording
MAX_MODEL_LEN = 1024


@dataclass(frozen=True)
class Preset:
    concurrencies: tuple[int, ...]
    repeats: int
    min_prompts: int  # requests per point: max(min_prompts, 2 x concurrency)
    max_tokens: int
    calibration_steps: int
    calibration_prompts: int
    world: str | None = None  # the world preset served when no --target is given
    kv_cache_gib: int = 2  # per server (VLLM_CPU_KVCACHE_SPACE overrides it)
    # three float32 servers of the 0.5B target do not fit in 24 GiB (the third failed to start): serve one arm at
    # a time, restarted for each repeat
    one_server_at_a_time: bool = False


PRESETS = {
    "small": Preset(concurrencies=(1, 4, 16, 32), repeats=3, min_prompts=8, max_tokens=128, calibration_steps=16,
                    calibration_prompts=8, world="small"),
    # 1 GiB holds 32 full-length (1,024-token) rows of the 0.5B target; 64-token answers keep the run near 50 min
    "full": Preset(concurrencies=(1, 4, 16, 32), repeats=3, min_prompts=8, max_tokens=64, calibration_steps=16,
                   calibration_prompts=8, world="full", kv_cache_gib=1, one_server_at_a_time=True),
    "tiny": Preset(concurrencies=(1, 2), repeats=2, min_prompts=2, max_tokens=16, calibration_steps=8,
                   calibration_prompts=4),
}


@dataclass
class Point:
    arm: str
    concurrency: int
    repeat: int
    prompts: int
    output_tokens_per_s: float
    median_ttft_ms: float
    median_tpot_ms: float
    acceptance_length: float | None  # None for the target alone
    output_tokens: int
    identical_to_target: int | None = None  # answers equal to the target's in the same repeat


@dataclass(frozen=True)
class Sampling:
    temperature: float  # every request's
    draft_sample_method: str  # vLLM's speculative-config option, for both drafts

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def fixed_k_config(self, draft: Path, k: int) -> dict:
        return eagle_config(draft, k, draft_sample_method=self.draft_sample_method)

    def label(self) -> str:
        if self.greedy:
            return "greedy"
        return f"T={self.temperature:g}, {self.draft_sample_method} drafts"


@dataclass(frozen=True)
class Models:
    target: Path
    eagle: Path
    vispec: Path
    label: str


# ------------------------------------------------------------------------------------------------ requests


def write_requests(split: str, count: int, directory: Path, first: int = 0) -> tuple[Path, Path]:
    """Samples first..first+count-1 of `split`: a `vllm bench serve` custom_image JSONL (PNG data URLs) and a
    calibration prompts file (PNG files beside it)."""
    from vispec_vllm.media import image_data_url
    from vispec_vllm.world.scenes import make_scene, render
    from vispec_vllm.world.splits import split_samples

    directory.mkdir(parents=True, exist_ok=True)
    lines, prompts = [], []
    for index, sample in enumerate(split_samples(split, first + count)[first:]):
        image = render(make_scene(sample.scene_seed))
        image.save(directory / f"{index:03d}.png")
        lines.append(json.dumps({"prompt": sample.question, "image_files": [image_data_url(image)]}))
        prompts.append({"text": sample.question, "image": f"{index:03d}.png"})
    (directory / "requests.jsonl").write_text("\n".join(lines) + "\n")
    (directory / "prompts.json").write_text(json.dumps(prompts, indent=1))
    return directory / "requests.jsonl", directory / "prompts.json"


# ------------------------------------------------------------------------------------------------ schedules


def calibrate(target: Path, draft: Path, prompts: Path, *, batch_sizes: tuple[int, ...], steps: int,
              max_tokens: int, k: int, sampling: Sampling, out: Path, profile: bool, terminal) -> dict:
    """`python -m vispec_vllm.calibrate` in its own process, with the servers' engine settings (its report on
    `terminal`); returns what it wrote to `out` (the speculative config with the schedule, the measurements)."""
    import subprocess

    command = [sys.executable, "-m", "vispec_vllm.calibrate", "--target", str(target), "--draft", str(draft),
               "--num-speculative-tokens", str(k), "--batch-sizes", ",".join(map(str, batch_sizes)),
               "--max-num-seqs", str(max(batch_sizes)), "--prompts", str(prompts), "--steps", str(steps),
               "--max-tokens", str(max_tokens), "--temperature", str(sampling.temperature),
               "--draft-sample-method", sampling.draft_sample_method, "--dtype", "float32", "--enforce-eager",
               "--max-model-len", str(MAX_MODEL_LEN), "--engine-args", json.dumps({"enable_prefix_caching": False}),
               "--out", str(out)] + (["--profile"] if profile else [])
    print(f"[calibrate] the {draft.name} draft: python {' '.join(command[1:])}", file=terminal)
    terminal.flush()
    done = subprocess.run(command, stdout=terminal)  # its report on the terminal, its engine's output in its log
    if done.returncode != 0:
        raise SystemExit(f"calibration of {draft} failed (exit {done.returncode}); see {out.with_suffix('.log')}")
    return json.loads(out.read_text())


# ------------------------------------------------------------------------------------------------ servers


def serve_args(max_num_seqs: int, spec: dict | None) -> list[str]:
    args = ["--dtype", "float32", "--enforce-eager", "--max-model-len", str(MAX_MODEL_LEN),
            "--max-num-seqs", str(max_num_seqs), "--seed", "0", "--no-enable-prefix-caching",
            "--limit-mm-per-prompt", json.dumps({"image": 1})]
    return args if spec is None else args + ["--speculative-config", json.dumps(spec)]


@contextlib.contextmanager
def running_servers(target: Path, specs: dict[str, dict | None], max_num_seqs: int, kv_cache_gib: int, out: Path,
                    terminal):
    """One `vllm serve` per arm, healthy, stopped on exit: {arm: server}."""
    from vispec_vllm.server_process import launch_server

    # the servers inherit this environment, VLLM_LOGGING_LEVEL included (quiet unless --verbose)
    env = {"VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", str(kv_cache_gib))}
    servers = {}
    try:
        for arm, spec in specs.items():
            args = serve_args(max_num_seqs, spec)
            log = out / f"server-{arm.replace(' ', '_')}.log"
            print(f"[serving] vllm serve {target} {' '.join(args)}  (log: {log})", file=terminal)
            servers[arm] = launch_server(target, args, log, env=env)
        for server in servers.values():
            server.wait_until_healthy(STARTUP_LIMIT_S)
        yield servers
    finally:
        for server in servers.values():
            server.stop()


# ------------------------------------------------------------------------------------------------ client


def bench_serve_args(base_url: str, target: Path, requests: Path, concurrency: int, prompts: int, max_tokens: int,
                     result_dir: Path, result_name: str, temperature: float = 0.0) -> list[str]:
    """The `vllm bench serve` arguments of one point."""
    return ["--backend", "openai-chat", "--base-url", base_url, "--endpoint", "/v1/chat/completions",
            "--model", str(target), "--dataset-name", "custom_image", "--dataset-path", str(requests),
            "--disable-shuffle", "--num-prompts", str(prompts), "--max-concurrency", str(concurrency),
            "--custom-output-len", str(max_tokens), "--temperature", f"{temperature:g}", "--seed", "0",
            "--percentile-metrics", "ttft,tpot,itl,e2el", "--disable-tqdm", "--save-result", "--save-detailed",
            "--result-dir", str(result_dir), "--result-filename", result_name]


def run_bench_serve(args: list[str], log) -> dict:
    """`vllm bench serve <args>` in this process (vLLM's benchmark module); its printout goes to `log`."""
    from vllm.benchmarks.serve import add_cli_args, main
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    parser = FlexibleArgumentParser()
    add_cli_args(parser)
    parsed = parser.parse_args(args)
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        result = main(parsed)
    log.write(f"$ vllm bench serve {' '.join(args)}\n{printed.getvalue()}\n")
    log.flush()
    if result.get("failed", 0):
        raise SystemExit(f"{result['failed']} requests failed: {result.get('errors', [])[:3]}")
    return result


def point_from(arm: str, concurrency: int, repeat: int, result: dict) -> Point:
    al = result.get("spec_decode_acceptance_length")
    return Point(arm, concurrency, repeat, result["completed"], result["output_throughput"], result["median_ttft_ms"],
                 result["median_tpot_ms"], None if arm == ARMS[0] else al, result["total_output_tokens"])


# ------------------------------------------------------------------------------------------------ report


def _spread(values: list[float], fmt: str) -> str:
    return f"{statistics.median(values):{fmt}} [{min(values):{fmt}}-{max(values):{fmt}}]"


def speedups(points: list[Point], arm: str, concurrency: int) -> list[float]:
    """Per repeat: the arm's output tokens/s over the target's at the same concurrency and repeat."""
    by_key = {(p.arm, p.concurrency, p.repeat): p for p in points}
    return [by_key[(arm, concurrency, r)].output_tokens_per_s / by_key[(ARMS[0], concurrency, r)].output_tokens_per_s
            for (a, c, r) in by_key if a == arm and c == concurrency]


def summarise(points: list[Point]) -> list[dict]:
    rows = []
    for concurrency in sorted({p.concurrency for p in points}):
        for arm in ARMS:
            group = [p for p in points if (p.arm, p.concurrency) == (arm, concurrency)]
            if not group:
                continue
            ratios = speedups(points, arm, concurrency)
            als = [p.acceptance_length for p in group if p.acceptance_length is not None]
            rows.append({
                "concurrency": concurrency, "arm": arm, "repeats": len(group),
                "output_tokens_per_s": [p.output_tokens_per_s for p in group],
                "speedup": ratios, "ttft_ms": [p.median_ttft_ms for p in group],
                "tpot_ms": [p.median_tpot_ms for p in group], "acceptance_length": als,
                "identical": None if any(p.identical_to_target is None for p in group)  # the target, or T > 0
                else sum(p.identical_to_target for p in group),
                "answers": sum(p.prompts for p in group),
            })
    return rows


def format_table(rows: list[dict]) -> str:
    lines = [f"{'conc':>4}  {'arm':<13}{'output tok/s':>22}{'speedup':>22}{'TTFT ms':>10}{'TPOT ms':>10}"
             f"{'AL':>7}  identical answers"]
    for row in rows:
        speedup = _spread(row["speedup"], ".2f") + "x" if row["arm"] != ARMS[0] else ""
        al = f"{statistics.median(row['acceptance_length']):.2f}" if row["acceptance_length"] else ""
        same = f"{row['identical']}/{row['answers']}" if row["identical"] is not None else ""
        lines.append(f"{row['concurrency']:>4}  {row['arm']:<13}{_spread(row['output_tokens_per_s'], '.1f'):>22}"
                     f"{speedup:>22}{statistics.median(row['ttft_ms']):>10.0f}"
                     f"{statistics.median(row['tpot_ms']):>10.1f}{al:>7}  {same}")
    return "\n".join(lines)


def plot(rows: list[dict], title: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    concurrencies = sorted({r["concurrency"] for r in rows})
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.2))
    for index, arm in enumerate(ARMS):
        arm_rows = [next(r for r in rows if (r["arm"], r["concurrency"]) == (arm, c)) for c in concurrencies]
        for axis, key in ((left, "speedup"), (right, "output_tokens_per_s")):
            if key == "speedup" and arm == ARMS[0]:
                continue
            medians = [statistics.median(r[key]) for r in arm_rows]
            errors = [[m - min(r[key]) for m, r in zip(medians, arm_rows, strict=True)],
                      [max(r[key]) - m for m, r in zip(medians, arm_rows, strict=True)]]
            axis.errorbar(concurrencies, medians, yerr=errors, marker="o", capsize=3, color=f"C{index}", label=arm)
            if key == "speedup":
                for c, m in zip(concurrencies, medians, strict=True):
                    axis.annotate(f"{m:.2f}x", (c, m), textcoords="offset points", fontsize=8, color=f"C{index}",
                                  xytext=(5, 6) if arm == "ViSpec" else (5, -12))
    left.axhline(1.0, color="grey", linestyle="--", linewidth=1)
    left.set_ylabel("output tokens/s over the target alone")
    left.set_title("speedup, median [min-max] over repeats")
    right.set_ylabel("output tokens/s")
    right.set_title("throughput")
    for axis in (left, right):
        axis.set_xscale("log", base=2)
        axis.set_xticks(concurrencies, [str(c) for c in concurrencies])
        axis.set_xlabel("concurrency (vllm bench serve --max-concurrency)")
        axis.legend()
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


# ------------------------------------------------------------------------------------------------ main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="small",
                        help="sizes of the run and the world served (small, full: the README's figures; tiny: CI, "
                             "needs --target)")
    parser.add_argument("--target", type=Path, help="a target VLM directory instead of the preset's world")
    parser.add_argument("--vispec", type=Path, help="with --target: the ViSpec draft")
    parser.add_argument("--eagle", type=Path, help="with --target: the vision-blind (stage-1) EAGLE draft")
    parser.add_argument("--concurrency", type=int, nargs="+", help="override the preset's concurrencies")
    parser.add_argument("--repeats", type=int, help="override the preset's repeats (at least 3 for reported figures)")
    parser.add_argument("--num-speculative-tokens", type=int, default=3, help="largest K (default 3)")
    parser.add_argument("--one-server-at-a-time", action="store_true",
                        help="serve one arm at a time (the preset's choice otherwise: full does, for memory)")
    parser.add_argument("--fixed-k", action="store_true", help="no calibration: both drafts draft K at every load")
    parser.add_argument("--temperature", type=float, default=0.0,
                        help="every request's temperature (default 0: greedy, answers compared with the target's)")
    parser.add_argument("--draft-sample-method", choices=DRAFT_SAMPLE_METHODS, default="greedy",
                        help="vLLM's draft_sample_method for both drafts (matters at T > 0)")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "serving")
    parser.add_argument("--verbose", action="store_true", help="vLLM's INFO logs in the server logs")
    args = parser.parse_args(argv)
    if args.target is not None and (args.vispec is None or args.eagle is None):
        parser.error("--target needs --vispec and --eagle")
    if args.target is None and PRESETS[args.preset].world is None:
        parser.error(f"--preset {args.preset} serves no world: give --target, --vispec and --eagle")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from vispec_vllm.console import engine_output_to, quiet_vllm

    quiet_vllm(args.verbose)
    preset = PRESETS[args.preset]
    concurrencies = tuple(sorted(args.concurrency or preset.concurrencies))
    preset = replace(preset, concurrencies=concurrencies, repeats=args.repeats or preset.repeats,
                     one_server_at_a_time=args.one_server_at_a_time or preset.one_server_at_a_time)
    if args.target is not None:
        models = Models(args.target.resolve(), args.eagle.resolve(), args.vispec.resolve(), f"target {args.target}")
    else:
        from vispec_vllm.world.build import DEFAULT_ROOT, build_world
        from vispec_vllm.world.presets import PRESETS as WORLDS

        world = build_world(WORLDS[preset.world], DEFAULT_ROOT, progress=True)
        models = Models(world.target, world.eagle_draft, world.vispec_draft,
                        f"{world.preset.name} world ({world.lm_provenance.get('upstream', world.preset.lm)}, "
                        "Q4-derived, + a vision side trained here)")
    args.out.mkdir(parents=True, exist_ok=True)
    from vispec_vllm.server_process import ServerError

    with engine_output_to(None if args.verbose else args.out / "serving.log") as terminal:
        try:
            return _benchmark(args, preset, models, terminal)
        except ServerError as error:
            print(f"error: a vllm serve process did not start: {error}", file=terminal)
            return 1


def _benchmark(args: argparse.Namespace, preset: Preset, models: Models, terminal) -> int:
    from tqdm import tqdm

    started = time.monotonic()
    most_prompts = max(max(preset.min_prompts, 2 * c) for c in preset.concurrencies)
    requests, _ = write_requests(REQUESTS_SPLIT, most_prompts, args.out / "requests")
    # calibrated on traffic like the benchmark's (the same split: held-out wording) but never on its requests
    _, calibration_prompts = write_requests(REQUESTS_SPLIT, preset.calibration_prompts, args.out / "calibration",
                                            first=most_prompts)
    print(f"[serving] {models.label}; {most_prompts} held-out requests (unseen images, unseen wording) in {requests}",
          file=terminal)
    k = args.num_speculative_tokens
    sampling = Sampling(args.temperature, args.draft_sample_method)
    drafts = {"blind EAGLE": models.eagle, "ViSpec": models.vispec}
    specs: dict[str, dict | None] = {ARMS[0]: None}
    for arm, draft in drafts.items():
        if args.fixed_k:
            specs[arm] = sampling.fixed_k_config(draft, k)
        else:
            out = args.out / f"calibration-{arm.replace(' ', '_')}.json"
            specs[arm] = calibrate(models.target, draft, calibration_prompts, batch_sizes=preset.concurrencies,
                                   steps=preset.calibration_steps, max_tokens=preset.max_tokens, k=k,
                                   sampling=sampling, out=out,
                                   profile=arm == "ViSpec", terminal=terminal)["speculative_config"]
    points: list[Point] = []
    texts: dict[tuple[int, int, str], list[str]] = {}  # (repeat, concurrency, arm) -> answers
    runs = args.out / "runs"
    total = preset.repeats * len(preset.concurrencies) * len(ARMS)
    with open(args.out / "bench_serve.log", "w") as log, \
            tqdm(total=total, desc="[serving] points", file=terminal, dynamic_ncols=True) as bar:

        def measure(arm: str, server, repeat: int, concurrency: int) -> None:
            bar.set_postfix_str(f"repeat {repeat + 1}, concurrency {concurrency}, {arm}")
            result = run_bench_serve(bench_serve_args(
                server.base_url, models.target, requests, concurrency, max(preset.min_prompts, 2 * concurrency),
                preset.max_tokens, runs, f"r{repeat}-c{concurrency}-{arm.replace(' ', '_')}.json",
                args.temperature), log)
            points.append(point_from(arm, concurrency, repeat, result))
            texts[repeat, concurrency, arm] = result["generated_texts"]
            bar.update()

        def warm_up(arm: str, server) -> None:  # first-use costs of every kernel and image size
            run_bench_serve(bench_serve_args(server.base_url, models.target, requests, 2, 2, 8, runs,
                                             f"warmup-{arm.replace(' ', '_')}.json"), log)

        def serving(arms: tuple[str, ...]):
            return running_servers(models.target, {arm: specs[arm] for arm in arms}, max(preset.concurrencies),
                                   preset.kv_cache_gib, args.out, terminal)

        if preset.one_server_at_a_time:  # arms rotate from repeat to repeat; each serves every concurrency
            for repeat in range(preset.repeats):
                for arm in ARMS[repeat % 3:] + ARMS[:repeat % 3]:
                    with serving((arm,)) as servers:
                        warm_up(arm, servers[arm])
                        for concurrency in preset.concurrencies:
                            measure(arm, servers[arm], repeat, concurrency)
        else:  # arms rotate from point to point
            with serving(ARMS) as servers:
                for arm, server in servers.items():
                    warm_up(arm, server)
                for repeat in range(preset.repeats):
                    for c_index, concurrency in enumerate(preset.concurrencies):
                        shift = repeat + c_index
                        for arm in ARMS[shift % 3:] + ARMS[:shift % 3]:
                            measure(arm, servers[arm], repeat, concurrency)
    if sampling.greedy:  # sampled answers differ by design
        for point in points:
            if point.arm != ARMS[0]:
                point.identical_to_target = sum(a == b for a, b in zip(
                    texts[point.repeat, point.concurrency, point.arm], texts[point.repeat, point.concurrency, ARMS[0]],
                    strict=True))

    rows = summarise(points)
    date = datetime.date.today().isoformat()
    title = (f"{models.label}; vllm serve (CPU, float32, {os.cpu_count()} cores) + vllm bench serve, "
             f"{preset.repeats} repeats, K<={k} {'fixed' if args.fixed_k else 'calibrated'}, {sampling.label()}, "
             f"{date}")
    print(f"\n{title}\n{format_table(rows)}", file=terminal)
    (args.out / "serving.json").write_text(json.dumps({
        "title": title, "models": {key: str(value) for key, value in asdict(models).items()},
        "preset": asdict(preset), "sampling": asdict(sampling), "speculative_configs": specs, "rows": rows,
        "points": [asdict(p) for p in points], "seconds": round(time.monotonic() - started)}, indent=1))
    plot(rows, title, args.out / "serving.png")
    print(f"wrote {args.out / 'serving.json'}, {args.out / 'serving.png'} "
          f"({(time.monotonic() - started) / 60:.1f} min)", file=terminal)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
