"""Export a trained draft in the official ViSpec format (config.json + model.safetensors, no lm_head).

    python -m vispec_vllm.train.export CHECKPOINT_DIR OUT_DIR [--dtype bfloat16]

CHECKPOINT_DIR is any saved draft: <run>/checkpoints/step_N, <run>/draft, or an official checkpoint. A draft
with a reduced draft vocabulary keeps it (`d2t` stays int64 whatever --dtype; `draft_vocab_size` in config.json).
"""

from __future__ import annotations

import argparse
import copy
import os
import shutil
import sys
from pathlib import Path

import torch
from torch import nn


def export_draft(draft: nn.Module, out_dir: Path, *, dtype: torch.dtype = torch.float32) -> Path:
    """Write `draft` (cast to `dtype`, the live module untouched) to `out_dir`, atomically."""
    out_dir = Path(out_dir)
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    cast = draft if dtype == next(draft.parameters()).dtype else copy.deepcopy(draft).to(dtype)
    cast.save_pretrained(tmp)
    shutil.rmtree(out_dir, ignore_errors=True)
    os.replace(tmp, out_dir)
    return out_dir


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m vispec_vllm.train.export", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", type=Path, help="a saved draft directory")
    parser.add_argument("out", type=Path, help="export directory (replaced)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    args = parser.parse_args(argv)
    from vispec_vllm.draft import ViSpecDraft

    draft = ViSpecDraft.from_pretrained(args.checkpoint, dtype=torch.float32, seed=0)
    export_draft(draft, args.out, dtype=getattr(torch, args.dtype))
    print(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
