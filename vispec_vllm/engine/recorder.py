"""`ProposalRecorder`: captures what the ViSpec proposer was given and what it drafted (tests, debugging).

Attach it to a live proposer (`proposer.recorder = ProposalRecorder()`, in-process engine). It keeps CPU
copies, so it is for small runs only. `sequence_hidden_states` rebuilds each request's target hidden
states by position (a rejected token's hidden state is superseded when its position is computed again).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch


@dataclass
class ProposalCall:
    req_ids: list[str]
    positions: dict[str, list[int]]  # valid (non-rejected) target positions of each row, in order
    next_token_ids: dict[str, int]  # the token paired with each row's last valid position (EAGLE shift)
    drafts: dict[str, list[int]] = field(default_factory=dict)
    skipped_keys: dict[str, int] = field(default_factory=dict)  # dropped keys the draft attention did not read


@dataclass
class ProposalRecorder:
    calls: list[ProposalCall] = field(default_factory=list)
    hidden_states: dict[str, dict[int, torch.Tensor]] = field(default_factory=dict)  # req -> position -> [H]
    image_embeddings: dict[str, torch.Tensor] = field(default_factory=dict)  # encoder-cache key -> [N, H]
    next_tokens: dict[str, dict[int, int]] = field(default_factory=dict)  # req -> position p -> x_{p+1}
    image_spans: dict[str, list[tuple[int, int, str]]] = field(default_factory=dict)  # req -> (offset, length, key)
    prompt_lengths: dict[str, int] = field(default_factory=dict)

    def record_inputs(
        self,
        req_ids: Sequence[str],
        row_of_token: torch.Tensor,  # [T]
        positions: torch.Tensor,  # [T]
        input_ids: torch.Tensor,  # [T] shifted ids (x_{p+1})
        target_hidden_states: torch.Tensor,  # [T, H]
        valid_len: torch.Tensor,  # [B] tokens of each row that were not rejected
        encoder_outputs: Mapping[str, torch.Tensor],
        live_requests: Mapping,
    ) -> None:
        rows = row_of_token.cpu()
        pos = positions.cpu()
        ids = input_ids.cpu()
        hidden = target_hidden_states.detach().float().cpu()
        valid = valid_len.cpu()
        call = ProposalCall(list(req_ids), {}, {})
        for b, req_id in enumerate(req_ids):
            index = (rows == b).nonzero().flatten()[: int(valid[b])]
            call.positions[req_id] = pos[index].tolist()
            call.next_token_ids[req_id] = int(ids[index[-1]])
            per_position = self.hidden_states.setdefault(req_id, {})
            following = self.next_tokens.setdefault(req_id, {})
            for i in index.tolist():
                per_position[int(pos[i])] = hidden[i].clone()
                following[int(pos[i])] = int(ids[i])
            if req_id not in self.image_spans:
                self.prompt_lengths[req_id] = live_requests[req_id].num_prompt_tokens
                self.image_spans[req_id] = [
                    (f.mm_position.offset, f.mm_position.length, f.identifier)
                    for f in live_requests[req_id].mm_features
                ]
        self.calls.append(call)
        for key, value in encoder_outputs.items():
            if key not in self.image_embeddings:
                self.image_embeddings[key] = value.detach().float().cpu().clone()

    def record_skipped_keys(self, req_ids: Sequence[str], skipped: torch.Tensor) -> None:
        self.calls[-1].skipped_keys = dict(zip(req_ids, skipped.cpu().tolist(), strict=True))

    def record_proposal(self, req_ids: Sequence[str], drafts: torch.Tensor) -> None:
        rows = drafts.cpu().tolist()
        self.calls[-1].drafts = {req_id: rows[b] for b, req_id in enumerate(req_ids)}

    def sequence_hidden_states(self, req_id: str, length: int) -> torch.Tensor:
        """[length, H] target hidden states of positions 0..length-1 of one request."""
        per_position = self.hidden_states[req_id]
        return torch.stack([per_position[p] for p in range(length)])
