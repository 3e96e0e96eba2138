"""The training loop: AdamW + warmup/linear decay, value clipping, noise, MTP, checkpoints, DDP under torchrun."""

from __future__ import annotations

import contextlib
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from vispec_vllm.train.batches import DraftBatch, ShardedSamples, collate
from vispec_vllm.train.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from vispec_vllm.train.config import TrainConfig
from vispec_vllm.train.draft_init import initial_draft
from vispec_vllm.train.metrics import MetricsLog, plot_curves
from vispec_vllm.train.schedule import epoch_batches, steps_per_epoch, warmup_then_linear_decay
from vispec_vllm.train.step import DraftRollout, StepResult, batch_loss, uniform_noise

EXPORT_DIR = "draft"
LOG_FILE = "train_log.jsonl"
CURVE_FILE = "loss_curve.png"


@dataclass(frozen=True)
class Distributed:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(device_type: str) -> Distributed:
    """torchrun sets WORLD_SIZE/RANK/LOCAL_RANK; one process without them."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return Distributed()
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device_type == "cuda" else "gloo")
    return Distributed(dist.get_rank(), world_size, int(os.environ.get("LOCAL_RANK", "0")))


def _device(config: TrainConfig, env: Distributed) -> torch.device:
    if config.device:
        return torch.device(config.device)
    return torch.device(f"cuda:{env.local_rank}") if torch.cuda.is_available() else torch.device("cpu")


def _autocast(config: TrainConfig, device: torch.device):
    use_bf16 = config.precision == "bf16" or (config.precision == "auto" and device.type == "cuda")
    if not use_bf16:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


def _noise_generator(config: TrainConfig, step: int, rank: int) -> torch.Generator:
    """Noise is a function of (seed, step, rank): nothing to save for an exact resume."""
    return torch.Generator().manual_seed((config.seed * 1_000_003 + step) * 1_009 + rank)


def _reduce(values: list[float], env: Distributed, device: torch.device) -> list[float]:
    if env.world_size == 1:
        return values
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(tensor)
    return tensor.tolist()


class Trainer:
    def __init__(self, config: TrainConfig) -> None:
        self.config = config
        self.device = _device(config, Distributed())
        self.env = init_distributed(self.device.type)
        self.device = _device(config, self.env)
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        self.samples = ShardedSamples(config.data, config.max_len)
        self.steps_per_epoch = steps_per_epoch(len(self.samples), config.batch_size, self.env.world_size)
        self.total_steps = config.max_steps or config.epochs * self.steps_per_epoch
        warmup = config.warmup_steps
        self.warmup_steps = round(config.warmup_epochs * self.steps_per_epoch) if warmup is None else warmup
        self.save_every = config.save_every or self.steps_per_epoch

        self.draft = initial_draft(config).to(self.device)
        if config.chooses_draft_vocab:
            self._choose_draft_vocab()
        self.trainable = [p for p in self.draft.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.trainable, lr=config.lr, betas=config.betas,
                                           weight_decay=config.weight_decay)
        self.scheduler = warmup_then_linear_decay(self.optimizer, self.warmup_steps, self.total_steps)
        self.step = 0
        checkpoint = latest_checkpoint(config.out) if config.resume else None
        if checkpoint is not None:
            self.step = load_checkpoint(checkpoint, self.draft, self.optimizer, self.scheduler)
        rollout = DraftRollout(self.draft, mtp_steps=config.resolved_mtp_steps, use_image_path=config.stage == 2)
        self.model: nn.Module = rollout
        if self.env.world_size > 1:
            device_ids = [self.device.index] if self.device.type == "cuda" else None
            # Stage 2: batches without an image leave the image adaptor unused. No buffer changes in training
            # (the lm_head buffer is the same everywhere and large), so buffers are not re-synced every step.
            self.model = nn.parallel.DistributedDataParallel(rollout, device_ids=device_ids,
                                                             find_unused_parameters=config.stage == 2,
                                                             forward_sync_buffers=False)
        self.log = MetricsLog(config.out / LOG_FILE, resume_step=self.step) if self.env.is_main else None

    def _choose_draft_vocab(self) -> None:
        """Stage 1 with --draft-vocab-size/--draft-vocab-coverage: restrict the draft's output to the chosen ids."""
        from vispec_vllm.train.draft_vocab import REPORT_FILE, choose_for_training

        config = self.config
        if self.draft.d2t is not None:
            raise ValueError(f"the --init draft {config.init} already has a draft vocabulary of "
                             f"{self.draft.d2t.numel()} ids, which the run inherits: drop --draft-vocab-size/-coverage")
        choice = choose_for_training(config.target, config.data, config.max_len, size=config.draft_vocab_size,
                                     coverage=config.draft_vocab_coverage)
        self.draft.set_draft_vocab(choice.d2t)
        if self.env.is_main:
            choice.write_report(config.out / REPORT_FILE)
            print("\n".join(choice.summary_lines()))

    def _loader(self, epoch: int, first_batch: int) -> DataLoader:
        batches = epoch_batches(len(self.samples), self.config.batch_size, self.env.world_size, self.env.rank,
                                self.config.seed, epoch)[first_batch:]
        return DataLoader(self.samples, batch_sampler=batches, collate_fn=collate,
                          num_workers=self.config.num_workers)

    def train_step(self, batch: DraftBatch) -> StepResult:
        """One optimizer step on `batch` (already on the device)."""
        config = self.config
        self.optimizer.zero_grad(set_to_none=True)
        hidden = batch.hidden_states
        if config.noise_std > 0:
            hidden = hidden + uniform_noise(batch, config.noise_std, _noise_generator(config, self.step, self.env.rank))
        with _autocast(config, self.device):
            predictions = self.model(hidden, batch.next_ids, batch.image_mask, batch.image_embeds,
                                     batch.attention_mask)
            result = batch_loss(self.draft, predictions, batch, config.stage)
        result.loss.backward()
        if config.grad_clip_value > 0:
            torch.nn.utils.clip_grad_value_(self.trainable, config.grad_clip_value)
        self.optimizer.step()
        self.scheduler.step()
        return result

    def _record(self, result: StepResult, lr: float, seconds: float) -> dict:
        """The step's metrics over all processes (position-weighted means)."""
        names = sorted(result.terms)
        weighted = [float(result.loss.detach()), *(result.terms[k] for k in names)]
        positions, *sums = _reduce([result.positions, *(v * result.positions for v in weighted), *result.correct],
                                   self.env, self.device)
        means = [v / positions if positions else None for v in sums]
        correct = means[len(weighted):]
        return {
            "step": self.step,
            "epoch": (self.step - 1) // self.steps_per_epoch,
            "lr": lr,
            "loss": means[0] if positions else 0.0,
            "acc": correct[0],
            "acc_passes": correct if positions else [],
            "positions": int(positions),
            **dict(zip(names, means[1 : len(weighted)], strict=True)),
            "seconds": round(seconds, 4),
        }

    def save(self) -> Path | None:
        if not self.env.is_main:
            return None
        path = save_checkpoint(self.config.out, self.step, self.draft, self.optimizer, self.scheduler,
                               self.config.to_json(), keep=self.config.keep_checkpoints)
        plot_curves(self.config.out / LOG_FILE, self.config.out / CURVE_FILE, f"stage {self.config.stage}")
        return path

    def run(self) -> Path:
        """Train to the end of the schedule and export the draft to <out>/draft; returns that directory."""
        config = self.config
        bar = tqdm(total=self.total_steps, initial=self.step, desc=f"train stage {config.stage}", unit="step",
                   disable=not (config.progress and self.env.is_main))
        while self.step < self.total_steps:
            epoch, first_batch = divmod(self.step, self.steps_per_epoch)
            for batch in self._loader(epoch, first_batch):
                started = time.perf_counter()
                lr = self.scheduler.get_last_lr()[0]
                result = self.train_step(batch.to(self.device))
                self.step += 1
                record = self._record(result, lr, time.perf_counter() - started)
                if self.log is not None:
                    self.log.append(record)
                bar.update(1)
                bar.set_postfix(loss=f"{record['loss']:.4f}", acc=f"{record['acc'] or 0.0:.3f}")
                if self.step % self.save_every == 0 or self.step == self.total_steps:
                    self.save()
                if self.step == self.total_steps:
                    break
        bar.close()
        return self.export()

    def export(self) -> Path:
        export_dir = self.config.out / EXPORT_DIR
        if self.env.is_main:
            from vispec_vllm.train.export import export_draft

            export_draft(self.draft, export_dir, dtype=getattr(torch, self.config.export_dtype))
        if self.env.world_size > 1:
            dist.barrier()
        return export_dir


def train(config: TrainConfig) -> Path:
    return Trainer(config).run()
