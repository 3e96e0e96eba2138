"""`python -m vispec_vllm.factory` / `vispec-factory`: build tiny random targets into directories."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from vispec_vllm.factory.targets import FAMILIES, MARKER_NAME, build_tiny_target, read_marker


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="vispec-factory",
        description="Build tiny, deterministic, randomly initialised VLM targets (offline, in seconds) that "
        "both transformers and vLLM load. A directory already holding the same build is left as it is.",
    )
    which = parser.add_mutually_exclusive_group(required=True)
    which.add_argument("--family", choices=FAMILIES, help="the target family to build into --out")
    which.add_argument("--all", action="store_true", help="build every family into --out/<family>")
    parser.add_argument("--out", required=True, type=Path, help="output directory (with --all: a root directory)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the tokenizer corpus and weights (default 0)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    jobs = [(family, args.out / family) for family in FAMILIES] if args.all else [(args.family, args.out)]
    for family, out_dir in jobs:
        built = build_tiny_target(family, out_dir, seed=args.seed)
        files = read_marker(built)["files"]
        print(f"{family} (seed {args.seed}): {built}")
        for name in sorted([*files, MARKER_NAME]):
            print(f"  {name}  {(built / name).stat().st_size} bytes")
    return 0


if __name__ == "__main__":
    sys.exit(main())
