"""Flagged heads: unmasked attention over the widened heads equals masked attention over the real ones."""

import pytest
import torch
from vispec_vllm.kernels.dropped_keys import FlaggedHeads

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


@pytest.mark.parametrize("head_dim,dtype", [(32, torch.float32), (128, torch.float32), (64, torch.bfloat16)])
def test_widened_unmasked_attention_equals_masked_attention(head_dim, dtype):
    torch.manual_seed(0)
    length, heads = 12, 3
    scale = head_dim**-0.5
    flags = FlaggedHeads.for_backend(head_dim, scale, CPU_ATTN_SIZES.__contains__)
    q, k, v = (4 * torch.randn(length, heads, head_dim, dtype=dtype) for _ in range(3))
    dropped = torch.zeros(length, dtype=torch.bool)
    dropped[[2, 3, 4, 8]] = True  # two image spans' dropped slots
    wide_k, wide_v = flags.key_value(k, v, dropped)
    wide = torch.nn.functional.scaled_dot_product_attention(
        flags.query(q).transpose(0, 1), wide_k.transpose(0, 1), wide_v.transpose(0, 1), is_causal=True, scale=scale
    ).transpose(0, 1)
    out = flags.output(wide).view(length, heads, head_dim)
    expected = masked_reference(q.double(), k.double(), v.double(), ~dropped, scale)
    keep = ~dropped  # queries at dropped slots are never read
    tolerance = 1e-5 if dtype == torch.float32 else 3e-2
    torch.testing.assert_close(out[keep].double(), expected[keep], rtol=tolerance, atol=tolerance)
    unflagged = flags.key_value(k, v, None)[0]
    assert not torch.equal(unflagged, wide_k)  # the flag really changed the dropped keys


def test_keys_without_drops_are_zero_padded():
    flags = FlaggedHeads.for_backend(32, 32**-0.5, CPU_ATTN_SIZES.__contains__)
    k, v = torch.randn(5, 2, 32), torch.randn(5, 2, 32)
    wide_k, wide_v = flags.key_value(k, v, None)
    assert wide_k.shape == (5, 2, 64) and torch.equal(wide_k[..., :32], k) and not wide_k[..., 32:].any()
    assert torch.equal(wide_v[..., :32], v) and not wide_v[..., 32:].any()
    q = flags.query(torch.randn(5, 4, 32))
    assert q[..., 32].eq(flags.flag).all() and not q[..., 33:].any()
    assert flags.flag**2 * 32**-0.5 == pytest.approx(3.0e4)


@pytest.mark.parametrize("head_dim,padded", [(32, 64), (64, 80), (128, 160), (256, 512)])
def test_padded_size_is_the_smallest_the_backend_accepts(head_dim, padded):
    assert FlaggedHeads.for_backend(head_dim, 1.0, CPU_ATTN_SIZES.__contains__).padded_dim == padded
    assert FlaggedHeads.for_backend(head_dim, 1.0, lambda size: size % 8 == 0).padded_dim == head_dim + 8


def test_no_wider_head_size_is_a_clear_error():
    with pytest.raises(ValueError, match="no head size above the draft's 512"):
        FlaggedHeads.for_backend(512, 1.0, CPU_ATTN_SIZES.__contains__)
