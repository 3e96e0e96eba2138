"""One training forward: the draft's passes over a batch (with multi-token prediction) and the batch loss."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from vispec_vllm.train.batches import DraftBatch
from vispec_vllm.train.losses import stage1_position_loss, stage2_position_loss


def merged_inputs_embeds(
    embed_tokens: nn.Module, next_ids: torch.Tensor, image_mask: torch.Tensor, image_embeds: torch.Tensor
) -> torch.Tensor:
    """[B, T, H] draft input embeddings: token embeddings, with the target's vision features at image slots."""
    embeds = embed_tokens(next_ids)
    return embeds.masked_scatter(image_mask[..., None], image_embeds.to(embeds.dtype))


def uniform_noise(batch: DraftBatch, std: float, generator: torch.Generator) -> torch.Tensor:
    """Official augmentation: (U[0,1) - 0.5) * std * 512 / L per sample (L = the sample's token count)."""
    shape = batch.hidden_states.shape
    noise = torch.rand(shape, generator=generator, dtype=torch.float32)
    scale = std * 512.0 / batch.sequence_lengths.float().cpu()
    return ((noise - 0.5) * scale[:, None, None]).to(batch.hidden_states.device)


class DraftRollout(nn.Module):
    """The draft applied 1 + mtp_steps times. Pass m reads, at slot t >= 1, the draft's own pass m-1
    prediction made at slot t-1 (`cat(h[:, :1], pred[:, :-1])`), with gradients through the chain.

    A single module call, so that DistributedDataParallel sees one forward per step.
    """

    def __init__(self, draft: nn.Module, *, mtp_steps: int, use_image_path: bool) -> None:
        super().__init__()
        self.draft = draft
        self.mtp_steps = mtp_steps
        self.use_image_path = use_image_path

    def forward(
        self,
        hidden_states: torch.Tensor,  # [B, T, H] target features (noisy in training)
        next_ids: torch.Tensor,  # [B, T]
        image_mask: torch.Tensor,  # [B, T] bool, shifted
        image_embeds: torch.Tensor,  # [M, H]
        attention_mask: torch.Tensor,  # [B, T] bool
    ) -> list[torch.Tensor]:
        inputs_embeds = merged_inputs_embeds(self.draft.embed_tokens, next_ids, image_mask, image_embeds)
        draft_image_mask = image_mask if self.use_image_path else None
        predictions = []
        features = hidden_states
        for _ in range(1 + self.mtp_steps):
            out = self.draft(features, inputs_embeds, draft_image_mask, attention_mask).hidden_states
            predictions.append(out)
            features = torch.cat([hidden_states[:, :1], out[:, :-1]], dim=1)
        return predictions


@dataclass
class StepResult:
    loss: torch.Tensor  # scalar, mean over trained positions of all passes
    positions: int  # trained positions per pass
    correct: list[int]  # per pass: draft top-1 == target top-1 at trained positions
    terms: dict[str, float]  # mean of each loss term


def batch_loss(draft: nn.Module, predictions: list[torch.Tensor], batch: DraftBatch, stage: int) -> StepResult:
    """The stage's loss over every trained position of every pass, each with equal weight.

    With a reduced draft vocabulary `compute_logits` covers its ids only, for the target rows as for the draft's:
    the target distribution is the target's softmax restricted to the subset (renormalised there), and top-1
    accuracy compares the two argmaxes over the subset."""
    mask = batch.loss_mask
    positions = int(mask.sum())
    if positions == 0:
        zero = sum(p.sum() for p in predictions) * 0.0  # keeps the graph (DDP needs every rank to backward)
        return StepResult(zero, 0, [0] * len(predictions), {})
    target_hidden = batch.target_hidden[mask]  # [N, H]
    with torch.no_grad():
        target_logits = draft.compute_logits(target_hidden).float()
        target_probs = torch.softmax(target_logits, dim=-1)
        target_top1 = target_logits.argmax(-1)
    terms: dict[str, torch.Tensor] = {}
    correct = []
    for pred in predictions:
        rows = pred[mask]
        draft_logits = draft.compute_logits(rows).float()
        if stage == 1:
            pass_terms = stage1_position_loss(rows.float(), target_hidden, draft_logits, target_probs)
        else:
            pass_terms = stage2_position_loss(draft_logits, target_probs)
        for name, value in pass_terms.items():
            terms[name] = terms[name] + value.sum() if name in terms else value.sum()
        correct.append(int((draft_logits.argmax(-1) == target_top1).sum()))
    count = positions * len(predictions)
    loss = terms.pop("loss") / count
    return StepResult(loss, positions, correct, {k: float(v.detach()) / count for k, v in terms.items()})
