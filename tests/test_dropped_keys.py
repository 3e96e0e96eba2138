"""Flagged heads: unmasked attention over the widened heads equals masked attention over the real ones."""

import pytest
import torch
from vispec_vllm.kernels.dropped_keys import FlaggedHeads, dropped_block_order

CPU_ATTN_SIZES = [32, 64, 80, 96, 112, 128, 160, 192, 224, 256, 512]  # vLLM 0.32 CPU_ATTN


def masked_reference(q, k, v, visible, scale):
    """q [T, H, D], k/v [L, H, D]; causal over keys that are `visible`, one query and head at a time."""
    out = torch.zeros_like(q)
    for t in range(q.shape[0]):
        keys = [p for p in range(t + 1) if visible[p]]
        for h in range(q.shape[1]):
            weights = torch.softmax((k[keys, h] @ q[t, h]) * scale, dim=0)
            out[t, h] = weights @ v[keys, h]
    return out


@pytest.mark.parametrize("head_dim,dtype,bias", [(32, torch.float32, True), (128, torch.float32, False),
                                                 (64, torch.bfloat16, True)])
def test_widened_projections_and_unmasked_attention_equal_masked_attention(head_dim, dtype, bias):
    torch.manual_seed(0)
    length, heads, hidden = 12, 3, 48
    scale = head_dim**-0.5
    flags = FlaggedHeads.for_backend(head_dim, scale, CPU_ATTN_SIZES.__contains__)
    x = torch.randn(length, hidden, dtype=dtype)
    weights = [torch.randn(heads * head_dim, hidden, dtype=dtype) / 3 for _ in range(3)]
    biases = [torch.randn(heads * head_dim, dtype=dtype) if bias else torch.zeros(heads * head_dim, dtype=dtype)
              for _ in range(3)]
    o_weight = torch.randn(hidden, heads * head_dim, dtype=dtype)
    dropped = torch.zeros(length, dtype=torch.bool)
    dropped[[2, 3, 4, 8]] = True  # two image spans' dropped slots

    q, k, v = (torch.nn.functional.linear(x, w, b).view(length, heads, head_dim) for w, b in zip(weights, biases,
                                                                                                  strict=True))
    expected = masked_reference(q.double(), k.double(), v.double(), ~dropped, scale).flatten(1) @ o_weight.double().T

    wide_biases = [flags.query_bias(biases[0], heads), flags.widen(biases[1], heads), flags.widen(biases[2], heads)]
    wide_q, wide_k, wide_v = (
        torch.nn.functional.linear(x, flags.widen(w, heads), b).view(length, heads, flags.padded_dim)
        for w, b in zip(weights, wide_biases, strict=True)
    )
    wide_k = flags.hide(wide_k, dropped)
    out = torch.nn.functional.scaled_dot_product_attention(
        wide_q.transpose(0, 1), wide_k.transpose(0, 1), wide_v.transpose(0, 1), is_causal=True, scale=scale
    ).transpose(0, 1)
    out = out.flatten(1) @ flags.widen(o_weight, heads, dim=1).T
    keep = ~dropped  # outputs at dropped slots are never read
    tolerance = 1e-4 if dtype == torch.float32 else 0.15
    torch.testing.assert_close(out[keep].double(), expected[keep], rtol=tolerance, atol=tolerance)
    assert not torch.equal(flags.hide(wide_k, ~dropped), wide_k)  # the flag really rewrites keys


def test_widening_zero_pads_each_head_and_flags_the_query_bias():
    flags = FlaggedHeads.for_backend(32, 32**-0.5, CPU_ATTN_SIZES.__contains__)
    weight = torch.randn(2 * 32, 7)
    wide = flags.widen(weight, 2).view(2, 64, 7)
    assert torch.equal(wide[:, :32].reshape(64, 7), weight) and not wide[:, 32:].any()
    o_weight = torch.randn(7, 2 * 32)
    assert torch.equal(flags.widen(o_weight, 2, dim=1).view(7, 2, 64)[..., :32].reshape(7, 64), o_weight)
    bias = flags.query_bias(torch.zeros(2 * 32), 2).view(2, 64)
    assert bias[:, 32].eq(128.0).all() and not bias[:, :32].any() and not bias[:, 33:].any()
    key = flags.hide(torch.randn(3, 2, 64), torch.tensor([True, False, True]))
    assert key[[0, 2], :, 32].eq(-128.0).all() and key[[0, 2]].count_nonzero() == 2 * 2
    assert flags.dropped_logit == -128.0 * 128.0 * 32**-0.5


@pytest.mark.parametrize("head_dim,gap", [(64, 2048.0), (128, 1448.15), (256, 1024.0), (1024, 512.0)])
def test_dropped_logit_sits_far_below_zero_for_every_usual_head_size(head_dim, gap):
    flags = FlaggedHeads.for_backend(head_dim, head_dim**-0.5, lambda size: True)
    assert -flags.dropped_logit == pytest.approx(gap, abs=0.01)


def test_a_softmax_scale_that_leaves_dropped_keys_too_close_is_refused():
    with pytest.raises(ValueError, match="only 256 below zero"):
        FlaggedHeads.for_backend(4096, 4096**-0.5, lambda size: True)


@pytest.mark.parametrize("head_dim,padded", [(32, 64), (64, 80), (128, 160), (256, 512)])
def test_padded_size_is_the_smallest_the_backend_accepts(head_dim, padded):
    assert FlaggedHeads.for_backend(head_dim, 1.0, CPU_ATTN_SIZES.__contains__).padded_dim == padded
    assert FlaggedHeads.for_backend(head_dim, 1.0, lambda size: size % 8 == 0).padded_dim == head_dim + 8
    assert FlaggedHeads.for_backend(head_dim, 1.0, [64, 128, 256, 512, 1024].__contains__).padded_dim == 2 * head_dim


def test_padded_size_is_aligned_even_for_backends_that_take_any_size():
    assert FlaggedHeads.for_backend(36, 1.0, lambda size: size >= 32).padded_dim == 40


def test_no_wider_head_size_is_a_clear_error():
    with pytest.raises(ValueError, match="no head size above the draft's 512"):
        FlaggedHeads.for_backend(512, 1.0, CPU_ATTN_SIZES.__contains__)


def paged_attention(q, cache, block_table, seq_len, block_size, scale):
    """One row like a paged kernel: keys [0, seq_len) read through `block_table`, queries aligned to the end."""
    slots = [int(block_table[p // block_size]) * block_size + p % block_size for p in range(seq_len)]
    k, v = cache[0, slots], cache[1, slots]  # [L, H, D]
    num_queries = q.shape[0]
    allowed = torch.arange(seq_len)[None, :] <= torch.arange(seq_len - num_queries, seq_len)[:, None]
    out = torch.nn.functional.scaled_dot_product_attention(
        q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), attn_mask=allowed, scale=scale
    )
    return out.transpose(0, 1)


def test_skipping_whole_dropped_blocks_changes_no_output():
    torch.manual_seed(0)
    block_size, heads, head_dim = 4, 2, 32
    scale = head_dim**-0.5
    flags = FlaggedHeads.for_backend(head_dim, scale, CPU_ATTN_SIZES.__contains__)
    block_table = torch.tensor([[7, 2, 9, 4, 0, 5], [3, 8, 1, 6, 0, 0]], dtype=torch.int32)
    # row 0: an image's dropped slots [3, 17) and [18, 19); row 1: none (padding spans start far away)
    spans = torch.tensor([[[3, 17], [18, 19]], [[2**62, 2**62], [2**62, 2**62]]])
    seq_lens, query_lens = [22, 13], [3, 2]
    cache = torch.zeros(2, 10 * block_size, heads, flags.padded_dim)
    for row, length in enumerate(seq_lens):
        slots = [int(block_table[row, p // block_size]) * block_size + p % block_size for p in range(length)]
        dropped = torch.tensor([any(a <= p < b for a, b in spans[row].tolist()) for p in range(length)])
        k = torch.zeros(length, heads, flags.padded_dim)
        k[..., :head_dim] = torch.randn(length, heads, head_dim)
        cache[0, slots], cache[1, slots] = flags.hide(k, dropped), torch.randn(length, heads, flags.padded_dim)
    query_start = torch.tensor([s - q for s, q in zip(seq_lens, query_lens, strict=True)])
    order, skipped = dropped_block_order(spans, query_start, block_table.shape[1], block_size)
    table = block_table.gather(1, order)
    # row 0: blocks [4, 8), [8, 12), [12, 16) are all dropped and end before the first query (19); [16, 20) is not
    assert skipped.tolist() == [12, 0]
    assert table[0].tolist() == [7, 0, 5, 2, 9, 4] and table[1].tolist() == block_table[1].tolist()
    for row in range(2):
        q = torch.randn(query_lens[row], heads, flags.padded_dim)
        q[..., head_dim] = flags.query_flag
        full = paged_attention(q, cache, block_table[row], seq_lens[row], block_size, scale)
        short = paged_attention(q, cache, table[row], seq_lens[row] - int(skipped[row]), block_size, scale)
        torch.testing.assert_close(short, full)


def test_blocks_the_queries_may_cut_are_kept():
    block_table = torch.arange(6, dtype=torch.int32)[None]
    spans = torch.tensor([[[0, 24]]])
    # queries start at 10: only [0, 4) and [4, 8) end before them
    order, skipped = dropped_block_order(spans, torch.tensor([10]), num_blocks=6, block_size=4)
    assert skipped.tolist() == [8] and block_table.gather(1, order)[0].tolist() == [2, 3, 4, 5, 0, 1]
