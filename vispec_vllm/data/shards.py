"""Sharded safetensors storage of teacher-forced target samples.

One shard holds the samples of a fixed slice of source records, concatenated along the token axis:

    input_ids      [N] int32     all tokens of all samples (prompt + answer)
    answer_mask    [N] bool      True on answer tokens (what the draft learns to predict)
    image_mask     [N] bool      True on image placeholder tokens (unshifted)
    hidden_states  [N, H]        the target's last hidden states after the final norm (the lm_head input)
    image_embeds   [M, H]        the target's merged input embeddings at the image tokens only
    token_offsets  [S+1] int64   sample s = tokens [token_offsets[s], token_offsets[s+1])
    image_offsets  [S+1] int64   sample s = image rows [image_offsets[s], image_offsets[s+1])

Text-token rows of the merged input embeddings are the target's embedding rows of `input_ids` (checked at
extraction), so they are not stored: the draft's frozen `embed_tokens` reproduces them exactly.
Safetensors metadata: format, sample ids, source record indices, skip counts (JSON strings).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

SHARD_FORMAT = "vispec-shard-v1"


def shard_name(index: int) -> str:
    return f"shard_{index:05d}.safetensors"


@dataclass
class TargetSample:
    sample_id: str
    record_index: int
    input_ids: torch.Tensor  # [L] int64
    answer_mask: torch.Tensor  # [L] bool
    image_mask: torch.Tensor  # [L] bool
    hidden_states: torch.Tensor  # [L, H]
    image_embeds: torch.Tensor  # [M, H], M = image_mask.sum()

    def __len__(self) -> int:
        return len(self.input_ids)


def _offsets(lengths: list[int]) -> torch.Tensor:
    return torch.tensor([0, *lengths], dtype=torch.int64).cumsum(0)


def write_shard(path: Path, samples: list[TargetSample], skipped: dict[str, int], hidden_size: int,
                dtype: torch.dtype) -> None:
    """Write atomically (temporary file, then rename): a shard file either exists complete or not at all."""
    def cat(rows: list[torch.Tensor]) -> torch.Tensor:
        return torch.cat(rows).to(dtype) if rows else torch.zeros(0, hidden_size, dtype=dtype)

    tensors = {
        "input_ids": torch.cat([s.input_ids for s in samples]).int() if samples else torch.zeros(0, dtype=torch.int32),
        "answer_mask": torch.cat([s.answer_mask for s in samples]) if samples else torch.zeros(0, dtype=torch.bool),
        "image_mask": torch.cat([s.image_mask for s in samples]) if samples else torch.zeros(0, dtype=torch.bool),
        "hidden_states": cat([s.hidden_states for s in samples]),
        "image_embeds": cat([s.image_embeds for s in samples]),
        "token_offsets": _offsets([len(s) for s in samples]),
        "image_offsets": _offsets([len(s.image_embeds) for s in samples]),
    }
    metadata = {
        "format": SHARD_FORMAT,
        "sample_ids": json.dumps([s.sample_id for s in samples]),
        "record_indices": json.dumps([s.record_index for s in samples]),
        "skipped": json.dumps(skipped),
    }
    tmp = path.with_name(path.name + ".tmp")
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata=metadata)
    os.replace(tmp, path)


class ShardReader:
    """Random access to the samples of one shard (tensor slices are read lazily from the file)."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._file = safe_open(str(path), framework="pt")
        metadata = self._file.metadata() or {}
        if metadata.get("format") != SHARD_FORMAT:
            raise ValueError(f"{path}: not a {SHARD_FORMAT} file")
        self.sample_ids: list[str] = json.loads(metadata["sample_ids"])
        self.record_indices: list[int] = json.loads(metadata["record_indices"])
        self.skipped: dict[str, int] = json.loads(metadata["skipped"])
        self.token_offsets = self._file.get_tensor("token_offsets").tolist()
        self.image_offsets = self._file.get_tensor("image_offsets").tolist()

    def __len__(self) -> int:
        return len(self.sample_ids)

    def lengths(self) -> list[int]:
        return [b - a for a, b in zip(self.token_offsets, self.token_offsets[1:], strict=False)]

    def answer_token_count(self) -> int:
        return int(self._file.get_tensor("answer_mask").sum())

    def token_rows(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """(input_ids [L], answer_mask [L]) of every sample, without reading hidden states or image rows."""
        input_ids, answer_mask = self._file.get_tensor("input_ids").long(), self._file.get_tensor("answer_mask")
        bounds = zip(self.token_offsets, self.token_offsets[1:], strict=False)
        return [(input_ids[start:stop], answer_mask[start:stop]) for start, stop in bounds]

    def _rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        return self._file.get_slice(name)[start:stop]

    def sample(self, i: int, max_len: int | None = None) -> TargetSample:
        """Sample i, cut to its first `max_len` tokens (image rows cut accordingly)."""
        start, stop = self.token_offsets[i], self.token_offsets[i + 1]
        if max_len is not None:
            stop = min(stop, start + max_len)
        image_mask = self._rows("image_mask", start, stop)
        image_start = self.image_offsets[i]
        return TargetSample(
            sample_id=self.sample_ids[i],
            record_index=self.record_indices[i],
            input_ids=self._rows("input_ids", start, stop).long(),
            answer_mask=self._rows("answer_mask", start, stop),
            image_mask=image_mask,
            hidden_states=self._rows("hidden_states", start, stop),
            image_embeds=self._rows("image_embeds", image_start, image_start + int(image_mask.sum())),
        )
