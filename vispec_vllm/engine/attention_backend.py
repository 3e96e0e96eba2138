"""The draft layer's attention backend and its widened head size, chosen together.

The draft layer widens its heads (`FlaggedHeads`) to the smallest multiple of 8 above head_dim that its backend
accepts, and which backend vLLM picks depends on the head size. So both are chosen in one pass: for each candidate
size, smallest first, vLLM's own selector picks the backend for a layer of that size (the platform's priority
order, a backend forced for the draft, every check of the configuration), and the first size that its pick
accepts wins. The smallest size some backend accepts is the first size at which the selector finds one, and there
it takes the platform's first valid backend: the backend with the smallest widened head, ties going to the
platform's order. The draft's `Attention` is then built with that backend explicitly, so it cannot pick again.

For head_dim 128: FlashAttention at 136 on Hopper and on Blackwell (where vLLM's first choice, FlashInfer, takes
only 64/128/256/512 and would double the head; with an fp8 KV cache Triton, as FlashAttention above 128 is FA2
there), CPU_ATTN at 160 on the CPU. A backend forced for the draft (the speculative config's `attention_backend`,
or the attention config's `backend_per_kind`; vLLM does not pass the target's `--attention-backend` on to a draft)
is kept even where another would take a smaller head.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from vllm.config import VllmConfig
from vllm.config.cache import CacheDType
from vllm.logger import init_logger
from vllm.v1.attention.backend import AttentionBackend
from vllm.v1.attention.selector import get_attn_backend

from vispec_vllm.kernels.dropped_keys import FlaggedHeads

logger = init_logger(f"vllm.{__name__}")  # under vLLM's configured logger, so the line shows


@dataclass(frozen=True)
class DraftBackendChoice:
    backend: type[AttentionBackend]  # the backend the draft's vLLM Attention layer is built with
    flags: FlaggedHeads  # the head widening: flags.padded_dim is that layer's head size


def choose_draft_backend(
    head_dim: int,
    scale: float,
    dtype: torch.dtype,
    kv_cache_dtype: CacheDType,
    *,
    use_mm_prefix: bool = False,
    has_sliding_window: bool = False,
) -> DraftBackendChoice:
    """The backend and widened head size for the draft layer (see the module docstring). `use_mm_prefix` and
    `has_sliding_window` are what vLLM's `Attention` would tell the selector for this layer."""
    picks: dict[int, type[AttentionBackend]] = {}
    refusals: list[str] = []

    def accepts(head_size: int) -> bool:
        try:
            backend = get_attn_backend(
                head_size, dtype, kv_cache_dtype, use_mm_prefix=use_mm_prefix, has_sliding_window=has_sliding_window
            )
        except ValueError as refusal:  # no valid backend at this size, or the forced one is not valid
            refusals.append(str(refusal))
            return False
        picks[head_size] = backend
        return backend.supports_head_size(head_size)  # platforms with one backend pick it without checking

    try:
        flags = FlaggedHeads.for_backend(head_dim, scale, accepts)
    except ValueError as error:
        detail = f" (vLLM's selector at the largest size tried: {refusals[-1]})" if refusals else ""
        raise ValueError(f"{error}{detail}") from error
    return DraftBackendChoice(backend=picks[flags.padded_dim], flags=flags)


def draft_kv_share(
    draft_kv_heads: int, draft_head_size: int, target_layers: int, target_kv_heads: int, target_head_size: int
) -> float:
    """The draft layer's fraction of the KV pool: it has a slot beside every target slot, so per token it stores
    draft_kv_heads * draft_head_size values against the target's layers * kv_heads * head_size."""
    draft_per_token = draft_kv_heads * draft_head_size
    return draft_per_token / (target_layers * target_kv_heads * target_head_size + draft_per_token)


def log_draft_backend(choice: DraftBackendChoice, draft_kv_heads: int, vllm_config: VllmConfig) -> None:
    """One INFO line: the backend, the head widening and the draft's share of the KV pool (per rank)."""
    model_config, parallel_config = vllm_config.model_config, vllm_config.parallel_config
    flags = choice.flags
    share = draft_kv_share(
        draft_kv_heads,
        flags.padded_dim,
        model_config.get_num_layers(parallel_config),
        model_config.get_num_kv_heads(parallel_config),
        model_config.get_head_size(),
    )
    logger.info_once(
        "ViSpec draft attention: %s backend, heads widened %d -> %d to hide dropped image keys; "
        "the draft's KV is %.1f%% of the KV pool",
        choice.backend.get_name(),
        flags.head_dim,
        flags.padded_dim,
        100 * share,
    )
