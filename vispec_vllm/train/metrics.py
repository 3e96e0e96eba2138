"""Per-step training metrics: a JSONL log (one object per optimizer step) and a PNG of the curves."""

from __future__ import annotations

import json
from pathlib import Path


class MetricsLog:
    """Appends step records; on resume, records after the resumed step are dropped (they will be redone)."""

    def __init__(self, path: Path, *, resume_step: int) -> None:
        self.path = Path(path)
        kept = [r for r in read_metrics(self.path) if r["step"] <= resume_step] if self.path.exists() else []
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "w", encoding="utf-8") as f:
            f.writelines(json.dumps(r) + "\n" for r in kept)

    def append(self, record: dict) -> None:
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")


def read_metrics(path: Path) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def plot_curves(log_path: Path, png_path: Path, title: str = "") -> None:
    """Loss and draft top-1 accuracy (first pass, and each MTP pass) against the step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_metrics(log_path)
    steps = [r["step"] for r in records]
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(11, 4))
    ax_loss.plot(steps, [r["loss"] for r in records], lw=1)
    ax_loss.set_xlabel("step")
    ax_loss.set_ylabel("loss")
    ax_loss.set_yscale("log")
    passes = max((len(r.get("acc_passes", [])) for r in records), default=0)
    for m in range(passes):
        points = [(r["step"], r["acc_passes"][m]) for r in records if r.get("acc_passes")]
        label = "top-1 (target features)" if m == 0 else f"top-1 (MTP pass {m})"
        ax_acc.plot([s for s, _ in points], [a for _, a in points], lw=1, label=label)
    ax_acc.set_xlabel("step")
    ax_acc.set_ylabel("draft top-1 accuracy")
    ax_acc.set_ylim(0, 1)
    if passes:
        ax_acc.legend()
    fig.suptitle(title)
    fig.tight_layout()
    tmp = png_path.with_name(png_path.stem + ".tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    tmp.replace(png_path)
