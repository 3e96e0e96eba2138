"""What one draft forward needs besides token ids, positions and hidden states: each token's image inputs.

The draft's compiled core takes all four tensors on every call (a fixed signature: torch.compile traces it once
and CUDA graphs replay it), so a decode step or a text-only draft passes zeros and False rather than None.
The proposer fills them into `StepInputBuffers`, persistent buffers whose addresses never change.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from vispec_vllm.engine.image_state import BatchImageTables


@dataclass
class ViSpecStepInputs:
    """Per query token (T of them): which image feature it gets."""

    # [T, H]: the adaptor's global row (for the vLLM draft: g already projected into the fused input) of the
    # latest image that ended before the token's slot, zeros if none
    global_term: torch.Tensor
    compressed_token: torch.Tensor  # [T, H]: adaptor output for compressed slots (anything elsewhere)
    is_compressed: torch.Tensor  # [T] bool: slot is one of the last num_q-1 slots of an image
    is_dropped: torch.Tensor  # [T] bool: any other image slot (hidden from every query)


class StepInputBuffers:
    """Persistent [max_tokens] step inputs: the proposer writes the first T rows, the draft reads `view(T')`
    (T' >= T when the batch is padded for a CUDA graph; padded rows hold stale but finite values)."""

    def __init__(self, max_tokens: int, hidden_size: int, dtype: torch.dtype, device: torch.device | None) -> None:
        """device None: torch's current default device (vLLM builds models under the load device)."""
        self.global_term = torch.zeros(max_tokens, hidden_size, dtype=dtype, device=device)
        self.compressed_token = torch.zeros(max_tokens, hidden_size, dtype=dtype, device=device)
        self.is_compressed = torch.zeros(max_tokens, dtype=torch.bool, device=device)
        self.is_dropped = torch.zeros(max_tokens, dtype=torch.bool, device=device)

    def view(self, num_tokens: int) -> ViSpecStepInputs:
        return ViSpecStepInputs(
            self.global_term[:num_tokens],
            self.compressed_token[:num_tokens],
            self.is_compressed[:num_tokens],
            self.is_dropped[:num_tokens],
        )

    def write(self, inputs: ViSpecStepInputs) -> None:
        """Rows [0, T) from a prefill's per-token inputs."""
        num_tokens = inputs.global_term.shape[0]
        self.global_term[:num_tokens].copy_(inputs.global_term)
        self.compressed_token[:num_tokens].copy_(inputs.compressed_token)
        self.is_compressed[:num_tokens].copy_(inputs.is_compressed)
        self.is_dropped[:num_tokens].copy_(inputs.is_dropped)

    def write_text_slots(self, global_term: torch.Tensor) -> None:
        """Rows [0, T) of text slots after their images: only the global term ([T, H]) is set."""
        num_tokens = global_term.shape[0]
        self.global_term[:num_tokens].copy_(global_term)
        self.is_compressed[:num_tokens] = False
        self.is_dropped[:num_tokens] = False


def token_image_inputs(
    tables: BatchImageTables,
    row_of_token: torch.Tensor,  # [T]
    positions: torch.Tensor,  # [T] raw slot index
) -> ViSpecStepInputs:
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
    return ViSpecStepInputs(
        global_term=tables.global_term(row_of_token, positions),
        compressed_token=adaptor[row_of_token, image_of_slot, chosen_query],
        is_compressed=compressed.any(dim=-1),
        is_dropped=dropped.any(dim=-1),
    )


def chain_global_term(tables: BatchImageTables, positions: torch.Tensor) -> torch.Tensor:
    """[B, H]: row b's drafted token at `positions[b]` (after all of the row's images) gets only its latest
    image's global row."""
    rows = torch.arange(positions.shape[0], device=positions.device)
    return tables.global_term(rows, positions)
