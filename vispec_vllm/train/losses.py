"""Per-position draft losses of the official recipe (vispec/train/main.py and main_mtp.py).

All functions take rows that are already restricted to trained positions ([N, ...]); the caller averages
over every trained position of every sample and every MTP pass together, as the official code does.

* stage 1 (EAGLE):  SmoothL1(pred, target hidden) + 0.1 * (soft CE(target p, draft) + 0.1 * ListMLE@10)
* stage 2 (ViSpec): 10 * || softmax(draft) - target p ||_1 + 0.1 * ListMLE@10
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

LISTMLE_TOP_K = 10
STAGE1_PROB_WEIGHT = 0.1  # official --pw
LISTMLE_WEIGHT_STAGE1 = 0.1
STAGE2_L1_WEIGHT = 10.0
STAGE2_LISTMLE_WEIGHT = 0.1


def listmle(draft_logits: torch.Tensor, target_probs: torch.Tensor, k: int = LISTMLE_TOP_K) -> torch.Tensor:
    """[N] negative Plackett-Luce log-likelihood of the target's top-k order under the draft's logits."""
    top = target_probs.topk(min(k, target_probs.shape[-1]), dim=-1).indices  # [N, k], most probable first
    scores = draft_logits.gather(-1, top)
    log_tail_sums = torch.logcumsumexp(scores.flip(-1), dim=-1).flip(-1)  # log sum_{j>=i} exp s_j
    return -(scores - log_tail_sums).sum(-1)


def stage1_position_loss(
    pred_hidden: torch.Tensor, target_hidden: torch.Tensor, draft_logits: torch.Tensor, target_probs: torch.Tensor
) -> dict[str, torch.Tensor]:
    """[N] terms of the EAGLE loss: 'loss' (the weighted total), 'vloss', 'ploss', 'rloss'."""
    vloss = F.smooth_l1_loss(pred_hidden, target_hidden, reduction="none").mean(-1)
    ploss = -(target_probs * F.log_softmax(draft_logits, dim=-1)).sum(-1)
    rloss = listmle(draft_logits, target_probs)
    loss = vloss + STAGE1_PROB_WEIGHT * (ploss + LISTMLE_WEIGHT_STAGE1 * rloss)
    return {"loss": loss, "vloss": vloss, "ploss": ploss, "rloss": rloss}


def stage2_position_loss(draft_logits: torch.Tensor, target_probs: torch.Tensor) -> dict[str, torch.Tensor]:
    """[N] terms of the ViSpec loss: 'loss', 'ploss' (L1 between distributions = 2 TV), 'rloss'."""
    ploss = (F.softmax(draft_logits, dim=-1) - target_probs).abs().sum(-1)
    rloss = listmle(draft_logits, target_probs)
    loss = STAGE2_L1_WEIGHT * ploss + STAGE2_LISTMLE_WEIGHT * rloss
    return {"loss": loss, "ploss": ploss, "rloss": rloss}
