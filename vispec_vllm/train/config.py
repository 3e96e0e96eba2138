"""Training settings. Defaults are the official recipe (README commands of KangJialiang/ViSpec)."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path


@dataclass
class TrainConfig:
    stage: int  # 1: text EAGLE draft; 2: ViSpec (image adaptor + global feature, MTP)
    target: Path  # target VLM directory: embed_tokens (frozen copy) and lm_head (frozen, never saved)
    data: list[Path]  # data directories written by `python -m vispec_vllm.data`
    out: Path  # run directory: checkpoints/, draft/ (export), train_log.jsonl, loss_curve.png
    init: Path | None = None  # stage 1: None, a config JSON or a draft dir; stage 2: the stage-1 draft
    num_q: int = 2  # stage 2: learned queries per image (num_q - 1 compressed tokens + 1 global feature)
    mtp_steps: int | None = None  # extra self-fed passes; default 0 for stage 1, 1 for stage 2 (README)
    lr: float = 3e-6
    betas: tuple[float, float] = (0.9, 0.95)
    weight_decay: float = 0.01  # torch AdamW default, as in the official trainer
    epochs: int = 20
    warmup_epochs: float = 1.0
    warmup_steps: int | None = None  # overrides warmup_epochs
    max_steps: int | None = None  # overrides epochs: schedule length and stop
    batch_size: int = 1  # per process
    max_len: int = 4096  # tokens per sample
    grad_clip_value: float = 0.5  # clip_grad_value_, not norm clipping
    noise_std: float = 0.2  # uniform noise (U - 0.5) * std * 512 / L on the input hidden states; 0 = off
    seed: int = 0
    save_every: int | None = None  # steps between checkpoints; default once per epoch
    keep_checkpoints: int = 2
    precision: str = "auto"  # auto (bf16 autocast on CUDA, fp32 on CPU) | bf16 | fp32
    device: str | None = None
    num_workers: int = 0
    export_dtype: str = "float32"  # dtype of the exported draft (official checkpoints are fp32 masters)
    progress: bool = True
    resume: bool = True  # continue from the latest checkpoint in `out` when there is one

    @property
    def resolved_mtp_steps(self) -> int:
        if self.mtp_steps is not None:
            return self.mtp_steps
        return 0 if self.stage == 1 else 1

    def to_json(self) -> dict:
        data = asdict(self)
        for key in ("target", "out", "init"):
            data[key] = None if data[key] is None else str(data[key])
        data["data"] = [str(d) for d in self.data]
        data["betas"] = list(self.betas)
        return data
