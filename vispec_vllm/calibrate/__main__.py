"""`python -m vispec_vllm.calibrate --target T --draft D`: a load-adaptive speculation schedule for this machine.

Measures, on one in-process vLLM engine running the target with the draft: the acceptance of each draft
position on the prompts (K = --num-speculative-tokens), and the decode-step time at every batch size of
--batch-sizes for every K from 0 to --num-speculative-tokens. Predicts tokens per second for each (batch size,
K), picks the best K per batch size and writes vLLM's `num_speculative_tokens_per_batch_size` schedule to
--out (JSON; its "speculative_config" field is what --speculative-config takes), with the measurements. Prints
the tables and the --speculative-config string. --profile adds where the time of a decode step goes.

    vllm serve T --speculative-config "$(jq -c .speculative_config schedule.json)"
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from vispec_vllm.console import engine_output_to, quiet_vllm
from vispec_vllm.speculative_config import DRAFT_SAMPLE_METHODS


def _batch_sizes(text: str) -> tuple[int, ...]:
    try:
        sizes = sorted({int(part) for part in text.split(",")})
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if sizes[0] < 1:
        raise argparse.ArgumentTypeError(f"batch sizes must be >= 1, got {text!r}")
    return tuple(sizes)


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text}")
    return value


def _json_object(text: str) -> dict:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as error:
        raise argparse.ArgumentTypeError(f"not JSON: {error}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError("expected a JSON object of vllm.LLM keyword arguments")
    return value


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m vispec_vllm.calibrate", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--target", required=True, type=Path, help="target VLM (local directory)")
    parser.add_argument("--draft", required=True, type=Path, help="ViSpec draft directory")
    parser.add_argument("--num-speculative-tokens", type=_positive, default=3, help="largest K (default 3)")
    parser.add_argument("--batch-sizes", type=_batch_sizes, default=(1, 2, 4, 8, 16, 32),
                        help="batch sizes to measure, comma-separated (default 1,2,4,8,16,32)")
    parser.add_argument("--max-num-seqs", type=_positive, default=None,
                        help="the schedule covers batch sizes 1..this (default: the largest measured)")
    parser.add_argument("--out", type=Path, default=Path("schedule.json"), help="JSON output (default schedule.json)")
    parser.add_argument("--prompts", type=Path, default=None,
                        help="JSON list of prompts: \"question\", {\"text\": ..., \"image\": path} or "
                             "{\"messages\": [...]} (default: 4 synthetic-image and 4 text questions)")
    parser.add_argument("--max-tokens", type=_positive, default=128, help="answer length for acceptance (128)")
    parser.add_argument("--temperature", type=float, default=0.0, help="sampling temperature to calibrate for (0)")
    parser.add_argument("--draft-sample-method", choices=DRAFT_SAMPLE_METHODS, default="greedy",
                        help="vLLM's draft_sample_method, written into the schedule's speculative config; at T > 0 "
                             "'probabilistic' (drafts sampled from the draft's distribution) usually accepts more")
    parser.add_argument("--steps", type=_positive, default=32, help="timed decode steps per batch size and K (32)")
    parser.add_argument("--profile", action="store_true", help="also time the parts of a decode step at the largest K")
    engine = parser.add_argument_group("vLLM engine")
    engine.add_argument("--dtype", default="auto", help="model dtype (default auto: the config's)")
    engine.add_argument("--max-model-len", type=_positive, default=None, help="context length (default: the model's)")
    engine.add_argument("--enforce-eager", action="store_true", help="no torch.compile or CUDA graphs")
    engine.add_argument("--engine-args", type=_json_object, default={},
                        help='more vllm.LLM keyword arguments as JSON, e.g. \'{"gpu_memory_utilization": 0.8}\'')
    parser.add_argument("--verbose", action="store_true", help="vLLM's logs on the terminal")
    args = parser.parse_args(argv)
    for name in ("target", "draft"):
        if not getattr(args, name).is_dir():
            parser.error(f"--{name} {getattr(args, name)}: not a directory")
    if args.max_num_seqs is not None and args.max_num_seqs < max(args.batch_sizes):
        parser.error(f"--max-num-seqs {args.max_num_seqs} is below the largest batch size {max(args.batch_sizes)}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    quiet_vllm(args.verbose)
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # the calibration reaches into the engine's scheduler
    from vispec_vllm.calibrate.measure import CalibrationError, EngineSettings
    from vispec_vllm.calibrate.prompts import default_conversations, images_in, load_conversations
    from vispec_vllm.calibrate.report import format_profile, format_report, to_json
    from vispec_vllm.calibrate.run import RunOptions, calibrate

    try:
        conversations = default_conversations() if args.prompts is None else load_conversations(args.prompts)
    except ValueError as error:
        raise SystemExit(f"error: {error}") from None
    # absolute paths: the printed --speculative-config works from any directory
    settings = EngineSettings(args.target.resolve(), args.draft.resolve(), args.num_speculative_tokens,
                              max(args.batch_sizes), max(images_in(c) for c in conversations), args.dtype,
                              args.max_model_len, args.enforce_eager, args.engine_args, args.draft_sample_method)
    options = RunOptions(args.batch_sizes, args.max_num_seqs or max(args.batch_sizes), args.steps, args.max_tokens,
                         args.temperature, args.profile)
    log_path = None if args.verbose else args.out.with_suffix(".log")
    with engine_output_to(log_path) as out:
        if log_path is not None:
            print(f"[calibrate] vLLM's output goes to {log_path}", file=out)
        try:
            calibration = calibrate(settings, options, conversations, out)
        except CalibrationError as error:
            print(f"error: {error}", file=out)
            return 1
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(to_json(calibration), indent=1) + "\n")
        print("\n" + format_report(calibration), file=out)
        if options.profile:
            print("\n" + format_profile(calibration), file=out)
        print(f"\nwrote {args.out}", file=out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
