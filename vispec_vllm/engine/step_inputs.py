"""What one draft forward needs besides token ids, positions and hidden states: each token's image inputs."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from vispec_vllm.engine.image_state import BatchImageTables


@dataclass
class TokenImageInputs:
    """Per query token (T of them): which image feature it gets. The slot fields are None in a chain step,
    whose tokens (drafted tokens, after the prompt) are never image slots."""

    # [T, H]: the adaptor's global row (for the vLLM draft: g already projected into the fused input) of the
    # latest image that ended before the token's slot, zeros if none
    global_term: torch.Tensor
    is_compressed: torch.Tensor | None = None  # [T] bool: slot is one of the last num_q-1 slots of an image
    compressed_token: torch.Tensor | None = None  # [T, H]: adaptor output for compressed slots (garbage elsewhere)
    is_dropped: torch.Tensor | None = None  # [T] bool: any other image slot (hidden from every query)


@dataclass
class ViSpecStepInputs:
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

    query_index = slot - (last - (num_q - 2))  # index into the compressed tokens, valid in [0, num_q-2]
    compressed = (query_index >= 0) & (slot <= last)  # [T, M]
    dropped = (slot >= tables.first_slot[row_of_token]) & (query_index < 0)  # [T, M]
    image_of_slot = compressed.int().argmax(dim=-1)
    chosen_query = query_index[tokens, image_of_slot].clamp(0, num_q - 2)
    return TokenImageInputs(
        global_term=tables.global_term(row_of_token, positions),
        is_compressed=compressed.any(dim=-1),
        compressed_token=adaptor[row_of_token, image_of_slot, chosen_query],
        is_dropped=dropped.any(dim=-1),
    )


def chain_image_inputs(tables: BatchImageTables, positions: torch.Tensor) -> TokenImageInputs:
    """Row b's drafted token at `positions[b]` (after all of the row's images): only its latest image's global row."""
    rows = torch.arange(positions.shape[0], device=positions.device)
    return TokenImageInputs(global_term=tables.global_term(rows, positions))
