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


def visible_key_positions(batch: PagedBatch) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's visible key positions in order, [B, Lv] int64, and [B, Lv] bool `exists` (Lv = most visible
    keys of any row; past a row's last visible key the position is 0, a written slot, and `exists` is False).

    Dropped spans are skipped here, so no dropped key is ever read: compact index c of row b is raw position
    c + the lengths of the row's dropped spans that start at or before it.
    """
    seq_lens = batch.seq_lens.long()[:, None]  # [B, 1]
    starts = batch.dropped_ranges[..., 0].clamp(max=seq_lens)  # [B, M], sorted and disjoint
    lengths = (batch.dropped_ranges[..., 1].clamp(max=seq_lens) - starts).clamp(min=0)
    gap_at = starts - (lengths.cumsum(dim=1) - lengths)  # compact index at which each dropped span sits
    visible_len = seq_lens[:, 0] - lengths.sum(dim=1)  # [B]
    index = torch.arange(max(int(visible_len.max()), 1), device=seq_lens.device)  # [Lv] (one host sync)
    positions = index + ((index[None, :, None] >= gap_at[:, None, :]) * lengths[:, None, :]).sum(dim=-1)
    exists = index[None, :] < visible_len[:, None]
    return torch.where(exists, positions, 0), exists


class TorchGatherAttention:
    """Writes the new K/V into the paged cache, gathers each request's visible keys and runs masked SDPA."""

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

        # Gather whole [Hkv * D] rows with index_select: cache row (2 * block + k|v) * block_size + offset.
        num_rows = batch.seq_lens.shape[0]
        device = query.device
        key_positions, exists = visible_key_positions(batch)  # [B, Lv]
        width = key_positions.shape[1]
        blocks = batch.block_table.long().gather(1, key_positions // block_size)
        key_rows = (blocks * 2 * block_size + key_positions % block_size).flatten()
        cache_rows = cache.view(-1, num_kv_heads * head_dim)
        keys = cache_rows.index_select(0, key_rows).view(num_rows, width, num_kv_heads, head_dim)
        values = cache_rows.index_select(0, key_rows + block_size).view(num_rows, width, num_kv_heads, head_dim)

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

        mask = exists[:, None, :] & (key_positions[:, None, :] <= query_pos[..., None])  # [B, Q, Lv]
        has_key = mask.any(dim=-1, keepdim=True)
        mask = mask | ~has_key  # keep SDPA finite on rows with nothing to see; zeroed below

        if num_kv_heads != num_heads:
            keys = keys.repeat_interleave(num_heads // num_kv_heads, dim=2)
            values = values.repeat_interleave(num_heads // num_kv_heads, dim=2)
        out = F.scaled_dot_product_attention(
            padded_q.transpose(1, 2),  # [B, H, Q, D]
            keys.transpose(1, 2),  # [B, H, Lv, D]
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
