"""Soak: fault rounds on an in-process engine with the trained tiny ViSpec draft, for as long as asked.

The long version of tests/test_faults.py (same rounds, from tests/workload.py): each round sends 12 chats with 0-3
images of mixed sizes at once, aborts some at seeded steps (what vLLM does when a client disconnects), in a KV
cache of 20 blocks (requests are preempted and recomputed). The rounds cycle over `--prompt-sets` sets of chats
whose answers from the target alone are computed first. Per round: requests, aborts, preemptions, mismatches
(finished requests not token-identical to the target alone), accepted draft tokens, process RSS, and the
per-request states left in the plugin and in vLLM's runner.

    .venv/bin/python benchmarks/soak.py --minutes 30
    .venv/bin/python benchmarks/soak.py --minutes 5 --prompt-sets 4 --out /tmp/soak.json

Uses the tiny target and trained draft the test suite caches (`pytest tests/test_faults.py` builds them). Exits
non-zero on a mismatch, on state left after a round, or when RSS grows by more than `--rss-limit-mib` from the
end of the first cycle over the prompt sets to the end.

oneDNN's primitive cache is off unless ONEDNN_PRIMITIVE_CACHE_CAPACITY is set: it keeps up to 1024 compiled GEMMs,
one per new shape, and fills over hundreds of rounds (here: ~290 MiB over 240 rounds, still filling, the target
alone as well), which would hide a leak; without it the process's malloc'd memory stays flat round after round.
Set ONEDNN_PRIMITIVE_CACHE_CAPACITY=1024 to soak as vLLM runs by default.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
from dataclasses import asdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
os.environ.setdefault("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "0")  # read once, at oneDNN's first primitive

import conftest  # noqa: E402  (the test suite's offline environment and engine helper)
from workload import (  # noqa: E402
    RoundReport,
    fault_engine_kwargs,
    fault_workload,
    reference_outputs,
    run_fault_round,
)


def default_models() -> tuple[Path, Path]:
    from vispec_vllm.factory import FACTORY_VERSION

    target = conftest.MODEL_CACHE / "qwen2_5_vl-s0"
    draft = conftest.MODEL_CACHE / f"qwen2_5_vl-s0-trained-draft-v{FACTORY_VERSION}" / "stage2" / "draft"
    return target, draft


def parse_args() -> argparse.Namespace:
    target, draft = default_models()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=30.0, help="rounds start until this much time has passed")
    parser.add_argument("--prompt-sets", type=int, default=8, help="sets of chats the rounds cycle over")
    parser.add_argument("--rss-limit-mib", type=float, default=64.0)
    parser.add_argument("--target", type=Path, default=target)
    parser.add_argument("--draft", type=Path, default=draft)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "soak.json")
    return parser.parse_args()


def run(args: argparse.Namespace) -> list[RoundReport]:
    workloads = [fault_workload(seed) for seed in range(args.prompt_sets)]
    with conftest.vllm_engine(**fault_engine_kwargs(args.target, None)) as llm:
        expected = reference_outputs(llm, workloads)
    reports = []
    deadline = time.monotonic() + 60 * args.minutes
    with conftest.vllm_engine(**fault_engine_kwargs(args.target, args.draft)) as llm:
        while time.monotonic() < deadline:
            r = len(reports)
            report = run_fault_round(llm, workloads[r % args.prompt_sets], expected[r % args.prompt_sets],
                                     random.Random(r))
            reports.append(report)
            print(f"round {r + 1}: {report.line()}", flush=True)
    return reports


def summary(reports: list[RoundReport], prompt_sets: int) -> dict:
    warm = reports[min(prompt_sets, len(reports)) - 1]  # the end of the first cycle over the prompt sets
    return {
        "rounds": len(reports),
        "requests": sum(r.requests for r in reports),
        "aborted": sum(r.aborted for r in reports),
        "preemptions": sum(r.preemptions for r in reports),
        "mismatches": sum(r.mismatches for r in reports),
        "accepted_tokens": sum(r.accepted_tokens for r in reports),
        "rounds_with_state_left": sum(r.drafter_requests + r.runner_requests > 0 for r in reports),
        "rss_mib_first_round": reports[0].rss_mib,
        "rss_mib_after_first_cycle": warm.rss_mib,
        "rss_mib_last_round": reports[-1].rss_mib,
        "rss_growth_mib_after_first_cycle": reports[-1].rss_mib - warm.rss_mib,
        "adaptor_cache_last_round": reports[-1].adaptor_cache,
    }


def main() -> int:
    args = parse_args()
    for path in (args.target, args.draft):
        if not (path / "config.json").is_file():
            sys.exit(f"{path}: no model there; `pytest tests/test_faults.py` builds the tiny target and trained draft")
    reports = run(args)
    if not reports:
        sys.exit("no round finished in the time given")
    totals = summary(reports, args.prompt_sets)
    print(json.dumps(totals, indent=2))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"summary": totals, "rounds": [asdict(r) for r in reports]}, indent=2))
    failed = (totals["mismatches"] > 0 or totals["rounds_with_state_left"] > 0
              or totals["rss_growth_mib_after_first_cycle"] > args.rss_limit_mib)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
