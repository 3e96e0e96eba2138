"""Offline acceptance of a draft on stored samples: chain drafting against the target's greedy tokens.

At every answer position the draft proposes K tokens greedily from the target's hidden states so far
(`ViSpecDraft.propose_greedy`, which feeds its own features forward like EAGLE decoding); the proposal is
accepted up to its first token that differs from the stored answer, which is the target's greedy output.
This is exactly what chain speculative decoding at temperature 0 accepts with these target states.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from vispec_vllm.data.shards import TargetSample
from vispec_vllm.train.batches import sample_slots
from vispec_vllm.train.step import merged_inputs_embeds


@dataclass
class Acceptance:
    proposals: int  # draft rounds evaluated
    accepted_per_position: list[float]  # fraction of rounds accepting draft token k (k = 1..K)

    @property
    def mean_accepted(self) -> float:
        """tau: mean accepted draft tokens per round (without the bonus token)."""
        return sum(self.accepted_per_position)


@torch.no_grad()
def chain_acceptance(draft: nn.Module, samples: list[TargetSample], *, num_speculative_tokens: int = 3,
                     rows_per_call: int = 32) -> Acceptance:
    """Acceptance over every round that drafts answer tokens (first draft = the token after a generated one)."""
    k_max = num_speculative_tokens
    accepted = torch.zeros(k_max)
    rounds = 0
    for sample in samples:
        slots = sample_slots(sample)
        embeds = merged_inputs_embeds(draft.embed_tokens, slots["next_ids"], slots["image_mask"],
                                      slots["image_embeds"])
        tokens = sample.input_ids
        # p slots (tokens x_1..x_p as inputs) propose x_{p+1}..; rounds start after the prompt
        answer_positions = sample.answer_mask.nonzero().flatten().tolist()
        starts = [p for p in answer_positions if p + 1 < len(sample)]
        for chunk_start in range(0, len(starts), rows_per_call):
            prefixes = starts[chunk_start : chunk_start + rows_per_call]
            width = max(prefixes)
            rows = len(prefixes)
            hidden = slots["hidden_states"].new_zeros(rows, width, slots["hidden_states"].shape[-1])
            inputs = embeds.new_zeros(rows, width, embeds.shape[-1])
            image = torch.zeros(rows, width, dtype=torch.bool)
            valid = torch.zeros(rows, width, dtype=torch.bool)
            for r, p in enumerate(prefixes):
                hidden[r, :p], inputs[r, :p] = slots["hidden_states"][:p], embeds[:p]
                image[r, :p], valid[r, :p] = slots["image_mask"][:p], True
            drafts = draft.propose_greedy(hidden, inputs, image, valid, k_max)  # [rows, K]
            for r, p in enumerate(prefixes):
                truth = tokens[p + 1 : p + 1 + k_max]
                matches = (drafts[r, : len(truth)] == truth).long().cumprod(0)
                accepted[: len(matches)] += matches.float()
            rounds += rows
    return Acceptance(rounds, (accepted / max(rounds, 1)).tolist())
