"""The official ViSpec draft checkpoint: a directory with `config.json` and `model.safetensors` (or
`pytorch_model.bin`) holding exactly the official keys (§3.1 of the reference):

* ViSpec (stage 2): 17 keys, or 22 with `qkv_bias` (Qwen2.5-VL), `num_q` = `imadpt.q.shape[0]`;
* stage-1 EAGLE draft: the same without `imadpt.*` and `img_fc.*` (11 / 14 keys).

No `lm_head` (the draft uses the target's), no input norm, no final norm. Everything is validated before
any module is built; each error is a one-line `DraftCheckpointError` naming the file, expected and found.

Ours, optional: a reduced draft vocabulary. `config.json` has `"draft_vocab_size": N` and the weights one more
tensor, `d2t`: int64 [N], draft id -> target id, strictly increasing target ids in [0, vocab_size). The draft's
output head is then the target's lm_head restricted to those rows (still not stored), so its logits over the
subset equal the full-vocabulary logits there. (EAGLE-3's `d2t` holds offsets, target - draft; ours holds the
target ids themselves.)
"""

from __future__ import annotations

from pathlib import Path

import torch

from vispec_vllm.draft.config import DraftCheckpointError, ViSpecConfig

__all__ = [
    "CONFIG_FILE",
    "WEIGHT_FILES",
    "DraftCheckpointError",
    "check_draft_matches_target",
    "check_draft_vocab",
    "checkpoint_num_q",
    "expected_keys",
    "load_draft_checkpoint",
    "validate_state_dict",
]

CONFIG_FILE = "config.json"
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")  # looked for in this order
VISION_PREFIXES = ("imadpt.", "img_fc.")  # absent from stage-1 checkpoints
DRAFT_VOCAB_KEY = "d2t"  # draft id -> target id, only with config.draft_vocab_size


def expected_keys(config: ViSpecConfig, num_q: int | None) -> dict[str, tuple[int, ...]]:
    """Official key -> shape, in the draft's `state_dict()` order. num_q None: a stage-1 checkpoint."""
    hidden, inter, vocab = config.hidden_size, config.intermediate_size, config.vocab_size
    heads, head_dim = config.num_attention_heads, config.head_dim
    kv_width = config.num_key_value_heads * head_dim
    keys: dict[str, tuple[int, ...]] = {}
    if config.draft_vocab_size is not None:  # a buffer of the draft's root module: first in its state dict
        keys[DRAFT_VOCAB_KEY] = (config.draft_vocab_size,)
    keys["embed_tokens.weight"] = (vocab, hidden)
    attn = "layers.0.self_attn"
    for name, width in (("q_proj", heads * head_dim), ("k_proj", kv_width), ("v_proj", kv_width)):
        keys[f"{attn}.{name}.weight"] = (width, hidden)
        if config.qkv_bias:
            keys[f"{attn}.{name}.bias"] = (width,)
    keys[f"{attn}.o_proj.weight"] = (hidden, heads * head_dim)
    keys["layers.0.mlp.gate_proj.weight"] = (inter, hidden)
    keys["layers.0.mlp.up_proj.weight"] = (inter, hidden)
    keys["layers.0.mlp.down_proj.weight"] = (hidden, inter)
    keys["layers.0.post_attention_layernorm.weight"] = (hidden,)
    _add_linear(keys, "fc", hidden, 2 * hidden, config.bias)
    if num_q is not None:
        keys["imadpt.q"] = (num_q, heads, head_dim)
        _add_linear(keys, "imadpt.k_proj", heads * head_dim, hidden, config.qkv_bias)
        _add_linear(keys, "imadpt.v_proj", heads * head_dim, hidden, config.qkv_bias)
        _add_linear(keys, "imadpt.o_proj", hidden, heads * head_dim, False)
        _add_linear(keys, "img_fc", hidden, 2 * hidden, config.bias)
    return keys


def _add_linear(keys: dict[str, tuple[int, ...]], name: str, out_features: int, in_features: int, bias: bool) -> None:
    keys[f"{name}.weight"] = (out_features, in_features)
    if bias:
        keys[f"{name}.bias"] = (out_features,)


def checkpoint_num_q(state_dict: dict[str, torch.Tensor]) -> int | None:
    """num_q of a (validated) state dict: `imadpt.q.shape[0]`, None for a stage-1 checkpoint."""
    q = state_dict.get("imadpt.q")
    return None if q is None else int(q.shape[0])


def _names(keys: list[str], limit: int = 6) -> str:
    shown = ", ".join(keys[:limit])
    return f"[{shown}{f', ... ({len(keys) - limit} more)' if len(keys) > limit else ''}]"


def validate_state_dict(config: ViSpecConfig, state_dict: dict[str, torch.Tensor], *, source: str) -> int | None:
    """Check keys and shapes against `config`; return num_q (None: stage 1). Raises `DraftCheckpointError`."""
    not_tensors = sorted(k for k, v in state_dict.items() if not isinstance(v, torch.Tensor))
    if not_tensors:
        raise DraftCheckpointError(
            f"ViSpec draft {source}: expected tensors, found non-tensor values at {_names(not_tensors)}"
        )
    q = state_dict.get("imadpt.q")
    if q is not None:
        if q.dim() != 3:
            raise DraftCheckpointError(
                f"ViSpec draft {source}: expected imadpt.q of shape [num_q, {config.num_attention_heads}, "
                f"{config.head_dim}], found {list(q.shape)}"
            )
        if q.shape[0] < 2:
            raise DraftCheckpointError(
                f"ViSpec draft {source}: expected num_q = imadpt.q.shape[0] >= 2 (compressed tokens + global "
                f"feature), found {q.shape[0]}"
            )
    if DRAFT_VOCAB_KEY in state_dict and config.draft_vocab_size is None:
        raise DraftCheckpointError(
            f"ViSpec draft {source}: expected draft_vocab_size in config.json with a {DRAFT_VOCAB_KEY} tensor "
            f"(a reduced draft vocabulary), found none"
        )
    has_vision = any(k.startswith(VISION_PREFIXES) for k in state_dict)
    num_q = (checkpoint_num_q(state_dict) or 2) if has_vision else None  # 2: placeholder when imadpt.q is missing
    expected = expected_keys(config, num_q)
    stage = f"ViSpec, {len(expected)} keys" if has_vision else f"stage-1 EAGLE, {len(expected)} keys"
    unknown = sorted(set(state_dict) - set(expected))
    if unknown:
        raise DraftCheckpointError(
            f"ViSpec draft {source}: unknown keys {_names(unknown)}; expected only the official keys ({stage})"
        )
    missing = [k for k in expected if k not in state_dict]
    if missing:
        raise DraftCheckpointError(f"ViSpec draft {source}: missing keys {_names(missing)} ({stage} expected)")
    wrong = [
        f"{k} expected {list(shape)} found {list(state_dict[k].shape)}"
        for k, shape in expected.items()
        if tuple(state_dict[k].shape) != shape
    ]
    if wrong:
        raise DraftCheckpointError(
            f"ViSpec draft {source}: tensor shapes do not match config.json: {'; '.join(wrong[:4])}"
            + (f"; ... ({len(wrong) - 4} more)" if len(wrong) > 4 else "")
        )
    not_float = sorted(k for k, v in state_dict.items() if not v.is_floating_point() and k != DRAFT_VOCAB_KEY)
    if not_float:
        raise DraftCheckpointError(f"ViSpec draft {source}: expected floating-point tensors, found {_names(not_float)}")
    if config.draft_vocab_size is not None:
        check_draft_vocab(state_dict[DRAFT_VOCAB_KEY], config.vocab_size, source=source)
    return checkpoint_num_q(state_dict)


def check_draft_vocab(d2t: torch.Tensor, vocab_size: int, *, source: str) -> None:
    """`d2t` must be int64 [N], strictly increasing target ids in [0, vocab_size). Raises `DraftCheckpointError`."""
    if d2t.dtype != torch.int64 or d2t.dim() != 1 or d2t.numel() == 0:
        raise DraftCheckpointError(
            f"ViSpec draft {source}: expected {DRAFT_VOCAB_KEY} a non-empty int64 vector, "
            f"found {d2t.dtype} of shape {list(d2t.shape)}"
        )
    low, high = int(d2t.min()), int(d2t.max())
    if low < 0 or high >= vocab_size:
        raise DraftCheckpointError(
            f"ViSpec draft {source}: expected {DRAFT_VOCAB_KEY} target ids in [0, {vocab_size}), found ids "
            f"from {low} to {high}"
        )
    if d2t.numel() > 1 and not bool((d2t[1:] > d2t[:-1]).all()):
        first = int((d2t[1:] <= d2t[:-1]).nonzero()[0])
        raise DraftCheckpointError(
            f"ViSpec draft {source}: expected {DRAFT_VOCAB_KEY} strictly increasing target ids, found "
            f"{int(d2t[first])} then {int(d2t[first + 1])} at draft ids {first}, {first + 1}"
        )


def _read_weights(path: Path) -> dict[str, torch.Tensor]:
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # any reader failure is reported as one line
        detail = str(err).strip().splitlines()[0] if str(err).strip() else ""
        raise DraftCheckpointError(
            f"ViSpec draft {path}: expected a readable {path.name} file, found {type(err).__name__}: {detail}"
        ) from None
    if not isinstance(state, dict):
        raise DraftCheckpointError(f"ViSpec draft {path}: expected a state dict, found {type(state).__name__}")
    return state


def load_draft_checkpoint(path: str | Path) -> tuple[ViSpecConfig, dict[str, torch.Tensor], Path]:
    """Read and validate a draft directory: (config, state dict as stored, weights file)."""
    directory = Path(path)
    if not directory.is_dir():
        found = "a file" if directory.exists() else "nothing"
        raise DraftCheckpointError(f"ViSpec draft {directory}: expected a checkpoint directory, found {found}")
    config_path = directory / CONFIG_FILE
    present = _names(sorted(p.name for p in directory.iterdir()))
    if not config_path.is_file():
        raise DraftCheckpointError(f"ViSpec draft {directory}: expected {CONFIG_FILE}, found {present}")
    config = ViSpecConfig.from_json_file(config_path)
    weights = next((directory / name for name in WEIGHT_FILES if (directory / name).is_file()), None)
    if weights is None:
        raise DraftCheckpointError(
            f"ViSpec draft {directory}: expected a weights file {' or '.join(WEIGHT_FILES)}, "
            f"found {present}"
        )
    state = _read_weights(weights)
    validate_state_dict(config, state, source=str(weights))
    return config, state, weights


def check_draft_matches_target(
    config: ViSpecConfig, *, hidden_size: int, vocab_size: int, num_attention_heads: int, source: str
) -> None:
    """The draft reads the target's hidden states and uses its lm_head: sizes must agree exactly."""
    pairs = (("hidden_size", hidden_size), ("vocab_size", vocab_size), ("num_attention_heads", num_attention_heads))
    wrong = [
        f"{name} expected {target} (target) found {getattr(config, name)}"
        for name, target in pairs
        if getattr(config, name) != target
    ]
    if wrong:
        raise DraftCheckpointError(f"ViSpec draft {source}/{CONFIG_FILE} does not fit the target: {'; '.join(wrong)}")
