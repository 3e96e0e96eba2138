"""The draft a stage starts from, with the target's frozen embedding and lm_head attached."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from vispec_vllm.train.config import TrainConfig


def attach_target_weights(draft: nn.Module, target_dir: Path) -> None:
    """embed_tokens := the target's embedding (frozen); lm_head := the target's (frozen, not saved; only its rows
    at d2t for a draft with a reduced draft vocabulary)."""
    from vispec_vllm.factory import target_info
    from vispec_vllm.factory.drafts import read_target_tensor

    target_dir = Path(target_dir)
    info = target_info(target_dir)
    weight = draft.embed_tokens.weight
    with torch.no_grad():
        weight.copy_(read_target_tensor(target_dir, info.embed_key).to(weight.dtype))
    draft.set_lm_head(read_target_tensor(target_dir, info.lm_head_key).to(weight.dtype))


def set_trainable(draft: nn.Module) -> list[nn.Parameter]:
    """Everything but embed_tokens trains (official); a stage-1 draft (no adaptor) also keeps img_fc at the
    identity, since its checkpoint has no img_fc. Returns the trainable parameters."""
    frozen = {"embed_tokens."} | ({"img_fc."} if draft.num_q is None else set())
    trainable = []
    for name, parameter in draft.named_parameters():
        parameter.requires_grad_(not any(name.startswith(prefix) for prefix in frozen))
        if parameter.requires_grad:
            trainable.append(parameter)
    return trainable


def initial_draft(config: TrainConfig) -> nn.Module:
    """Stage 1: `init` None (a fresh draft with the official config layout for the target), a config JSON
    file (e.g. configs/drafts/qwen2.5_vl_7B.json), or a draft directory (config.json, weights optional).
    Stage 2: `init` is the stage-1 draft; the image adaptor is new (seeded) and img_fc starts as the identity.
    A draft loaded from `init` keeps its reduced draft vocabulary (`d2t`), if it has one."""
    from vispec_vllm.draft import ViSpecConfig, ViSpecDraft
    from vispec_vllm.factory import target_info
    from vispec_vllm.factory.drafts import draft_config_for

    init = None if config.init is None else Path(config.init)
    if config.stage == 2:
        if init is None:
            raise ValueError("stage 2 starts from the stage-1 draft: pass --init <stage-1 run>/draft")
        draft = ViSpecDraft.from_pretrained(init, num_q=config.num_q, dtype=torch.float32, seed=config.seed)
    elif init is not None and (init / "model.safetensors").exists():
        draft = ViSpecDraft.from_pretrained(init, dtype=torch.float32, seed=config.seed)
    else:
        if init is None:
            draft_config = draft_config_for(target_info(config.target))
        else:
            draft_config = ViSpecConfig.from_json_file(init if init.is_file() else init / "config.json")
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(config.seed)
            draft = ViSpecDraft(draft_config, num_q=None).float()
    attach_target_weights(draft, config.target)
    set_trainable(draft)
    return draft.train()
