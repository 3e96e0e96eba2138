"""Deterministic random weights for the tiny targets, written as one float32 `model.safetensors`.

Every parameter is drawn from one seeded generator in sorted-name order, so the bytes depend only on the seed,
the parameter names and shapes (not on transformers' init order or the thread count). Scales keep activations
O(1) through the tiny networks so the image visibly changes the output:

- matrices (linear, conv, embeddings): N(0, 1/fan_in) for projections, N(0, 1) for embedding tables;
- normalisation weights: 1 + N(0, 0.1^2); biases and other vectors: N(0, 0.02^2);
- `lm_head`: N(0, 0.5^2) so greedy decoding is never decided by near-ties.

Biases and norm weights are not left at 0/1, so a loader that drops or mis-maps one is caught by the
HF-vs-vLLM comparison.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

SAFETENSORS_NAME = "model.safetensors"
LM_HEAD_STD = 0.5
NORM_JITTER_STD = 0.1
VECTOR_STD = 0.02
_NORM_CLASS_MARKERS = ("Norm",)


def seeded_model(model_class: type[torch.nn.Module], config: object, seed: int) -> torch.nn.Module:
    """`model_class(config)` with `reinitialize`d weights, leaving the caller's torch RNG state untouched."""
    with torch.random.fork_rng(devices=[]):
        model = model_class(config)
    reinitialize(model, seed)
    return model


def reinitialize(model: torch.nn.Module, seed: int, lm_head_key: str = "lm_head.weight") -> None:
    """Overwrite every parameter of `model` with seeded random values (see module docstring)."""
    owners = {f"{prefix}.{name}" if prefix else name: module
              for prefix, module in model.named_modules() for name, _ in module.named_parameters(recurse=False)}
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in sorted(model.named_parameters()):
            owner = owners[name]
            is_norm = any(marker in type(owner).__name__ for marker in _NORM_CLASS_MARKERS)
            values = torch.randn(param.shape, generator=generator, dtype=torch.float32)
            if name == lm_head_key:
                values *= LM_HEAD_STD
            elif is_norm and name.endswith("weight"):
                values = 1.0 + NORM_JITTER_STD * values
            elif isinstance(owner, torch.nn.Embedding):
                pass  # N(0, 1): RMS/LayerNorm follows every embedding
            elif param.dim() >= 2:
                values /= math.sqrt(math.prod(param.shape[1:]))
            else:
                values *= VECTOR_STD
            param.copy_(values)


def save_model(model: torch.nn.Module, out_dir: Path, rename: Callable[[str], str] = lambda key: key) -> None:
    """`save_pretrained` (config.json, generation_config.json and hub-layout keys), then rewrite the weights.

    The rewrite passes every key through `rename`, stores contiguous float32 tensors in sorted key order and
    fixes the metadata, so the file's bytes depend only on the tensors.
    """
    from transformers.utils import logging as hf_logging

    bars_were_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        model.save_pretrained(out_dir)
    finally:
        if bars_were_enabled:
            hf_logging.enable_progress_bar()
    path = out_dir / SAFETENSORS_NAME
    tensors = {rename(key): value.to(torch.float32).contiguous() for key, value in load_file(str(path)).items()}
    save_file(dict(sorted(tensors.items())), str(path), metadata={"format": "pt"})
