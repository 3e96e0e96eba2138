"""Acceptance of the vision-blind EAGLE draft vs the ViSpec draft on a world's held-out splits, in vLLM.

    python benchmarks/acceptance.py --preset small

Both drafts were trained on the same data for the same number of steps (world presets). For each held-out split
(unseen images with training question wording; unseen images with unseen wording), each temperature (0 and 1)
and each repeat, the two drafts run the same requests batched, one engine at a time. Reported:
- AL: vLLM's mean acceptance length, tokens per target step including the bonus token (1 + accepted/rounds);
- tau: the paper's convention, accepted draft tokens per round (AL - 1);
- per-position acceptance: share of rounds whose draft token k was accepted;
with the median and [min-max] over repeats at T > 0 (a new seed per repeat); T=0 runs once (greedy float32
repeats give the same tokens). Writes benchmarks/results/acceptance.json and acceptance.png.
"""

from __future__ import annotations

import argparse
import json
import statistics
from dataclasses import asdict, dataclass
from pathlib import Path

from vispec_vllm.speculative_config import DRAFT_SAMPLE_METHODS

ROOT = Path(__file__).resolve().parent.parent
SPLITS = ("heldout_images", "heldout_questions")
ARMS = ("blind EAGLE", "ViSpec")


@dataclass
class Point:
    arm: str
    split: str
    temperature: float
    repeat: int
    mean_acceptance_length: float
    tau: float
    per_position: list[float]
    drafts: int
    tokens: int


def measure(llm, conversations, temperature: float, max_tokens: int, seed: int) -> tuple:
    from vllm import SamplingParams

    from vispec_vllm.engine.metrics import SpecDecodeCounters

    before = SpecDecodeCounters.from_metrics(llm.get_metrics())
    params = [SamplingParams(temperature=temperature, max_tokens=max_tokens, seed=None if temperature == 0 else
                             seed * 100_003 + i) for i in range(len(conversations))]
    outputs = llm.chat(conversations, params, use_tqdm=False)
    counters = SpecDecodeCounters.from_metrics(llm.get_metrics()) - before
    return counters, sum(len(o.outputs[0].token_ids) for o in outputs)


def summarise(points: list[Point]) -> list[dict]:
    rows = []
    keys = sorted({(p.split, p.temperature, p.arm) for p in points}, key=lambda k: (k[0], k[1], ARMS.index(k[2])))
    for split, temperature, arm in keys:
        group = [p for p in points if (p.split, p.temperature, p.arm) == (split, temperature, arm)]
        als = [p.mean_acceptance_length for p in group]
        width = max(len(p.per_position) for p in group)
        rows.append({"split": split, "temperature": temperature, "arm": arm, "repeats": len(group),
                     "al_median": statistics.median(als), "al_min": min(als), "al_max": max(als),
                     "tau_median": statistics.median(als) - 1.0,
                     "per_position": [statistics.median(p.per_position[k] for p in group) for k in range(width)]})
    return rows


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    settings = sorted({(r["split"], r["temperature"]) for r in rows})
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4))
    width = 0.38
    for a, arm in enumerate(a for a in ARMS if any(r["arm"] == a for r in rows)):
        arm_rows = [next(r for r in rows if (r["split"], r["temperature"], r["arm"]) == (*s, arm)) for s in settings]
        xs = [i + (a - 0.5) * width for i in range(len(settings))]
        medians = [r["al_median"] for r in arm_rows]
        errors = [[m - r["al_min"] for m, r in zip(medians, arm_rows, strict=True)],
                  [r["al_max"] - m for m, r in zip(medians, arm_rows, strict=True)]]
        left.bar(xs, medians, width, yerr=errors, label=arm, capsize=3)
        for x, m in zip(xs, medians, strict=True):
            left.text(x, m, f"{m:.2f}", ha="center", va="bottom", fontsize=8)
        for s, r in zip(settings, arm_rows, strict=True):
            style = "-" if s[1] == 0 else "--"
            right.plot(range(1, len(r["per_position"]) + 1), r["per_position"], style, marker="o",
                       color=f"C{a}", label=f"{arm}, {s[0]}, T={s[1]:g}")
    left.set_xticks(range(len(settings)), [f"{s}\nT={t:g}" for s, t in settings], fontsize=8)
    left.set_ylabel("mean acceptance length (incl. bonus)")
    left.set_title("AL, median [min-max] over repeats")
    left.legend()
    right.set_xticks(range(1, max(len(r["per_position"]) for r in rows) + 1))
    right.set_xlabel("draft position")
    right.set_ylabel("acceptance rate")
    right.set_title("per-position acceptance (median)")
    right.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="small")
    parser.add_argument("--root", type=Path, default=None)
    parser.add_argument("--samples", type=int, default=48, help="requests per held-out split")
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--num-speculative-tokens", type=int, default=3)
    parser.add_argument("--temperatures", type=float, nargs="+", default=[0.0, 1.0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    parser.add_argument("--target", type=Path, help="a target VLM directory instead of the world's")
    parser.add_argument("--vispec", type=Path, help="with --target: the ViSpec draft")
    parser.add_argument("--eagle", type=Path, help="with --target: the vision-blind (stage-1) EAGLE draft")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--draft-sample-method", choices=DRAFT_SAMPLE_METHODS, default="greedy",
                        help="vLLM's draft_sample_method (matters at T > 0 only)")
    parser.add_argument("--verbose", action="store_true")
    args = parser.parse_args(argv)
    from vispec_vllm.console import quiet_vllm

    quiet_vllm(args.verbose)

    from vispec_vllm.console import engine_output_to
    from vispec_vllm.world.build import DEFAULT_ROOT, build_world
    from vispec_vllm.world.presets import PRESETS

    if args.target is not None:
        models = Models(args.target, args.eagle, args.vispec, f"target {args.target}")
    else:
        world = build_world(PRESETS[args.preset], args.root or DEFAULT_ROOT, progress=True)
        models = Models(world.target, world.eagle_draft, world.vispec_draft, f"{world.preset.name} world")
    args.out.mkdir(parents=True, exist_ok=True)
    log_path = None if args.verbose else args.out / "acceptance.log"
    with engine_output_to(log_path) as out:
        return _benchmark(args, models, out)


@dataclass(frozen=True)
class Models:
    target: Path
    eagle: Path | None
    vispec: Path | None
    label: str


def _benchmark(args: argparse.Namespace, models: Models, out) -> int:
    from vispec_vllm.world.engines import shutdown, start_engine
    from vispec_vllm.world.prompts import chat_messages
    from vispec_vllm.world.scenes import make_scene, render
    from vispec_vllm.world.splits import split_samples

    requests = {split: [chat_messages(render(make_scene(s.scene_seed)), s.question)
                        for s in split_samples(split, args.samples)] for split in SPLITS}
    drafts = {arm: draft for arm, draft in (("blind EAGLE", models.eagle), ("ViSpec", models.vispec)) if draft}
    points: list[Point] = []
    # One engine at a time: vLLM keeps its metrics in one process-wide registry, so a second engine in the same
    # process takes the counters over and the first one's acceptance would read as zero. Acceptance does not
    # depend on timing, so the arms need not alternate here.
    for arm in drafts:
        llm = start_engine(models.target, drafts[arm], num_speculative_tokens=args.num_speculative_tokens,
                           max_num_seqs=args.samples, dtype=args.dtype,
                           draft_sample_method=args.draft_sample_method)
        try:
            for repeat in range(args.repeats):
                for temperature in args.temperatures:
                    if temperature == 0 and repeat > 0:
                        continue  # greedy float32: a repeat gives the same tokens and the same acceptance
                    for split in SPLITS:
                        counters, tokens = measure(llm, requests[split], temperature, args.max_tokens, seed=repeat)
                        point = Point(arm, split, temperature, repeat, counters.mean_acceptance_length,
                                      counters.mean_acceptance_length - 1.0, counters.per_position_rate,
                                      counters.drafts, tokens)
                        points.append(point)
                        print(f"[bench] {arm:<12} repeat {repeat + 1} T={temperature:g} {split:<18} "
                              f"AL {point.mean_acceptance_length:.2f} ({counters.drafts} rounds)", file=out)
        finally:
            shutdown(llm)

    rows = summarise(points)
    print(f"\n{models.label}, {args.samples} requests per split x <= {args.max_tokens} tokens, "
          f"K={args.num_speculative_tokens}, {args.dtype}, {args.repeats} repeats (median [min-max])", file=out)
    print(f"{'split':<18}{'T':>4}  {'arm':<12}{'AL':>18}{'tau':>7}  per-position acceptance   ViSpec/EAGLE AL",
          file=out)
    for row in rows:
        ratio = ""
        if row["arm"] == "ViSpec":
            blind = next((r for r in rows if (r["split"], r["temperature"], r["arm"]) ==
                          (row["split"], row["temperature"], "blind EAGLE")), None)
            ratio = "" if blind is None else f"{row['al_median'] / blind['al_median']:.2f}x"
        al = f"{row['al_median']:.2f} [{row['al_min']:.2f}-{row['al_max']:.2f}]"
        print(f"{row['split']:<18}{row['temperature']:>4g}  {row['arm']:<12}{al:>18}{row['tau_median']:>7.2f}  "
              f"{str([round(p, 2) for p in row['per_position']]):<26}{ratio}", file=out)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "acceptance.json").write_text(json.dumps({"rows": rows, "points": [asdict(p) for p in points],
                                                          "models": models.label}, indent=1))
    plot(rows, args.out / "acceptance.png")
    print(f"wrote {args.out / 'acceptance.json'} and {args.out / 'acceptance.png'}", file=out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
