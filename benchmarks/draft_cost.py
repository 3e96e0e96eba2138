"""Draft step cost c: a reduced-vocabulary draft against the same draft with the full target vocabulary.

    .venv/bin/python benchmarks/draft_cost.py                            # the small world's ViSpec draft (~15 min)
    .venv/bin/python benchmarks/draft_cost.py --preset full              # the benchmark world's
    .venv/bin/python benchmarks/draft_cost.py --target T --draft D       # any reduced-vocabulary draft

The full-vocabulary variant is the same draft without its `d2t` map: its head is then the target's whole lm_head,
as in the official format. Each variant runs `python -m vispec_vllm.calibrate` (batch sizes 1 and 16, K = 0..3,
with --profile), the two alternating, --repeats times. From each calibration:
  c = what one draft token adds to a decode step (draft forward, lm_head and sampling) / the target's decode step
      at one token a row, both measured on the same engine;
  draft head = the profile's "draft lm_head + sampling" (3 per step at K=3), ms.
Prints median [min-max] over repeats; writes draft_cost.json under --out.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

from serving import ROOT, Sampling, calibrate, write_requests

from vispec_vllm.world.presets import PRESETS

VARIANTS = ("reduced vocabulary", "full vocabulary")


def full_vocabulary_copy(draft: Path, out: Path) -> Path:
    """`draft` without `d2t` / `draft_vocab_size`: the same weights, drafting over the whole target vocabulary."""
    import shutil

    from safetensors.torch import load_file, save_file

    config = json.loads((draft / "config.json").read_text())
    if config.pop("draft_vocab_size", None) is None:
        raise SystemExit(f"{draft} has no reduced draft vocabulary (no draft_vocab_size in its config.json)")
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    state = load_file(str(draft / "model.safetensors"))
    state.pop("d2t")
    save_file(state, str(out / "model.safetensors"))
    (out / "config.json").write_text(json.dumps(config, indent=1))
    return out


def _spread(values: list[float], fmt: str) -> str:
    return f"{statistics.median(values):{fmt}} [{min(values):{fmt}}-{max(values):{fmt}}]"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="small",
                        help="the world whose target and ViSpec draft are measured")
    parser.add_argument("--target", type=Path, help="a target VLM directory instead of the world's")
    parser.add_argument("--draft", type=Path, help="with --target: a draft with a reduced vocabulary")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--steps", type=int, default=16, help="timed decode steps per batch size and K")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "draft_cost")
    args = parser.parse_args(argv)
    if (args.target is None) != (args.draft is None):
        parser.error("--target and --draft go together")
    from vispec_vllm.console import quiet_vllm

    quiet_vllm(verbose=False)
    if args.target is None:
        from vispec_vllm.world.build import DEFAULT_ROOT, build_world

        world = build_world(PRESETS[args.preset], DEFAULT_ROOT, progress=True)
        args.target, args.draft = world.target, world.vispec_draft
    args.out.mkdir(parents=True, exist_ok=True)
    drafts = {VARIANTS[0]: args.draft.resolve(),
              VARIANTS[1]: full_vocabulary_copy(args.draft, args.out / "full_vocabulary_draft")}
    _, prompts = write_requests("heldout_images", 8, args.out / "prompts")
    batch_sizes = tuple(sorted(args.batch_sizes))
    runs: dict[str, list[dict]] = {variant: [] for variant in VARIANTS}
    for repeat in range(args.repeats):
        for variant in VARIANTS if repeat % 2 == 0 else tuple(reversed(VARIANTS)):
            print(f"\n[draft cost] repeat {repeat + 1}/{args.repeats}: {variant}", flush=True)
            out = args.out / f"calibration-{variant.split()[0]}-{repeat}.json"
            runs[variant].append(calibrate(args.target, drafts[variant], prompts, batch_sizes=batch_sizes,
                                           steps=args.steps, max_tokens=64, k=3, sampling=Sampling(0.0, "greedy"),
                                           out=out, profile=True, terminal=sys.stdout))
    rows = []
    for variant in VARIANTS:
        for index, batch_size in enumerate(batch_sizes):
            batches = [run["batches"][index] for run in runs[variant]]
            rows.append({"variant": variant, "batch_size": batch_size,
                         "c": [b["draft_cost_ratio"] for b in batches],
                         "draft_ms_per_token": [b["draft_ms_per_token"] for b in batches],
                         "target_ms_query_1": [b["target_ms_query_1"] for b in batches],
                         "draft_head_ms": [b["profile"]["parts_ms"]["draft lm_head + sampling"] for b in batches]})
    print(f"\ndraft step cost, {args.draft} (K=3, {args.repeats} alternated repeats, median [min-max])")
    print(f"{'variant':<20}{'batch':>6}{'c':>22}{'ms per draft token':>24}{'target step ms':>24}"
          f"{'draft heads ms/step':>24}")
    for row in rows:
        print(f"{row['variant']:<20}{row['batch_size']:>6}{_spread(row['c'], '.3f'):>22}"
              f"{_spread(row['draft_ms_per_token'], '.2f'):>24}{_spread(row['target_ms_query_1'], '.1f'):>24}"
              f"{_spread(row['draft_head_ms'], '.2f'):>24}")
    (args.out / "draft_cost.json").write_text(json.dumps({"target": str(args.target), "draft": str(args.draft),
                                                          "rows": rows}, indent=1))
    print(f"wrote {args.out / 'draft_cost.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
