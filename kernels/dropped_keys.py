"""Hiding dropped image keys from vLLM's own paged attention kernels.

ViSpec's draft must never attend to the raw image slots it dropped (all of an image's slots but the last
num_q-1). vLLM's paged kernels (CPU_ATTN, FlashAttention, ...) take no mask, only causality. So the draft layer
widens each head by a few coordinates and uses the first extra one as a "dropped" flag:

    query:  q' = [q, +Q, 0, ...]
    key:    k' = [k, 0, 0, ...]  at a visible slot,   [0, -K, 0, ...]  at a dropped slot
    value:  v' = [v, 0, 0, ...]                      o_proj reads only the first head_dim of each head

so q'.k' = q.k at visible keys and -Q*K at dropped ones, whatever q is: every dropped key's scaled logit is
`dropped_logit` = -Q*K*scale. The flags are Q = K = 128 = 2**7:

* exact everywhere the flags are stored: 128 is exact in bf16, fp16, float8_e4m3fn (max finite 448) and
  float8_e5m2 (max 57344), and every other coordinate of a flag is 0 (also exact). An fp8 KV cache stores
  k'/s for a per-tensor scale s: for every power of two s >= 1/2 the key flag is stored and read back exactly,
  for any s >= 128/448 = 2/7 it stays in range (rounded to the format's mantissa: within 1/8). Below that a
  saturating cast (vLLM's CUDA cache writes, torch 2.13's `.to(float8_e4m3fn)`) reads back 448*s, which only
  shrinks the gap; a non-saturating one would give NaN, as it would for any out-of-range key. The same holds
  for q' where a kernel also quantises the query (FlashAttention-3 fp8).
* far enough below: Q*K*scale = 16384/sqrt(head_dim) is 2048, 1832, 1448, 1024 for head_dim 64, 80, 128,
  256. exp() is exactly 0 in float32 from -103.98 down, so a dropped key gets weight exactly 0 in every
  row whose largest visible logit is above dropped_logit + 104, the same result as a -inf mask (softmax
  kernels accumulate in float32; FlashAttention's online rescale exp(m_old - m_new) is then exactly 0 too when
  a block of dropped keys came first). `FlaggedHeads` refuses a softmax scale that puts the dropped logits
  less than MIN_MASK_GAP below zero (head_dim > 1024 at the usual head_dim**-0.5).
* no larger: larger flags would leave fp8 range at scale 1 (the earlier flag sqrt(3e4/scale) is 582.6 for
  head_dim 128, beyond e4m3fn's 448) and Q*K = 16384 keeps q'.k' finite even in fp16.
A query with only dropped keys sits at a dropped slot; its output is unused.

The widening is done once, on the weights: q/k/v projection rows and o_proj columns get zeros for the extra
coordinates and the q bias gets +Q on the flag coordinate; RoPE rotates only the first head_dim coordinates.
So the GEMMs emit q', k', v' directly and the only op added per forward is `hide` on the keys of dropped slots.
The draft KV sits 1:1 in the target's slots, in vLLM's own layout, read and written by vLLM's kernels: prefix
caching, chunked prefill and the scheduler need nothing special. The cost is the wider head: the smallest
size the platform's backend accepts (CPU_ATTN: 32 -> 64, 64 -> 80, 128 -> 160; FlashAttention: +8; FlashInfer:
the next power of two).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

QUERY_FLAG = 128.0  # Q: the query's flag coordinate (2**7, exact in fp8/bf16/fp16)
KEY_FLAG = 128.0  # K: minus a dropped key's flag coordinate
MIN_MASK_GAP = 512.0  # the least distance below zero allowed for a dropped key's scaled logit


@dataclass(frozen=True)
class FlaggedHeads:
    """The head widening for one attention layer (see the module docstring)."""

    head_dim: int  # the draft's own head size
    padded_dim: int  # the size vLLM's attention layer is built with (> head_dim)
    scale: float  # the attention layer's softmax scale
    query_flag: float = QUERY_FLAG
    key_flag: float = KEY_FLAG

    def __post_init__(self) -> None:
        if -self.dropped_logit < MIN_MASK_GAP:
            raise ValueError(
                f"softmax scale {self.scale} puts dropped image keys only {-self.dropped_logit:g} below zero "
                f"(at least {MIN_MASK_GAP:g} is needed for their weights to be exactly 0)"
            )

    @property
    def dropped_logit(self) -> float:
        """The scaled logit every dropped key gets, whatever the query: -Q*K*scale."""
        return -self.query_flag * self.key_flag * self.scale

    @classmethod
    def for_backend(cls, head_dim: int, scale: float, supports_head_size: Callable[[int], bool]) -> FlaggedHeads:
        """The smallest accepted multiple of 8 above `head_dim` (the flag needs one spare coordinate; kernels
        want aligned heads, and a backend that pads heads to a power of two pays that anyway)."""
        sizes = range(head_dim // 8 * 8 + 8, 4 * head_dim + 65, 8)
        padded = next((size for size in sizes if supports_head_size(size)), None)
        if padded is None:
            raise ValueError(
                f"the attention backend accepts no head size above the draft's {head_dim}: ViSpec needs one spare "
                "coordinate per head to hide dropped image keys"
            )
        return cls(head_dim=head_dim, padded_dim=padded, scale=scale)

    def widen(self, tensor: torch.Tensor, num_heads: int, dim: int = 0) -> torch.Tensor:
        """Zero-pad each head's block along `dim`: [.., num_heads * head_dim, ..] -> [.., num_heads * padded_dim, ..].
        For q/k/v projection weights and biases (dim 0) and the o_proj weight (dim 1)."""
        moved = tensor.movedim(dim, 0)
        heads = moved.reshape(num_heads, self.head_dim, *moved.shape[1:])
        wide = heads.new_zeros(num_heads, self.padded_dim, *moved.shape[1:])
        wide[:, : self.head_dim] = heads
        return wide.reshape(num_heads * self.padded_dim, *moved.shape[1:]).movedim(0, dim)

    def query_bias(self, bias: torch.Tensor, num_heads: int) -> torch.Tensor:
        """[num_heads * head_dim] q bias (zeros if the draft has none) -> widened, with +Q on each flag coordinate."""
        wide = self.widen(bias, num_heads).view(num_heads, self.padded_dim)
        wide[:, self.head_dim] = self.query_flag
        return wide.flatten()

    def hide(self, key: torch.Tensor, dropped: torch.Tensor) -> torch.Tensor:
        """key [T, kv_heads, padded_dim] (widened, RoPE applied); dropped [T] bool -> [0..., -K, 0...] where dropped."""
        dropped_key = key.new_zeros(self.padded_dim)
        dropped_key[self.head_dim] = -self.key_flag
        return torch.where(dropped[:, None, None], dropped_key, key)


def dropped_block_order(
    dropped_spans: torch.Tensor,  # [B, M, 2] int64 half-open [start, end) slot spans that no query may see
    query_start: torch.Tensor,  # [B] int64 raw position of each row's first query token
    num_blocks: int,  # block-table width
    block_size: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Take whole dropped blocks out of each row's key sequence, so the kernel does not even read them.

    A block is taken out when all its slots are dropped and it ends at or before the row's first query: then
    every query of the row sees all of it (causality never cuts it) and all of it is masked anyway. Keys keep
    the RoPE of their raw positions and the kernel only aligns queries to the end of the key sequence, so
    shortening the front of the sequence by whole blocks changes nothing but the work. Returns the column
    order that moves taken-out blocks past each row's end (`block_table.gather(1, order)`, [B, num_blocks])
    and the keys taken out per row ([B]). The KV writes (slot mapping) keep using the real block table.
    """
    block_start = torch.arange(num_blocks, device=dropped_spans.device) * block_size  # [num_blocks]
    start, end = dropped_spans[..., :1], dropped_spans[..., 1:]  # [B, M, 1]
    inside = ((block_start >= start) & (block_start + block_size <= end)).any(dim=1)  # [B, num_blocks]
    skip = inside & (block_start + block_size <= query_start[:, None])
    return torch.argsort(skip.to(torch.int8), dim=1, stable=True), skip.sum(dim=1) * block_size
