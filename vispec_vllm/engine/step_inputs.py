"""What one draft forward needs besides token ids and hidden states: the paged batch and image inputs."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from vispec_vllm.engine.image_state import BatchImageTables
from vispec_vllm.kernels.paged_attention import PagedBatch


@dataclass
class TokenImageInputs:
    """Per query token (T of them): which image feature it gets."""

    global_feature: torch.Tensor  # [T, H]: g of the latest image that ended before the token's slot (zeros if none)
    is_compressed: torch.Tensor  # [T] bool: slot is one of the last num_q-1 slots of an image
    compressed_token: torch.Tensor  # [T, H]: adaptor output for compressed slots (garbage elsewhere)


@dataclass
class ViSpecStepInputs:
    batch: PagedBatch
    row_of_token: torch.Tensor  # [T] int64 batch row of each query token
    images: TokenImageInputs | None  # None for a stage-1 (text EAGLE) draft


def token_image_inputs(
    tables: BatchImageTables,
    row_of_token: torch.Tensor,  # [T]
    positions: torch.Tensor,  # [T] raw slot index
) -> TokenImageInputs:
    num_q = tables.num_q
    last = tables.last_slot[row_of_token]  # [T, M]
    slot = positions[:, None]
    adaptor = tables.adaptor_output  # [B, M, num_q, H]
    tokens = torch.arange(positions.shape[0], device=positions.device)

    # Images are sorted by position, so the ones that ended before slot p form a prefix of length n_done.
    n_done = (slot > last).sum(dim=-1)  # [T]
    latest = (n_done - 1).clamp(min=0)
    global_feature = adaptor[row_of_token, latest, num_q - 1]
    global_feature = global_feature * (n_done > 0)[:, None].to(global_feature.dtype)

    query_index = slot - (last - (num_q - 2))  # index into the compressed tokens, valid in [0, num_q-2]
    compressed = (query_index >= 0) & (slot <= last)  # [T, M]
    image_of_slot = compressed.int().argmax(dim=-1)
    chosen_query = query_index[tokens, image_of_slot].clamp(0, num_q - 2)
    return TokenImageInputs(
        global_feature=global_feature,
        is_compressed=compressed.any(dim=-1),
        compressed_token=adaptor[row_of_token, image_of_slot, chosen_query],
    )
