"""Training checkpoints: a loadable draft (official format) plus optimizer/scheduler state and the step.

    <out>/checkpoints/step_00000100/config.json, model.safetensors   <- ViSpecDraft.save_pretrained
                                    trainer_state.pt                 <- optimizer, scheduler, step, RNG

Written into `<name>.tmp` and renamed, so a crash never leaves a half checkpoint under a final name.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn

CHECKPOINTS = "checkpoints"
TRAINER_STATE = "trainer_state.pt"


def checkpoint_dir(out_dir: Path, step: int) -> Path:
    return Path(out_dir) / CHECKPOINTS / f"step_{step:08d}"


def list_checkpoints(out_dir: Path) -> list[Path]:
    root = Path(out_dir) / CHECKPOINTS
    if not root.exists():
        return []
    return sorted(p for p in root.glob("step_*") if p.suffix != ".tmp" and (p / TRAINER_STATE).exists())


def latest_checkpoint(out_dir: Path) -> Path | None:
    found = list_checkpoints(out_dir)
    return found[-1] if found else None


def save_checkpoint(out_dir: Path, step: int, draft: nn.Module, optimizer, scheduler, train_config: dict,
                    *, keep: int) -> Path:
    final = checkpoint_dir(out_dir, step)
    tmp = final.with_name(final.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    draft.save_pretrained(tmp)
    state = {
        "step": step,
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "torch_rng": torch.get_rng_state(),
        "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "train_config": train_config,
    }
    torch.save(state, tmp / TRAINER_STATE)
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    for old in list_checkpoints(out_dir)[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def load_draft_weights(draft: nn.Module, checkpoint: Path) -> None:
    """Exact weights from a saved draft; every trainable parameter must be in the file."""
    state = load_file(str(Path(checkpoint) / "model.safetensors"))
    missing, unexpected = draft.load_state_dict(state, strict=False)
    trainable = {name for name, p in draft.named_parameters() if p.requires_grad}
    if unexpected or trainable & set(missing):
        raise ValueError(f"{checkpoint}: unexpected {unexpected}, missing {sorted(trainable & set(missing))}")


def load_checkpoint(checkpoint: Path, draft: nn.Module, optimizer, scheduler) -> int:
    """Restore everything saved by `save_checkpoint`; returns the step to continue from."""
    load_draft_weights(draft, checkpoint)
    state = torch.load(Path(checkpoint) / TRAINER_STATE, map_location="cpu", weights_only=False)
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    torch.set_rng_state(state["torch_rng"])
    if state["cuda_rng"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda_rng"])
    return int(state["step"])
