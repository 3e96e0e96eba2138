"""`ViSpecConfig`: the draft's `config.json` in the official ViSpec format.

Official draft configs are copies of the target's text config with `num_hidden_layers: 1` (see
`configs/drafts/`). Only the keys below change the draft's computation; every other key (`architectures`,
`bos_token_id`, `torch_dtype`, ...) is kept in `extra` and written back on save, so a config read from an
official file is written back as the same JSON object. Keys the official configs leave out when they hold
the default (`rope_theta` in LLaVA configs, `qkv_bias`, `bias`, `pad_token_id`) stay left out.

`draft_vocab_size` is ours (absent from official configs): the draft predicts over N target token ids, listed
by the checkpoint's `d2t` tensor (see `vispec_vllm.draft.checkpoint`).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


class DraftCheckpointError(ValueError):
    """A ViSpec draft directory, config or weights file that cannot be used; the message is one line."""


REQUIRED_KEYS = (
    "hidden_size",
    "intermediate_size",
    "num_attention_heads",
    "num_key_value_heads",
    "vocab_size",
    "max_position_embeddings",
    "rms_norm_eps",
)
# optional key -> default used when the file leaves it out (official `EConfig` / `Model` defaults)
OPTIONAL_DEFAULTS: dict[str, Any] = {
    "rope_theta": 10000.0,
    "qkv_bias": False,
    "bias": True,  # biases of `fc` and `img_fc`
    "pad_token_id": None,
    "hidden_act": "silu",
    "architectures": (),
    "model_type": "",
    "draft_vocab_size": None,  # ours: a reduced draft vocabulary (the checkpoint then holds `d2t`)
}
_TYPED_KEYS = (*REQUIRED_KEYS, *OPTIONAL_DEFAULTS)
SUPPORTED_ACTIVATIONS = ("silu",)


@dataclass(frozen=True)
class ViSpecConfig:
    hidden_size: int
    intermediate_size: int
    num_attention_heads: int
    num_key_value_heads: int
    vocab_size: int
    max_position_embeddings: int  # informative only: RoPE is computed for any position
    rms_norm_eps: float
    rope_theta: float = 10000.0
    qkv_bias: bool = False
    bias: bool = True
    pad_token_id: int | None = None
    hidden_act: str = "silu"
    architectures: tuple[str, ...] = ()
    model_type: str = ""
    draft_vocab_size: int | None = None  # None: the draft predicts over the target's whole vocabulary
    extra: dict[str, Any] = field(default_factory=dict, hash=False)
    # key order of the file this config was read from (None: built in code); only used to write it back
    source_keys: tuple[str, ...] | None = field(default=None, compare=False, hash=False, repr=False)

    def __post_init__(self) -> None:
        _check_values(dataclasses.asdict(self), "<ViSpecConfig>")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @classmethod
    def from_dict(cls, d: dict[str, Any], *, source: str = "<dict>") -> ViSpecConfig:
        missing = [k for k in REQUIRED_KEYS if k not in d]
        if missing:
            raise DraftCheckpointError(
                f"ViSpec draft config {source}: expected keys {missing} to be present, found keys {sorted(d)}"
            )
        typed = {k: d[k] for k in _TYPED_KEYS if k in d}
        extra = {k: v for k, v in d.items() if k not in typed}
        _check_values({**OPTIONAL_DEFAULTS, **typed, "extra": extra}, source)
        for key in ("rms_norm_eps", "rope_theta"):
            if key in typed:
                typed[key] = float(typed[key])
        if "architectures" in typed:
            typed["architectures"] = tuple(typed["architectures"] or ())
        return cls(**typed, extra=extra, source_keys=tuple(d))

    @classmethod
    def from_json_file(cls, path: str | Path) -> ViSpecConfig:
        path = Path(path)
        if not path.is_file():
            raise DraftCheckpointError(f"ViSpec draft config {path}: expected a config.json file, found none")
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise DraftCheckpointError(f"ViSpec draft config {path}: expected valid JSON, found {err}") from None
        if not isinstance(data, dict):
            raise DraftCheckpointError(
                f"ViSpec draft config {path}: expected a JSON object, found {type(data).__name__}"
            )
        return cls.from_dict(data, source=str(path))

    def to_dict(self) -> dict[str, Any]:
        """The JSON object: keys in the source file's order, then the rest; left-out defaults stay left out."""
        emitted = [k for k in (self.source_keys or ()) if k in _TYPED_KEYS or k in self.extra]
        emitted += [k for k in (*REQUIRED_KEYS, "hidden_act") if k not in emitted]
        emitted += [k for k, d in OPTIONAL_DEFAULTS.items() if k not in emitted and getattr(self, k) != d]
        emitted += [k for k in self.extra if k not in emitted]
        if self.source_keys is None:
            emitted.sort()  # built in code: alphabetical, like the official (transformers-written) files
        out: dict[str, Any] = {}
        for key in emitted:
            value = getattr(self, key) if key in _TYPED_KEYS else self.extra[key]
            out[key] = list(value) if key == "architectures" else value
        return out

    def to_json_file(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")


def _check_values(values: dict[str, Any], source: str) -> None:
    """Raise a one-line `DraftCheckpointError` for values the draft cannot run with."""

    def fail(what: str) -> DraftCheckpointError:
        return DraftCheckpointError(f"ViSpec draft config {source}: {what}")

    for key in REQUIRED_KEYS[:-1]:
        value = values[key]
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise fail(f"expected {key} a positive integer, found {value!r}")
    for key in ("rms_norm_eps", "rope_theta"):
        value = values[key]
        if not isinstance(value, int | float) or isinstance(value, bool) or value <= 0:
            raise fail(f"expected {key} a positive number, found {value!r}")
    hidden, heads, kv_heads = values["hidden_size"], values["num_attention_heads"], values["num_key_value_heads"]
    if hidden % heads or (hidden // heads) % 2:
        raise fail(f"expected hidden_size a multiple of 2*num_attention_heads, found {hidden} and {heads}")
    if heads % kv_heads:
        raise fail(f"expected num_attention_heads a multiple of num_key_value_heads, found {heads} and {kv_heads}")
    pad = values["pad_token_id"]
    if pad is not None and (not isinstance(pad, int) or isinstance(pad, bool) or not 0 <= pad < values["vocab_size"]):
        raise fail(f"expected pad_token_id null or in [0, {values['vocab_size']}), found {pad!r}")
    draft_vocab = values["draft_vocab_size"]
    if draft_vocab is not None and (
        not isinstance(draft_vocab, int) or isinstance(draft_vocab, bool) or not 0 < draft_vocab <= values["vocab_size"]
    ):
        raise fail(f"expected draft_vocab_size null or in [1, {values['vocab_size']}], found {draft_vocab!r}")
    if values["hidden_act"] not in SUPPORTED_ACTIVATIONS:
        raise fail(f"expected hidden_act in {SUPPORTED_ACTIVATIONS}, found {values['hidden_act']!r}")
    extra = values["extra"]
    if extra.get("num_hidden_layers", 1) != 1:
        raise fail(f"expected num_hidden_layers 1 (one decoder layer), found {extra['num_hidden_layers']!r}")
    if extra.get("rope_scaling") is not None:
        raise fail(f"expected rope_scaling null (plain 1-D RoPE), found {extra['rope_scaling']!r}")
