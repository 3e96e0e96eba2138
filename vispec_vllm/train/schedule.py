"""Learning-rate schedule and data order, both pure functions of the step (so a resumed run is identical)."""

from __future__ import annotations

import torch
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR


def warmup_then_linear_decay(optimizer: Optimizer, warmup_steps: int, total_steps: int) -> LambdaLR:
    """Linear warmup from 0 over `warmup_steps`, then linear decay to 0 at `total_steps`
    (the shape of transformers' get_linear_schedule_with_warmup used by the official trainer)."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return step / max(1, warmup_steps)
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup_steps))

    return LambdaLR(optimizer, factor)


def epoch_batches(num_samples: int, batch_size: int, world_size: int, rank: int, seed: int, epoch: int
                  ) -> list[list[int]]:
    """This rank's batches of one epoch: a seeded permutation, padded by wrapping around to whole
    global steps (world_size * batch_size samples), rank r taking the r-th slice of every step."""
    order = torch.randperm(num_samples, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch)).tolist()
    per_step = batch_size * world_size
    padded = [order[i % num_samples] for i in range(steps_per_epoch(num_samples, batch_size, world_size) * per_step)]
    steps = [padded[i : i + per_step] for i in range(0, len(padded), per_step)]
    return [step[rank * batch_size : (rank + 1) * batch_size] for step in steps]


def steps_per_epoch(num_samples: int, batch_size: int, world_size: int) -> int:
    return -(-num_samples // (batch_size * world_size))
