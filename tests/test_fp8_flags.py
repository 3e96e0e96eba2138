"""Flagged heads under an fp8 KV cache: dropped keys keep weight exactly 0 after the cache's quantisation.

An fp8 KV cache stores k'/s for a per-tensor scale s and reads stored*s back; FlashAttention-3's fp8 path
quantises q' the same way. Every case here round-trips the widened keys and values (and, separately, the
queries too) through float8_e4m3fn and float8_e5m2 with three casts: torch's plain `.to()`, a saturating one
(clamp to the finite max first, as vLLM's CUDA cache writes do) and a non-saturating one (NaN beyond the
finite max, as older torch releases and non-saturating hardware conversions give). Attention over all keys
must then put weight exactly 0 on dropped keys and equal attention over the visible keys alone.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from vispec_vllm.kernels.dropped_keys import KEY_FLAG, QUERY_FLAG, FlaggedHeads

FORMATS = (torch.float8_e4m3fn, torch.float8_e5m2)
CASTS = ("plain", "saturating", "non_saturating")
SCALES = (1.0, 0.5, 4.0, 0.3)  # per-tensor quantisation scales: stored = x / s, read = stored * s
HEADS, HIDDEN, LENGTH = 2, 48, 24
DROPPED_SLOTS = [0, 1, 2, 7, 8, 9, 10, 11, 12, 16, 17]  # an image at the very start, two more later
BACKENDS = {
    "flash_attn": lambda size: True,  # any multiple of 8: head + 8
    "flashinfer": lambda size: size & (size - 1) == 0,  # powers of two
}


def fp8_round_trip(x: torch.Tensor, fp8: torch.dtype, scale: float, cast: str) -> torch.Tensor:
    """x stored in `fp8` at per-tensor `scale` and read back, in float32."""
    stored = x.float() / scale
    finite_max = torch.finfo(fp8).max
    if cast == "saturating":
        stored = stored.clamp(-finite_max, finite_max)
    elif cast == "non_saturating":
        stored = torch.where(stored.abs() > finite_max, torch.nan, stored)
    return stored.to(fp8).float() * scale


def widened_qkv(flags: FlaggedHeads, dropped: torch.Tensor, seed: int) -> tuple[torch.Tensor, ...]:
    """q' [T, HEADS, padded], k' and v' [T, HEADS, padded] from random projections widened by `flags`."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(LENGTH, HIDDEN, generator=generator)
    width = HEADS * flags.head_dim
    # entries of q and k ~ N(0, 2): real scaled logits ~ N(0, 4), as in a trained layer
    weights = [torch.randn(width, HIDDEN, generator=generator) * (2 / HIDDEN) ** 0.5 for _ in range(3)]
    biases = [torch.randn(width, generator=generator) * 0.1 for _ in range(3)]
    q = F.linear(x, flags.widen(weights[0], HEADS), flags.query_bias(biases[0], HEADS))
    k = F.linear(x, flags.widen(weights[1], HEADS), flags.widen(biases[1], HEADS))
    v = F.linear(x, flags.widen(weights[2], HEADS), flags.widen(biases[2], HEADS))
    q, k, v = (t.view(LENGTH, HEADS, flags.padded_dim) for t in (q, k, v))
    return q, flags.hide(k, dropped), v


def attention(q, k, v, allowed, scale):
    """q [T, H, D], k/v [L, H, D], allowed [T, L] bool -> output [T, H, D], weights [H, T, L]."""
    logits = torch.einsum("thd,lhd->htl", q, k) * scale
    weights = torch.softmax(logits.masked_fill(~allowed, -math.inf), dim=-1)
    return torch.einsum("htl,lhd->thd", weights, v), weights


def dropped_mask() -> torch.Tensor:
    dropped = torch.zeros(LENGTH, dtype=torch.bool)
    dropped[DROPPED_SLOTS] = True
    return dropped


def fused_attention(q, k, v, scale, allowed=None):
    """torch's fused SDPA (CPU flash kernel): causal without `allowed` [T, L] bool, masked with it."""
    out = F.scaled_dot_product_attention(q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), attn_mask=allowed,
                                         is_causal=allowed is None, scale=scale)
    return out.transpose(0, 1)


def check_masking(flags, q, k, v, dropped, compute_dtype):
    """Attention over all keys (q', k', v' already read back from fp8) equals attention over the visible ones,
    each computed the same way (explicit softmax and fused SDPA) in `compute_dtype`, at its default tolerance."""
    q, k, v = (t.to(compute_dtype) for t in (q, k, v))
    causal = torch.ones(LENGTH, LENGTH, dtype=torch.bool).tril()
    rows = (causal & ~dropped).any(dim=1)  # queries that see a visible key (the others' outputs are unused)
    visible = ~dropped
    only_visible = (q[rows], k[visible], v[visible])
    out, weights = attention(q, k, v, causal, flags.scale)
    assert not out.isnan().any() and not weights.isnan().any()
    assert weights[:, rows][..., dropped].eq(0.0).all()
    expected, _ = attention(*only_visible, causal[rows][:, visible], flags.scale)
    torch.testing.assert_close(out[rows], expected)
    fused = fused_attention(q, k, v, flags.scale)
    assert not fused.isnan().any()
    torch.testing.assert_close(fused[rows], fused_attention(*only_visible, flags.scale, causal[rows][:, visible]))


@pytest.mark.parametrize("quantised", ["kv", "qkv"])
@pytest.mark.parametrize("cast", CASTS)
@pytest.mark.parametrize("fp8", FORMATS, ids=str)
@pytest.mark.parametrize("backend", sorted(BACKENDS))
@pytest.mark.parametrize("head_dim", [64, 80, 128, 256])
def test_dropped_keys_get_exactly_zero_weight_after_fp8_round_trips(head_dim, backend, fp8, cast, quantised):
    flags = FlaggedHeads.for_backend(head_dim, head_dim**-0.5, BACKENDS[backend])
    dropped = dropped_mask()
    q, k, v = widened_qkv(flags, dropped, seed=head_dim)
    for scale in SCALES:
        k_read, v_read = (fp8_round_trip(t, fp8, scale, cast) for t in (k, v))
        q_read = fp8_round_trip(q, fp8, scale, cast) if quantised == "qkv" else q
        key_flags = k_read[dropped][..., flags.head_dim]
        query_flags = q_read[..., flags.head_dim]
        if math.log2(scale).is_integer():  # the flags are stored exactly
            assert key_flags.eq(-KEY_FLAG).all() and query_flags.eq(QUERY_FLAG).all()
        else:  # rounded to fp8's 2 or 3 mantissa bits, never out of range
            torch.testing.assert_close(key_flags, torch.full_like(key_flags, -KEY_FLAG), rtol=1 / 8, atol=0)
            torch.testing.assert_close(query_flags, torch.full_like(query_flags, QUERY_FLAG), rtol=1 / 8, atol=0)
        assert k_read[~dropped][..., flags.head_dim:].eq(0.0).all()  # visible keys' extra coordinates stay 0
        check_masking(flags, q_read, k_read, v_read, dropped, torch.float32)
        check_masking(flags, q_read, k_read, v_read, dropped, torch.bfloat16)


def test_long_sequence_whose_first_kv_blocks_are_all_dropped():
    """Online-softmax kernels see a whole block of dropped keys first: its running max must be rescaled away."""
    head_dim, length = 128, 1100
    flags = FlaggedHeads.for_backend(head_dim, head_dim**-0.5, lambda size: True)
    generator = torch.Generator().manual_seed(1)
    dropped = torch.zeros(length, dtype=torch.bool)
    dropped[:600] = True  # an image first: the whole first 512-key block of torch's CPU flash kernel
    q, k, v = (torch.zeros(length, HEADS, flags.padded_dim) for _ in range(3))
    for tensor in (q, k, v):
        tensor[..., :head_dim] = torch.randn(length, HEADS, head_dim, generator=generator)
    q[..., head_dim] = flags.query_flag
    k = fp8_round_trip(flags.hide(k, dropped), torch.float8_e4m3fn, 1.0, "non_saturating")
    visible = ~dropped
    expected = fused_attention(q[visible], k[visible], v[visible], flags.scale)
    torch.testing.assert_close(fused_attention(q, k, v, flags.scale)[visible], expected)


def test_the_earlier_flag_was_out_of_e4m3fn_range():
    """The earlier design used a = sqrt(3e4 / scale) for both flags: 582.6 for head_dim 128, beyond 448."""
    head_dim = 128
    earlier = math.sqrt(3.0e4 / head_dim**-0.5)
    assert earlier > torch.finfo(torch.float8_e4m3fn).max
    read = torch.tensor([-earlier]).to(torch.float8_e4m3fn).float().item()
    # torch 2.13's plain cast saturates to -448 (older releases gave NaN): never the designed value
    assert read == -448.0 or math.isnan(read)

    old = FlaggedHeads(head_dim=head_dim, padded_dim=head_dim + 8, scale=head_dim**-0.5, query_flag=earlier,
                       key_flag=earlier)
    new = FlaggedHeads.for_backend(head_dim, head_dim**-0.5, lambda size: True)
    dropped = dropped_mask()
    for flags, nan_expected in ((old, True), (new, False)):
        q, k, v = widened_qkv(flags, dropped, seed=0)
        k = fp8_round_trip(k, torch.float8_e4m3fn, 1.0, "non_saturating")
        out, _ = attention(q, k, v, torch.ones(LENGTH, LENGTH, dtype=torch.bool).tril(), flags.scale)
        assert bool(out.isnan().any()) == nan_expected
