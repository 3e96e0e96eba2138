"""Stored target samples -> draft training slots -> right-padded batches.

Slot t pairs (h_t, x_{t+1}) (the draft's convention, same as vLLM's EAGLE proposer). For a sample of L tokens:

    hidden_states[t]  = h_t                     t = 0..L-2   (input; noise is added by the trainer)
    target_hidden[t]  = h_{t+1}                 (the draft learns to predict it; lm_head(h_{t+1}) -> x_{t+2})
    next_ids[t]       = x_{t+1}
    image_mask[t]     = x_{t+1} is an image token (already shifted)
    loss_mask[t]      = x_{t+2} is an answer token, i.e. the slot predicts a generated token
    image_embeds      = merged input embeddings of the image tokens among x_1..x_{L-1}, in order

The loss mask equals the official multimodal one (every generated token is a prediction target); the
official text recipe shifts it by two more slots, which only drops the first two predictions of each turn.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, fields
from pathlib import Path

import torch

from vispec_vllm.data.manifest import shard_paths
from vispec_vllm.data.shards import ShardReader, TargetSample


class ShardedSamples:
    """Random access to every sample of one or more data directories, cut to `max_len` tokens.

    Shard files are opened lazily per process, at most `open_files` at a time (least recently used closed
    first), so the object can be handed to DataLoader workers and datasets may have thousands of shards.
    """

    def __init__(self, data_dirs: list[Path], max_len: int | None = None, *, open_files: int = 32) -> None:
        self.paths = [p for d in data_dirs for p in shard_paths(Path(d))]
        if not self.paths:
            raise FileNotFoundError(f"no shard_*.safetensors in {[str(d) for d in data_dirs]}")
        self.max_len = max_len
        self.open_files = open_files
        self._readers: OrderedDict[int, ShardReader] = OrderedDict()
        self.index = [(k, i) for k, path in enumerate(self.paths) for i in range(len(ShardReader(path)))]

    def _reader(self, k: int) -> ShardReader:
        if k in self._readers:
            self._readers.move_to_end(k)
        else:
            self._readers[k] = ShardReader(self.paths[k])
            if len(self._readers) > self.open_files:
                self._readers.popitem(last=False)
        return self._readers[k]

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_readers": OrderedDict()}

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, n: int) -> TargetSample:
        k, i = self.index[n]
        return self._reader(k).sample(i, self.max_len)


@dataclass
class DraftBatch:
    hidden_states: torch.Tensor  # [B, T, H] float32, h_t
    target_hidden: torch.Tensor  # [B, T, H] float32, h_{t+1}
    next_ids: torch.Tensor  # [B, T] int64, x_{t+1}
    image_mask: torch.Tensor  # [B, T] bool, x_{t+1} is an image token
    image_embeds: torch.Tensor  # [M, H] float32, rows for image_mask's True entries in row-major order
    attention_mask: torch.Tensor  # [B, T] bool, False on right padding
    loss_mask: torch.Tensor  # [B, T] bool
    sequence_lengths: torch.Tensor  # [B] int64, L of each sample (tokens, = valid slots + 1)

    def to(self, device: torch.device | str) -> DraftBatch:
        return DraftBatch(**{f.name: getattr(self, f.name).to(device) for f in fields(self)})


def sample_slots(sample: TargetSample) -> dict[str, torch.Tensor]:
    """The slot tensors of one sample (see the module docstring); requires L >= 2."""
    length = len(sample)
    if length < 2:
        raise ValueError(f"sample {sample.sample_id} has {length} token(s); a slot needs two")
    hidden = sample.hidden_states.float()
    loss_mask = torch.zeros(length - 1, dtype=torch.bool)
    loss_mask[: length - 2] = sample.answer_mask[2:]
    first_is_image = int(sample.image_mask[0])  # x_0's embedding is never a draft input
    return {
        "hidden_states": hidden[:-1],
        "target_hidden": hidden[1:],
        "next_ids": sample.input_ids[1:].long(),
        "image_mask": sample.image_mask[1:].bool(),
        "image_embeds": sample.image_embeds[first_is_image:].float(),
        "loss_mask": loss_mask,
    }


def _pad(rows: list[torch.Tensor], length: int) -> torch.Tensor:
    out = rows[0].new_zeros((len(rows), length, *rows[0].shape[1:]))
    for b, row in enumerate(rows):
        out[b, : len(row)] = row
    return out


def collate(samples: list[TargetSample]) -> DraftBatch:
    """Right-padded batch of samples (padding slots have attention and loss masks False)."""
    slots = [sample_slots(s) for s in samples]
    width = max(len(s["next_ids"]) for s in slots)
    attention = torch.zeros(len(slots), width, dtype=torch.bool)
    for b, s in enumerate(slots):
        attention[b, : len(s["next_ids"])] = True
    return DraftBatch(
        hidden_states=_pad([s["hidden_states"] for s in slots], width),
        target_hidden=_pad([s["target_hidden"] for s in slots], width),
        next_ids=_pad([s["next_ids"] for s in slots], width),
        image_mask=_pad([s["image_mask"] for s in slots], width),
        image_embeds=torch.cat([s["image_embeds"] for s in slots]),
        attention_mask=attention,
        loss_mask=_pad([s["loss_mask"] for s in slots], width),
        sequence_lengths=torch.tensor([len(s) for s in samples], dtype=torch.long),
    )
