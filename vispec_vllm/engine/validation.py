"""Start-up checks that a ViSpec draft fits the target it is paired with (one-line errors)."""

from __future__ import annotations

import torch

from vispec_vllm.model_names import family_of

MAX_SPECULATIVE_TOKENS = 16


class ViSpecConfigError(ValueError):
    pass


def check_draft_against_target(draft: torch.nn.Module, target: torch.nn.Module, vllm_config) -> None:
    spec = vllm_config.speculative_config
    source = spec.draft_model_config.model
    target_name = vllm_config.model_config.model
    target_text = vllm_config.model_config.hf_text_config
    draft_cfg = draft.vispec_config

    pairs = [
        ("hidden_size", draft_cfg.hidden_size, target_text.hidden_size),
        ("vocab_size", draft_cfg.vocab_size, vllm_config.model_config.get_vocab_size()),
        ("num_attention_heads", draft_cfg.num_attention_heads, target_text.num_attention_heads),
    ]
    for what, found, expected in pairs:
        if found != expected:
            raise ViSpecConfigError(
                f"ViSpec draft {source}/config.json: {what} is {found} but target {target_name} has {expected}"
            )

    target_archs = vllm_config.model_config.hf_config.architectures or []
    target_family = next((family_of(a) for a in target_archs if family_of(a)), None)
    draft_archs = spec.draft_model_config.hf_config.architectures or []
    draft_family = next((family_of(a) for a in draft_archs if family_of(a)), None)
    is_multimodal = vllm_config.model_config.is_multimodal_model
    if draft.num_q is not None and not is_multimodal:
        raise ViSpecConfigError(
            f"ViSpec draft {source} is vision-aware (num_q={draft.num_q}) but target {target_name} is text-only; "
            "use a stage-1 EAGLE draft for text-only targets"
        )
    if is_multimodal and draft_family != target_family:
        raise ViSpecConfigError(
            f"ViSpec draft {source} was made for the {draft_family} family ({draft_archs}) "
            f"but target {target_name} is {target_family or target_archs}"
        )
    k = spec.num_speculative_tokens
    if not 1 <= k <= MAX_SPECULATIVE_TOKENS:
        raise ViSpecConfigError(
            f"num_speculative_tokens must be in [1, {MAX_SPECULATIVE_TOKENS}] for a ViSpec draft, got {k}"
        )
