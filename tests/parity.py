"""Rebuild what the in-vLLM ViSpec draft saw and re-draft it with the reference `ViSpecDraft` (the oracle)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file

from vispec_vllm.draft.model import ViSpecDraft
from vispec_vllm.engine.recorder import ProposalRecorder
from vispec_vllm.factory import target_info


def drafter_of(llm):
    """The live proposer of an in-process (VLLM_ENABLE_V1_MULTIPROCESSING=0) engine."""
    core = llm.llm_engine.engine_core.engine_core
    return core.model_executor.driver_worker.worker.model_runner.drafter


def load_oracle(draft_dir: Path, target_dir: Path) -> ViSpecDraft:
    info = target_info(target_dir)
    weights = load_file(str(Path(target_dir) / "model.safetensors"))
    oracle = ViSpecDraft.from_pretrained(draft_dir)
    oracle.set_lm_head(weights[info.lm_head_key].float())
    return oracle


@dataclass
class ParityReport:
    compared: int  # (request, step) pairs checked
    mismatched: list[tuple[str, int, list[int], list[int]]]  # req, position, vLLM drafts, oracle drafts
    with_images: int  # compared pairs whose request had an image before the drafted position


def compare(
    recorder: ProposalRecorder, oracle: ViSpecDraft, image_token_id: int, *, skip_dropped: bool = False
) -> ParityReport:
    """skip_dropped: ignore drafts made from a dropped image slot (the end of a prefill chunk that stops
    inside an image): vLLM discards them, and the reference zeroes such slots instead of drafting from them."""
    compared, with_images, mismatched = 0, 0, []
    for call in recorder.calls:
        for req_id, drafts in call.drafts.items():
            last = call.positions[req_id][-1]
            if skip_dropped and _is_dropped_slot(recorder.image_spans[req_id], last, oracle.num_q):
                continue
            hidden, next_ids = _sequence(recorder, req_id, last + 1)
            embeds = oracle.embed_tokens(next_ids)
            image_mask = next_ids == image_token_id
            for offset, length, key in recorder.image_spans[req_id]:
                first, end = offset - 1, offset + length - 1  # slots [offset-1, offset+length-2]
                lo, hi = max(first, 0), min(end, last + 1)
                if lo < hi:
                    embeds[lo:hi] = recorder.image_embeddings[key][lo - first : hi - first]
            expected = oracle.propose_greedy(hidden[None], embeds[None], image_mask[None], None, len(drafts))
            compared += 1
            with_images += bool(image_mask.any())
            if expected[0].tolist() != drafts:
                mismatched.append((req_id, last, drafts, expected[0].tolist()))
    return ParityReport(compared, mismatched, with_images)


def _is_dropped_slot(spans: list[tuple[int, int, str]], slot: int, num_q: int | None) -> bool:
    if num_q is None:
        return False
    return any(offset - 1 <= slot <= offset + length - 1 - num_q for offset, length, _ in spans)


def _sequence(recorder: ProposalRecorder, req_id: str, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Hidden states and next tokens of positions [0, length); positions a prefix-cache hit skipped come from
    an earlier request with the same images (the same prompt, in these tests)."""
    hidden, following = recorder.hidden_states[req_id], recorder.next_tokens[req_id]
    spans = recorder.image_spans[req_id]
    twins = [r for r in recorder.hidden_states if r != req_id and recorder.image_spans[r] == spans]
    rows, ids = [], []
    for p in range(length):
        source = req_id if p in hidden else next(r for r in twins if p in recorder.hidden_states[r])
        rows.append(recorder.hidden_states[source][p])
        ids.append(recorder.next_tokens[source][p] if source != req_id else following[p])
    return torch.stack(rows), torch.tensor(ids)
