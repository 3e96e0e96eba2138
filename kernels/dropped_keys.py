"""Hiding dropped image keys from vLLM's own paged attention kernels.

ViSpec's draft must never attend to the raw image slots it dropped (all of an image's slots but the last
num_q-1). vLLM's paged kernels (CPU_ATTN, FlashAttention, ...) take no mask, only causality. So the draft layer
widens each head by a few coordinates and uses the first extra one as a "dropped" flag:

    query:  q' = [q, +a, 0, ...]
    key:    k' = [k, 0, 0, ...]  at a visible slot,   [0, -a, 0, ...]  at a dropped slot
    value:  v' = [v, 0, 0, ...]                      output: out'[..., :head_dim]

so q'.k' = q.k at visible keys and -a^2 at dropped ones. With a^2 * scale = MASKED_LOGIT the dropped logits sit
3e4 below any real logit and exp() underflows to exactly 0 in float32 (and bf16/fp16, whose exponent range is
float32's or whose softmax kernels accumulate in float32): the same result as a -inf mask for every query that
sees at least one visible key. (A query with only dropped keys sits at a dropped slot; its output is unused.)

The draft KV then sits 1:1 in the target's slots, in vLLM's own layout, read and written by vLLM's kernels:
prefix caching, chunked prefill and the scheduler need nothing special. The cost is the wider head: the
smallest size the platform's backend accepts (CPU_ATTN: 32 -> 64, 64 -> 80, 128 -> 160; FlashAttention: the
next multiple of 8).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

MASKED_LOGIT = 3.0e4  # how far below zero a dropped key's scaled logit sits


@dataclass(frozen=True)
class FlaggedHeads:
    """The head widening for one attention layer (see the module docstring)."""

    head_dim: int  # the draft's own head size
    padded_dim: int  # the size vLLM's attention layer is built with (> head_dim)
    flag: float  # a: the flag coordinate's magnitude

    @classmethod
    def for_backend(cls, head_dim: int, scale: float, supports_head_size: Callable[[int], bool]) -> FlaggedHeads:
        """The smallest accepted head size above `head_dim` (the flag needs one spare coordinate)."""
        padded = next((size for size in range(head_dim + 1, 4 * head_dim + 65) if supports_head_size(size)), None)
        if padded is None:
            raise ValueError(
                f"the attention backend accepts no head size above the draft's {head_dim}: ViSpec needs one spare "
                "coordinate per head to hide dropped image keys"
            )
        return cls(head_dim=head_dim, padded_dim=padded, flag=math.sqrt(MASKED_LOGIT / scale))

    @property
    def extra(self) -> int:
        return self.padded_dim - self.head_dim

    def query(self, q: torch.Tensor) -> torch.Tensor:
        """[T, heads, head_dim] -> [T, heads, padded_dim]: [q, +a, 0...]."""
        tail = q.new_zeros(self.extra)
        tail[0] = self.flag
        return torch.cat([q, tail.expand(*q.shape[:-1], self.extra)], dim=-1)

    def key_value(
        self, k: torch.Tensor, v: torch.Tensor, dropped: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """k, v [T, kv_heads, head_dim]; dropped [T] bool or None (none dropped) -> both [T, kv_heads, padded_dim]."""
        zeros = k.new_zeros(*k.shape[:-1], self.extra)
        k, v = torch.cat([k, zeros], dim=-1), torch.cat([v, zeros], dim=-1)
        if dropped is None:
            return k, v
        dropped_key = k.new_zeros(self.padded_dim)  # [0..., -a, 0...]
        dropped_key[self.head_dim] = -self.flag
        return torch.where(dropped[:, None, None], dropped_key, k), v

    def output(self, out: torch.Tensor) -> torch.Tensor:
        """[T, heads, padded_dim] -> [T, heads * head_dim]."""
        return out[..., : self.head_dim].reshape(out.shape[0], -1)
