"""The image path at its largest, for vLLM's start-up dummy runs (memory profile, compilation).

vLLM profiles the drafter with token ids only, so without this the adaptor run and the per-token image inputs
(a few [T, H] and [T, M] tensors) would be missing from the measured peak: a risk of running out of memory at
a high `gpu_memory_utilization`. `largest_image_inputs` does that work for real, on zero embeddings of the
largest image vLLM's multimodal budget allows, as many of them as a prompt may carry.
"""

from __future__ import annotations

import numpy as np
import torch

from vispec_vllm.engine.host_copies import host_to_device
from vispec_vllm.engine.image_state import BatchImageTables
from vispec_vllm.engine.step_inputs import ViSpecStepInputs, token_image_inputs


def largest_image_inputs(draft, runner, num_tokens: int) -> ViSpecStepInputs | None:
    """Step inputs of `num_tokens` slots of one row whose images are laid end to end from slot 0; None when the
    target takes no images (multimodal budget empty)."""
    budget = getattr(runner, "mm_budget", None)
    if budget is None or not budget.mm_max_toks_per_item:
        return None
    modality = budget.get_modality_with_max_tokens()
    image_tokens = budget.mm_max_toks_per_item[modality]
    num_images = max(1, min(budget.mm_max_items_per_prompt[modality], num_tokens // image_tokens))
    hidden_size = draft.vispec_config.hidden_size
    reference = draft.model.fused_fc.weight
    embedding = torch.zeros(image_tokens, hidden_size, dtype=reference.dtype, device=reference.device)
    adapted = draft.adapt_image(embedding)  # [num_q, H]
    first_slot = np.arange(num_images, dtype=np.int64)[None] * image_tokens  # [1, M]
    last_slot = first_slot + image_tokens - 1
    tables = BatchImageTables(
        first_slot=host_to_device(torch.from_numpy(first_slot), reference.device),
        last_slot=host_to_device(torch.from_numpy(last_slot), reference.device),
        adaptor_output=adapted.expand(1, num_images, *adapted.shape).contiguous(),
        num_q=draft.num_q,
        last_image_slot=last_slot.max(axis=1),
    )
    row_of_token = torch.zeros(num_tokens, dtype=torch.int64, device=reference.device)
    positions = torch.arange(num_tokens, dtype=torch.int64, device=reference.device)
    return token_image_inputs(tables, row_of_token, positions)
