"""`ImgAdaptor` (checkpoint prefix `imadpt`): num_q learned queries cross-attending over one image.

Non-causal, no RoPE, no norm. Keys and values are the image's *input embeddings* (the projected vision
features the target merges into `inputs_embeds`). Output rows 0..num_q-2 are the compressed tokens; the last
row is the image's global feature g.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from vispec_vllm.draft.config import ViSpecConfig


class ImgAdaptor(nn.Module):
    def __init__(self, config: ViSpecConfig, num_q: int) -> None:
        super().__init__()
        if num_q < 2:
            raise ValueError(f"num_q must be >= 2 (num_q-1 compressed tokens + 1 global feature), got {num_q}")
        self.num_q = num_q
        self.num_heads = config.num_attention_heads
        self.head_dim = config.head_dim
        width = self.num_heads * self.head_dim
        self.q = nn.Parameter(torch.empty(num_q, self.num_heads, self.head_dim))
        nn.init.normal_(self.q, mean=0.0, std=self.head_dim**-0.5)
        self.k_proj = nn.Linear(config.hidden_size, width, bias=config.qkv_bias)
        self.v_proj = nn.Linear(config.hidden_size, width, bias=config.qkv_bias)
        self.o_proj = nn.Linear(width, config.hidden_size, bias=False)

    def forward(self, image_embeds: torch.Tensor, key_padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        """image_embeds [n_img, N, H] -> [n_img, num_q, H].

        key_padding_mask [n_img, N] bool, True where the key is padding (torch.nn.MultiheadAttention's rule).
        """
        n_img, length, _ = image_embeds.shape
        k = self.k_proj(image_embeds).view(n_img, length, self.num_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(image_embeds).view(n_img, length, self.num_heads, self.head_dim).transpose(1, 2)
        q = self.q.transpose(0, 1).unsqueeze(0).expand(n_img, -1, -1, -1)  # [n_img, heads, num_q, hd]
        allowed = None if key_padding_mask is None else ~key_padding_mask.bool()[:, None, None, :]
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed)
        return self.o_proj(out.transpose(1, 2).reshape(n_img, self.num_q, self.num_heads * self.head_dim))
