"""`python -m vispec_vllm.world build --preset small|full|tiny`: build (or finish building) a world.
`python -m vispec_vllm.world export-prebuilt --preset small`: write a built world's trained parts to
configs/worlds/<preset> (committed, so the demo's first run only fetches the LM and assembles the target).

Steps, each cached under <root>/<preset>/: fetch and dequantise the LM, train the vision side, assemble the
target VLM, generate the target's answers (vLLM) and the teacher-forced data, train stage 1, stage 2 (ViSpec)
and the vision-blind EAGLE draft at equal budget, write manifest.json (sha256 of every artifact, timings).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m vispec_vllm.world", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    build = commands.add_parser("build", help="build a world (resumable)")
    build.add_argument("--preset", default="small", help="small (demo), full (benchmarks) or tiny (CI)")
    build.add_argument("--root", type=Path, default=None, help="where worlds are built (default artifacts/worlds)")
    build.add_argument("--lm", type=Path, default=None,
                       help="a local GGUF file or HF LM directory instead of the preset's LM")
    build.add_argument("--from-scratch", action="store_true",
                       help="remove this world's cached steps and train every part, even where configs/worlds/<preset> "
                            "has committed ones (the fetched LM is kept)")
    build.add_argument("--verbose", action="store_true", help="vLLM's INFO logs")
    build.add_argument("--no-progress", action="store_true")
    export = commands.add_parser("export-prebuilt", help="copy a built world's trained parts to configs/worlds")
    export.add_argument("--preset", default="small")
    export.add_argument("--root", type=Path, default=None)
    args = parser.parse_args(argv)
    if args.command == "export-prebuilt":
        return _export(args)
    from vispec_vllm.console import quiet_vllm

    quiet_vllm(args.verbose)
    from vispec_vllm.world.build import DEFAULT_ROOT, build_world
    from vispec_vllm.world.presets import PRESETS

    if args.preset not in PRESETS:
        parser.error(f"unknown preset {args.preset!r}; choose from {sorted(PRESETS)}")
    world = build_world(PRESETS[args.preset], args.root or DEFAULT_ROOT, lm_path=args.lm,
                        progress=not args.no_progress, from_scratch=args.from_scratch)
    manifest = json.loads(world.paths.manifest.read_text())
    print(json.dumps({k: manifest[k] for k in ("step_seconds", "vision", "grounding")}, indent=1))
    print(f"world: {world.paths.root}")
    return 0


def _export(args: argparse.Namespace) -> int:
    from vispec_vllm.world.build import DEFAULT_ROOT, PREBUILT_ROOT, World, WorldPaths
    from vispec_vllm.world.prebuilt import export_prebuilt
    from vispec_vllm.world.presets import PRESETS

    paths = WorldPaths((args.root or DEFAULT_ROOT) / args.preset)
    manifest = json.loads(paths.manifest.read_text())
    world = World(PRESETS[args.preset], paths, manifest["language_model"])
    out = export_prebuilt(world, PREBUILT_ROOT)
    print(f"wrote {out} ({json.loads((out / 'prebuilt.json').read_text())['bytes'] / 1e6:.1f} MB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
