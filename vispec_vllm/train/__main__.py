"""`python -m vispec_vllm.train --stage 1|2 ...`: train a ViSpec draft on data from `python -m vispec_vllm.data`.

Stage 1 trains a text EAGLE draft (SmoothL1 + 0.1 * (soft CE + 0.1 * ListMLE@10)) from a draft config;
stage 2 starts from the stage-1 draft, adds the image adaptor (--num-q) and trains with multi-token
prediction (--mtp-steps) on 10 * L1(softmax) + 0.1 * ListMLE@10. Multi-GPU: torchrun --nproc-per-node N -m ...
Reruns with the same --out resume from the latest checkpoint. The result is exported to OUT/draft.
Optional (ours): --draft-vocab-size / --draft-vocab-coverage in stage 1 give the draft a reduced output
vocabulary chosen from the training answers (report: OUT/draft_vocab.json); the export then holds `d2t`.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from vispec_vllm.train.config import TrainConfig


def build_parser() -> argparse.ArgumentParser:
    d = TrainConfig(stage=1, target=Path("."), data=[], out=Path("."))
    p = argparse.ArgumentParser(prog="python -m vispec_vllm.train", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--stage", type=int, choices=[1, 2], required=True)
    p.add_argument("--target", type=Path, required=True, help="target VLM directory (embedding and lm_head)")
    p.add_argument("--data", type=Path, nargs="+", required=True, help="data directories (shard_*.safetensors)")
    p.add_argument("--out", type=Path, required=True, help="run directory")
    p.add_argument("--init", type=Path, default=None,
                   help="stage 1: a draft config JSON (configs/drafts/*.json) or draft dir, weights optional "
                        "(default: a fresh draft with the official layout for --target); "
                        "stage 2: the stage-1 draft (<stage-1 out>/draft)")
    p.add_argument("--num-q", type=int, default=d.num_q, help="stage 2: image adaptor queries")
    p.add_argument("--mtp-steps", type=int, default=None, help="extra self-fed passes (default 0 / 1 by stage)")
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument("--weight-decay", type=float, default=d.weight_decay)
    p.add_argument("--beta1", type=float, default=d.betas[0])
    p.add_argument("--beta2", type=float, default=d.betas[1])
    p.add_argument("--epochs", type=int, default=d.epochs)
    p.add_argument("--warmup-epochs", type=float, default=d.warmup_epochs)
    p.add_argument("--warmup-steps", type=int, default=None, help="overrides --warmup-epochs")
    p.add_argument("--max-steps", type=int, default=None, help="overrides --epochs")
    p.add_argument("--batch-size", type=int, default=d.batch_size, help="samples per process and step")
    p.add_argument("--max-len", type=int, default=d.max_len)
    p.add_argument("--grad-clip-value", type=float, default=d.grad_clip_value, help="0 = off")
    p.add_argument("--noise-std", type=float, default=d.noise_std, help="0 = no input noise")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--save-every", type=int, default=None, help="steps between checkpoints (default: an epoch)")
    p.add_argument("--keep-checkpoints", type=int, default=d.keep_checkpoints)
    p.add_argument("--precision", choices=["auto", "bf16", "fp32"], default=d.precision)
    p.add_argument("--device", default=None)
    p.add_argument("--num-workers", type=int, default=d.num_workers, help="DataLoader workers")
    p.add_argument("--export-dtype", choices=["float32", "bfloat16", "float16"], default=d.export_dtype)
    vocab = p.add_mutually_exclusive_group()
    vocab.add_argument("--draft-vocab-size", type=int, default=None, metavar="N",
                       help="stage 1: a reduced draft vocabulary, the N target ids most frequent among the training "
                            "answer tokens (rounded up to a multiple of 64); stage 2 inherits it (default: the "
                            "target's full vocabulary, the official format)")
    vocab.add_argument("--draft-vocab-coverage", type=float, default=None, metavar="SHARE",
                       help="stage 1: the smallest such draft vocabulary covering SHARE (e.g. 0.995) of the training "
                            "answer tokens")
    p.add_argument("--no-resume", action="store_true", help="ignore existing checkpoints in --out")
    p.add_argument("--no-progress", action="store_true")
    return p


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    return TrainConfig(
        stage=args.stage, target=args.target, data=list(args.data), out=args.out, init=args.init,
        num_q=args.num_q, mtp_steps=args.mtp_steps, lr=args.lr, betas=(args.beta1, args.beta2),
        weight_decay=args.weight_decay, epochs=args.epochs, warmup_epochs=args.warmup_epochs,
        warmup_steps=args.warmup_steps, max_steps=args.max_steps, batch_size=args.batch_size,
        max_len=args.max_len, grad_clip_value=args.grad_clip_value, noise_std=args.noise_std, seed=args.seed,
        save_every=args.save_every, keep_checkpoints=args.keep_checkpoints, precision=args.precision,
        device=args.device, num_workers=args.num_workers, export_dtype=args.export_dtype,
        progress=not args.no_progress, resume=not args.no_resume, draft_vocab_size=args.draft_vocab_size,
        draft_vocab_coverage=args.draft_vocab_coverage,
    )


def main(argv: list[str] | None = None) -> int:
    from vispec_vllm.train.trainer import train

    print(train(config_from_args(build_parser().parse_args(argv))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
