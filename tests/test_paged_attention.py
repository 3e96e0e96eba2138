"""The draft's paged attention equals dense causal attention over each request's visible keys."""

import math

import pytest
import torch
from vispec_vllm.kernels.paged_attention import PagedBatch, TorchGatherAttention

BLOCK = 4
HEADS, KV_HEADS, DIM = 4, 2, 8


def dense_reference(q, k_all, v_all, positions, visible):
    """One request: q [Q, H, D] at `positions`, keys k_all [L, Hkv, D]; loops over queries and heads."""
    out = torch.zeros_like(q)
    group = HEADS // KV_HEADS
    for i, pos in enumerate(positions.tolist()):
        keys = [p for p in range(pos + 1) if visible[p]]
        if not keys:
            continue
        for h in range(HEADS):
            kh = k_all[keys, h // group]
            scores = (kh @ q[i, h]) / math.sqrt(DIM)
            out[i, h] = torch.softmax(scores, dim=0) @ v_all[keys, h // group]
    return out


def key_visibility(batch, key_positions):
    """[B, L]: key p of row b exists and lies in none of the row's dropped spans (written independently)."""
    rows = []
    for b in range(batch.seq_lens.shape[0]):
        spans = batch.dropped_ranges[b].tolist()
        rows.append([p < batch.seq_lens[b] and not any(a <= p < e for a, e in spans) for p in key_positions.tolist()])
    return torch.tensor(rows)


def make_cache(num_blocks):
    # vLLM hands the layer a tensor of its own shape; only its size matters to the draft layer.
    return torch.full((num_blocks, KV_HEADS, BLOCK, 2 * DIM), float("nan"))


@pytest.mark.parametrize("dropped", [[], [(2, 7)], [(1, 3), (6, 9)]])
def test_prefill_then_decode_matches_dense(dropped):
    torch.manual_seed(0)
    lengths = [11, 6]
    cache = make_cache(16)
    block_table = torch.tensor([[5, 2, 9, 0], [7, 1, 0, 0]], dtype=torch.int32)
    k_full = [torch.randn(n + 1, KV_HEADS, DIM) for n in lengths]
    v_full = [torch.randn(n + 1, KV_HEADS, DIM) for n in lengths]
    q_full = [torch.randn(n + 1, HEADS, DIM) for n in lengths]
    ranges = torch.full((2, 2, 2), 10**9, dtype=torch.int64)
    for m, (a, b) in enumerate(dropped):
        ranges[0, m] = torch.tensor([a, b])

    def slots(row, pos):
        return int(block_table[row, pos // BLOCK]) * BLOCK + pos % BLOCK

    attention = TorchGatherAttention()
    # prefill: all tokens of both rows at once
    qsl = torch.tensor([0, lengths[0], sum(lengths)])
    positions = torch.cat([torch.arange(n) for n in lengths])
    batch = PagedBatch(
        query_start_loc=qsl,
        query_positions=positions,
        seq_lens=torch.tensor(lengths),
        block_table=block_table,
        slot_mapping=torch.tensor([slots(r, p) for r, n in enumerate(lengths) for p in range(n)]),
        block_size=BLOCK,
        max_query_len=max(lengths),
        max_seq_len=max(lengths),
        dropped_ranges=ranges,
    )
    q = torch.cat([q_full[r][:n] for r, n in enumerate(lengths)])
    k = torch.cat([k_full[r][:n] for r, n in enumerate(lengths)])
    v = torch.cat([v_full[r][:n] for r, n in enumerate(lengths)])
    out = attention(q, k, v, cache, batch, scale=DIM**-0.5)
    visible = key_visibility(batch, torch.arange(max(lengths) + 1))
    for r, n in enumerate(lengths):
        ref = dense_reference(q_full[r][:n], k_full[r], v_full[r], torch.arange(n), visible[r])
        torch.testing.assert_close(out[qsl[r] : qsl[r + 1]], ref)

    # one decode token per row, reading the prefill KV back from the paged cache
    decode = PagedBatch(
        query_start_loc=torch.tensor([0, 1, 2]),
        query_positions=torch.tensor(lengths),
        seq_lens=torch.tensor(lengths) + 1,
        block_table=block_table,
        slot_mapping=torch.tensor([slots(r, n) for r, n in enumerate(lengths)]),
        block_size=BLOCK,
        max_query_len=1,
        max_seq_len=max(lengths) + 1,
        dropped_ranges=ranges,
    )
    q1 = torch.stack([q_full[r][n] for r, n in enumerate(lengths)])
    k1 = torch.stack([k_full[r][n] for r, n in enumerate(lengths)])
    v1 = torch.stack([v_full[r][n] for r, n in enumerate(lengths)])
    out1 = attention(q1, k1, v1, cache, decode, scale=DIM**-0.5)
    for r, n in enumerate(lengths):
        vis = key_visibility(decode, torch.arange(n + 1))[r]
        ref = dense_reference(q1[r : r + 1], k_full[r], v_full[r], torch.tensor([n]), vis)
        torch.testing.assert_close(out1[r : r + 1], ref)
    assert torch.isfinite(out1).all()


def test_dropped_keys_do_not_leak():
    """Changing K/V inside a dropped span changes nothing; changing a visible key does."""
    torch.manual_seed(1)
    n = 9
    block_table = torch.tensor([[0, 1, 2]], dtype=torch.int32)
    q, k, v = torch.randn(n, HEADS, DIM), torch.randn(n, KV_HEADS, DIM), torch.randn(n, KV_HEADS, DIM)

    def run(k, v):
        batch = PagedBatch(
            query_start_loc=torch.tensor([0, n]),
            query_positions=torch.arange(n),
            seq_lens=torch.tensor([n]),
            block_table=block_table,
            slot_mapping=torch.arange(n),
            block_size=BLOCK,
            max_query_len=n,
            max_seq_len=n,
            dropped_ranges=torch.tensor([[[2, 6]]]),
        )
        return TorchGatherAttention()(q, k, v, make_cache(3), batch, scale=DIM**-0.5)

    base = run(k, v)
    k2, v2 = k.clone(), v.clone()
    k2[3], v2[4] = 100.0, -100.0
    torch.testing.assert_close(run(k2, v2)[6:], base[6:])
    k2[7] = 100.0
    assert not torch.allclose(run(k2, v2)[8], base[8])
