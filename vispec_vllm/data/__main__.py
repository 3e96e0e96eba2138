"""`python -m vispec_vllm.data {generate,extract,build}`: ViSpec draft training data from a VLM target.

  generate  the target's greedy answers with vLLM (batched LLM.chat), one JSONL per shard under OUT/answers/
  extract   the teacher-forced target pass (transformers) over prompt + answer, one safetensors file per shard
  build     generate, then extract

Every stage resumes: finished shards are skipped, unfinished ones are redone (files are written to a
temporary name and renamed). Pass the same arguments to every stage of one output directory.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from vispec_vllm.data.conversation import DEFAULT_EXTRA_INSTRUCTION, DEFAULT_SYSTEM_PROMPT
from vispec_vllm.data.manifest import DatasetSpec


def _add_spec_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--target", required=True, type=Path, help="target VLM directory (HF format)")
    parser.add_argument("--data", required=True, type=Path,
                        help="LLaVA-Pretrain / LLaVA-Instruct / ShareGPT style JSON list of conversations")
    parser.add_argument("--image-folder", type=Path, default=None, help="root of the records' relative image paths")
    parser.add_argument("--out", required=True, type=Path, help="output directory (shards, manifest.json)")
    parser.add_argument("--start", type=int, default=0, help="first record (after --shuffle-seed), inclusive")
    parser.add_argument("--end", type=int, default=None, help="last record, exclusive (default: all)")
    parser.add_argument("--shuffle-seed", type=int, default=None,
                        help="shuffle the records with Python's random.Random(seed) before slicing")
    parser.add_argument("--shard-size", type=int, default=64, help="source records per shard")
    parser.add_argument("--answers", choices=["generate", "dataset"], default="generate",
                        help="generate: the target's own greedy answers to the first user turn (ViSpec stage 2); "
                             "dataset: teacher-force the conversation's own answers (official stage 1 on ShareGPT)")
    parser.add_argument("--system-prompt", default=DEFAULT_SYSTEM_PROMPT, help="system message ('' for none)")
    parser.add_argument("--extra-instruction", default=DEFAULT_EXTRA_INSTRUCTION,
                        help="text appended to the user turn when generating answers ('' for none)")
    parser.add_argument("--max-new-tokens", type=int, default=1024, help="answer length limit when generating")
    parser.add_argument("--max-len", type=int, default=4096, help="tokens kept per sample (prompt + answer)")
    parser.add_argument("--processor-kwargs", type=json.loads, default={},
                        help='JSON image-processor overrides for both engines, e.g. Qwen2.5-VL (official): '
                             '\'{"min_pixels": 200704, "max_pixels": 1003520}\'')
    parser.add_argument("--dtype", default="auto",
                        help="target dtype for both engines and for the stored tensors (auto = config.json)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def _add_engine_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("vLLM engine (generate)")
    group.add_argument("--tensor-parallel-size", type=int, default=None)
    group.add_argument("--gpu-memory-utilization", type=float, default=None)
    group.add_argument("--max-model-len", type=int, default=None,
                       help="engine context length (default: the model's; prompts longer than it are skipped)")
    group.add_argument("--max-num-seqs", type=int, default=None)
    group.add_argument("--enforce-eager", action="store_true", default=None)
    group.add_argument("--records-per-call", type=int, default=512,
                       help="records sent to one LLM.chat call (whole shards are grouped up to this size)")


def _add_extract_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("teacher-forced pass (extract)")
    group.add_argument("--device", default=None, help="torch device for the transformers target (default: cuda if any)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m vispec_vllm.data", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    for name, helptext, engine, extract in (
        ("generate", "generate the target's answers with vLLM", True, False),
        ("extract", "teacher-forced target pass into safetensors shards", False, True),
        ("build", "generate, then extract", True, True),
    ):
        sub = commands.add_parser(name, help=helptext, description=helptext)
        _add_spec_arguments(sub)
        if engine:
            _add_engine_arguments(sub)
        if extract:
            _add_extract_arguments(sub)
    return parser


def spec_from_args(args: argparse.Namespace) -> DatasetSpec:
    from vispec_vllm.data.pipeline import resolve_dtype

    return DatasetSpec(
        target=str(args.target.resolve()),
        source=str(args.data.resolve()),
        image_folder=str(args.image_folder.resolve()) if args.image_folder else None,
        start=args.start,
        end=args.end,
        shuffle_seed=args.shuffle_seed,
        shard_size=args.shard_size,
        answers=args.answers,
        system_prompt=args.system_prompt,
        extra_instruction=args.extra_instruction,
        max_new_tokens=args.max_new_tokens,
        max_len=args.max_len,
        dtype=resolve_dtype(args.target, args.dtype),
        processor_kwargs=args.processor_kwargs,
    )


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from vispec_vllm.data.pipeline import run_extract, run_generate

    spec = spec_from_args(args)
    progress = not args.no_progress
    if args.command in ("generate", "build") and spec.answers == "generate":
        engine_kwargs = {
            "tensor_parallel_size": args.tensor_parallel_size,
            "gpu_memory_utilization": args.gpu_memory_utilization,
            "max_model_len": args.max_model_len,
            "max_num_seqs": args.max_num_seqs,
            "enforce_eager": args.enforce_eager,
        }
        run_generate(spec, args.out, engine_kwargs=engine_kwargs, records_per_call=args.records_per_call,
                     progress=progress)
    if args.command in ("extract", "build"):
        manifest = run_extract(spec, args.out, device=args.device, progress=progress)
        summary = {k: manifest[k] for k in ("samples", "tokens", "skipped", "complete_shards", "num_shards")}
        print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
