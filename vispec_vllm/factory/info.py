"""`target_info`: the facts about a target checkpoint that drafts and tests need, read from its directory."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from vispec_vllm.factory.targets import FAMILIES


@dataclass(frozen=True)
class TargetInfo:
    family: str  # the config's model_type, one of FAMILIES
    hidden_size: int
    vocab_size: int
    num_attention_heads: int
    image_token_id: int
    eos_token_id: int
    num_hidden_layers: int
    rope_theta: float
    rms_norm_eps: float
    intermediate_size: int
    max_position_embeddings: int
    embed_key: str  # safetensors key of the language model's input embedding matrix [vocab, hidden]
    lm_head_key: str  # safetensors key of the output projection [vocab, hidden] (embed_key when tied)


def target_info(target_dir: str | os.PathLike) -> TargetInfo:
    """Read `config.json` (through transformers' AutoConfig) and the safetensors key names of `target_dir`."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(target_dir)
    if config.model_type not in FAMILIES:
        raise ValueError(f"{target_dir}: model_type {config.model_type!r} is not one of {FAMILIES}")
    text = config.get_text_config()
    eos = text.eos_token_id
    keys = safetensors_keys(target_dir)
    embed_key = _language_model_key(keys, "embed_tokens.weight", target_dir)
    lm_head_key = next((key for key in keys if key.endswith("lm_head.weight")), embed_key)
    return TargetInfo(
        family=config.model_type,
        hidden_size=text.hidden_size,
        vocab_size=text.vocab_size,
        num_attention_heads=text.num_attention_heads,
        image_token_id=config.image_token_id,
        eos_token_id=eos[0] if isinstance(eos, list) else eos,
        num_hidden_layers=text.num_hidden_layers,
        rope_theta=float(text.rope_parameters["rope_theta"]),
        rms_norm_eps=text.rms_norm_eps,
        intermediate_size=text.intermediate_size,
        max_position_embeddings=text.max_position_embeddings,
        embed_key=embed_key,
        lm_head_key=lm_head_key,
    )


def safetensors_keys(target_dir: str | os.PathLike) -> list[str]:
    """Tensor names of a checkpoint: from `model.safetensors.index.json` if sharded, else the file headers."""
    from safetensors import safe_open

    root = Path(target_dir)
    index = root / "model.safetensors.index.json"
    if index.is_file():
        return sorted(json.loads(index.read_text(encoding="utf-8"))["weight_map"])
    keys: list[str] = []
    for path in sorted(root.glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as handle:
            keys.extend(handle.keys())
    return sorted(keys)


def _language_model_key(keys: list[str], suffix: str, target_dir: str | os.PathLike) -> str:
    matches = [key for key in keys if key.endswith(suffix) and "visual" not in key and "vision" not in key]
    if len(matches) != 1:
        raise ValueError(f"{target_dir}: expected one '*{suffix}' tensor, found {matches}")
    return matches[0]
