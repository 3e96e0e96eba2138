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
    # stage 1 only, at most one of the two (ours): a reduced draft vocabulary of the N target ids most frequent
    # among the training answer tokens (N rounded up to a multiple of 64), or of the fewest reaching this share
    # of them; stage 2 and any run whose --init draft has one inherit it (`vispec_vllm.train.draft_vocab`)
    draft_vocab_size: int | None = None
    draft_vocab_coverage: float | None = None

    def __post_init__(self) -> None:
        if self.draft_vocab_size is not None and self.draft_vocab_coverage is not None:
            raise ValueError("draft_vocab_size and draft_vocab_coverage are mutually exclusive: give one")
        if self.chooses_draft_vocab and self.stage != 1:
            raise ValueError("a draft vocabulary is chosen in stage 1; stage 2 inherits it from its --init draft")
        if self.draft_vocab_size is not None and self.draft_vocab_size < 1:
            raise ValueError(f"draft_vocab_size must be >= 1, got {self.draft_vocab_size}")
        if self.draft_vocab_coverage is not None and not 0 < self.draft_vocab_coverage <= 1:
            raise ValueError(f"draft_vocab_coverage must be in (0, 1], got {self.draft_vocab_coverage}")

    @property
    def chooses_draft_vocab(self) -> bool:
        return self.draft_vocab_size is not None or self.draft_vocab_coverage is not None

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
