"""Paged attention for the ViSpec draft layer: causal, and blind to dropped image slots.

The draft layer owns a vLLM `Attention` layer only so that vLLM allocates, profiles and block-manages its KV
cache in the target's KV group (same block table, same slots: draft KV for position p lives in the target's
slot for p). Reading and writing that cache is done here, because no vLLM backend can hide a middle span of
keys (CPU_ATTN has no mask input). The draft layer is the only reader and writer of its cache tensor, so the
memory layout inside each block is ours: `[2 (k|v), block_size, num_kv_heads, head_dim]`.

`DraftAttentionBackend` is the seam for a GPU kernel; `TorchGatherAttention` (vectorised gather + SDPA, no
Python loop over requests) runs on CPU and CUDA.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F


@dataclass
class PagedBatch:
    """Where each query token sits, and which keys each request may see.

    T = query tokens this forward, B = requests, L = max key length in the batch.
    """

    query_start_loc: torch.Tensor  # [B + 1] int, query tokens of row b are [qsl[b], qsl[b+1])
    query_positions: torch.Tensor  # [T] int64, raw token index of each query (its causal horizon)
    seq_lens: torch.Tensor  # [B] int, keys [0, seq_len) of row b are in the cache after this write
    block_table: torch.Tensor  # [B, max_blocks] int32
    slot_mapping: torch.Tensor  # [T] int64, -1 = do not write
    block_size: int
    max_query_len: int
    max_seq_len: int
    dropped_ranges: torch.Tensor  # [B, M, 2] int64 half-open [start, end) key spans no query may see


class DraftAttentionBackend(Protocol):
    def __call__(
        self,
        query: torch.Tensor,  # [T, num_heads, head_dim]
        key: torch.Tensor,  # [T, num_kv_heads, head_dim]
        value: torch.Tensor,  # [T, num_kv_heads, head_dim]
        kv_cache: torch.Tensor,  # the layer's cache tensor as vLLM allocated it
        batch: PagedBatch,
        scale: float,
    ) -> torch.Tensor:  # [T, num_heads, head_dim]
        ...


def blocks_view(kv_cache: torch.Tensor, block_size: int, num_kv_heads: int, head_dim: int) -> torch.Tensor:
    """View vLLM's per-layer cache tensor as `[num_blocks, 2, block_size, num_kv_heads, head_dim]`."""
    if not kv_cache.is_contiguous():
        raise RuntimeError("ViSpec draft KV cache must be contiguous (got a strided cache tensor)")
    per_block = 2 * block_size * num_kv_heads * head_dim
    if kv_cache.numel() % per_block:
        raise RuntimeError(
            f"ViSpec draft KV cache has {kv_cache.numel()} elements, not a multiple of one block ({per_block})"
        )
    return kv_cache.view(-1, 2, block_size, num_kv_heads, head_dim)


def key_visibility(batch: PagedBatch, key_positions: torch.Tensor) -> torch.Tensor:
    """[B, L] bool: key p of row b exists (p < seq_len) and is not inside a dropped image span."""
    exists = key_positions[None, :] < batch.seq_lens[:, None].to(torch.int64)
    starts = batch.dropped_ranges[..., 0][:, None, :]  # [B, 1, M]
    ends = batch.dropped_ranges[..., 1][:, None, :]
    p = key_positions[None, :, None]
    dropped = ((p >= starts) & (p < ends)).any(dim=-1)
    return exists & ~dropped


class TorchGatherAttention:
    """Writes the new K/V into the paged cache, gathers each request's keys and runs masked SDPA."""

    def __call__(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        kv_cache: torch.Tensor,
        batch: PagedBatch,
        scale: float,
    ) -> torch.Tensor:
        num_tokens, num_heads, head_dim = query.shape
        num_kv_heads = key.shape[1]
        block_size = batch.block_size
        cache = blocks_view(kv_cache, block_size, num_kv_heads, head_dim)
        self._write(cache, key, value, batch.slot_mapping, block_size)

        num_rows = batch.seq_lens.shape[0]
        device = query.device
        key_positions = torch.arange(batch.max_seq_len, device=device)
        block_idx = batch.block_table[:, key_positions // block_size].long()  # [B, L]
        offsets = (key_positions % block_size).expand(num_rows, -1)  # [B, L]
        visible = key_visibility(batch, key_positions)  # [B, L]
        keys = cache[block_idx, 0, offsets]  # [B, L, Hkv, D]
        values = cache[block_idx, 1, offsets]
        zero = torch.zeros((), dtype=keys.dtype, device=device)
        keys = torch.where(visible[..., None, None], keys, zero)  # unwritten slots may hold NaN
        values = torch.where(visible[..., None, None], values, zero)

        # Scatter the flat query tokens into a padded [B, Q] grid.
        qsl = batch.query_start_loc.long()
        row_of_token = torch.repeat_interleave(
            torch.arange(num_rows, device=device), qsl[1:] - qsl[:-1], output_size=num_tokens
        )
        col_of_token = torch.arange(num_tokens, device=device) - qsl[row_of_token]
        padded_q = query.new_zeros(num_rows, batch.max_query_len, num_heads, head_dim)
        padded_q[row_of_token, col_of_token] = query
        query_pos = torch.full((num_rows, batch.max_query_len), -1, dtype=torch.int64, device=device)
        query_pos[row_of_token, col_of_token] = batch.query_positions

        mask = visible[:, None, :] & (key_positions[None, None, :] <= query_pos[..., None])  # [B, Q, L]
        has_key = mask.any(dim=-1, keepdim=True)
        mask = mask | ~has_key  # keep SDPA finite on rows with nothing to see; zeroed below

        if num_kv_heads != num_heads:
            keys = keys.repeat_interleave(num_heads // num_kv_heads, dim=2)
            values = values.repeat_interleave(num_heads // num_kv_heads, dim=2)
        out = F.scaled_dot_product_attention(
            padded_q.transpose(1, 2),  # [B, H, Q, D]
            keys.transpose(1, 2),  # [B, H, L, D]
            values.transpose(1, 2),
            attn_mask=mask[:, None],
            scale=scale,
        ).transpose(1, 2)  # [B, Q, H, D]
        out = out * has_key[..., None].to(out.dtype)
        return out[row_of_token, col_of_token]

    @staticmethod
    def _write(
        cache: torch.Tensor, key: torch.Tensor, value: torch.Tensor, slots: torch.Tensor, block_size: int
    ) -> None:
        keep = slots >= 0
        slots = slots[keep].long()
        block, offset = slots // block_size, slots % block_size
        cache[block, 0, offset] = key[keep].to(cache.dtype)
        cache[block, 1, offset] = value[keep].to(cache.dtype)
