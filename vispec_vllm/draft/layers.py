"""The draft's decoder layer (Llama-style, as in the official ViSpec draft) and its parts.

Differences from a Llama decoder layer, all official: no input norm (`y = x + attn(x)`), MHA with q/k/v
biases iff `qkv_bias`, 1-D rotate-half RoPE over explicit positions. RoPE is computed on the fly, so any
position works (the official table stops at `max_position_embeddings`; values below it are identical).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from vispec_vllm.draft.config import ViSpecConfig


class RMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * normed.to(x.dtype)  # cast back before the weight, as the official norm does


def rotary_cos_sin(
    positions: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [..., head_dim] for integer `positions` [...], computed in float32 then cast to `dtype`."""
    exponent = torch.arange(0, head_dim, 2, dtype=torch.float32, device=positions.device) / head_dim
    inv_freq = 1.0 / (theta**exponent)  # [head_dim/2]
    angles = positions.to(torch.float32)[..., None] * inv_freq
    angles = torch.cat((angles, angles), dim=-1)
    return angles.cos().to(dtype), angles.sin().to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    first, second = x.chunk(2, dim=-1)
    return torch.cat((-second, first), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [..., T, heads, hd]; cos/sin [..., T, hd]."""
    cos, sin = cos.unsqueeze(-2), sin.unsqueeze(-2)
    return x * cos + rotate_half(x) * sin


class DraftAttention(nn.Module):
    """Projections and RoPE; the attention core is the caller's (dense here, paged in vLLM)."""

    def __init__(self, config: ViSpecConfig) -> None:
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        self.rope_theta = config.rope_theta
        hidden, kv_width = config.hidden_size, config.num_key_value_heads * config.head_dim
        self.q_proj = nn.Linear(hidden, self.num_heads * self.head_dim, bias=config.qkv_bias)
        self.k_proj = nn.Linear(hidden, kv_width, bias=config.qkv_bias)
        self.v_proj = nn.Linear(hidden, kv_width, bias=config.qkv_bias)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, hidden, bias=False)

    def project(self, x: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x [..., T, H], positions [..., T] -> q [..., T, heads, hd], k and v [..., T, kv_heads, hd] (RoPE on q, k)."""
        shape = x.shape[:-1]
        q = self.q_proj(x).view(*shape, self.num_heads, self.head_dim)
        k = self.k_proj(x).view(*shape, self.num_kv_heads, self.head_dim)
        v = self.v_proj(x).view(*shape, self.num_kv_heads, self.head_dim)
        cos, sin = rotary_cos_sin(positions, self.head_dim, self.rope_theta, q.dtype)
        return apply_rotary(q, cos, sin), apply_rotary(k, cos, sin), v

    def output(self, attended: torch.Tensor) -> torch.Tensor:
        """[..., T, heads, hd] -> [..., T, H]."""
        return self.o_proj(attended.flatten(-2))

    def forward(self, x: torch.Tensor, positions: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
        """x [B, T, H]; positions [B, T] int; allowed [B, T(query), T(key)] bool (True: may attend)."""
        q, k, v = (t.transpose(1, 2) for t in self.project(x, positions))  # [B, heads, T, hd]
        groups = self.num_heads // self.num_kv_heads
        if groups > 1:  # GQA: query head i reads kv head i // groups
            k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed[:, None])
        return self.output(out.transpose(1, 2))


class DraftMLP(nn.Module):
    def __init__(self, config: ViSpecConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DraftDecoderLayer(nn.Module):
    def __init__(self, config: ViSpecConfig) -> None:
        super().__init__()
        self.self_attn = DraftAttention(config)
        self.mlp = DraftMLP(config)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, x: torch.Tensor, positions: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
        return self.after_attention(x, self.self_attn(x, positions, allowed))

    def after_attention(self, x: torch.Tensor, attention_output: torch.Tensor) -> torch.Tensor:
        """The residual and MLP half of the layer (no input norm before attention: official)."""
        y = x + attention_output
        return y + self.mlp(self.post_attention_layernorm(y))
