"""ViSpec draft training: stage 1 (EAGLE, text) and stage 2 (ViSpec, images, MTP), official-format export.

CLI: `python -m vispec_vllm.train --help`, `python -m vispec_vllm.train.export --help`.
"""

from vispec_vllm.train.config import TrainConfig
from vispec_vllm.train.tiny import train_tiny_draft


def train(config: TrainConfig):
    """Run a training stage to the end of its schedule; returns the exported draft directory."""
    from vispec_vllm.train.trainer import train as run

    return run(config)


__all__ = ["TrainConfig", "train", "train_tiny_draft"]
