"""Start-up checks that a ViSpec draft fits the target it is paired with (one-line errors).

The same checks run twice, from what is known at each point:

* `check_vispec_config`, in the main process as soon as vLLM has built its config (`patches` hooks it after
  `EngineArgs.create_engine_config`): the draft's `config.json` and, for a local `model.safetensors`, its tensor
  names. A bad pairing fails `vllm serve` / `LLM(...)` in seconds, with the message as the last line, before any
  engine or worker process starts.
* `check_draft_against_target`, in the worker once the draft is loaded (`ViSpecProposer.load_model`): the loaded
  weights decide whether the draft is vision-aware, which the main process cannot know for a hub draft (weights
  not downloaded yet) or a `pytorch_model.bin`.
"""

from __future__ import annotations

from pathlib import Path

import torch

from vispec_vllm.draft.checkpoint import VISION_PREFIXES, check_draft_matches_target
from vispec_vllm.draft.config import ViSpecConfig
from vispec_vllm.model_names import family_of, is_vispec_architecture

MAX_SPECULATIVE_TOKENS = 16
SAFETENSORS_FILE = "model.safetensors"


class ViSpecConfigError(ValueError):
    pass


def check_vispec_config(vllm_config) -> None:
    """Main process: check a ViSpec draft's config.json (and local weight names) against the target config."""
    spec = vllm_config.speculative_config
    if spec is None or spec.draft_model_config is None:
        return
    draft_model_config = spec.draft_model_config
    if not any(is_vispec_architecture(a) for a in draft_model_config.hf_config.architectures or []):
        return
    from vispec_vllm.engine.draft_model import draft_config_file  # imports vLLM's model layers: only when needed

    config = ViSpecConfig.from_json_file(draft_config_file(draft_model_config.model, draft_model_config.revision))
    _check_pairing(config, _local_weights_are_vision_aware(draft_model_config.model), vllm_config)


def check_draft_against_target(draft: torch.nn.Module, vllm_config) -> None:
    """Worker: the loaded `ViSpecDraftForVLLM` against the target's config."""
    _check_pairing(draft.vispec_config, draft.num_q is not None, vllm_config)


def _check_pairing(config: ViSpecConfig, vision_aware: bool | None, vllm_config) -> None:
    """vision_aware: the draft has `imadpt.*`/`img_fc.*` weights; None while that is not known."""
    spec = vllm_config.speculative_config
    source = spec.draft_model_config.model
    model_config = vllm_config.model_config
    target_name = model_config.model

    k = spec.num_speculative_tokens
    if not 1 <= k <= MAX_SPECULATIVE_TOKENS:
        raise ViSpecConfigError(
            f"num_speculative_tokens must be in [1, {MAX_SPECULATIVE_TOKENS}] for a ViSpec draft, got {k}"
        )
    is_multimodal = model_config.is_multimodal_model
    if vision_aware and not is_multimodal:
        raise ViSpecConfigError(
            f"ViSpec draft {source} is vision-aware (has {'/'.join(p + '*' for p in VISION_PREFIXES)} weights) "
            f"but target {target_name} is text-only; use a stage-1 EAGLE draft for text-only targets"
        )
    target_archs = model_config.hf_config.architectures or []
    target_family = next((family_of(a) for a in target_archs if family_of(a)), None)
    draft_archs = spec.draft_model_config.hf_config.architectures or []
    draft_family = next((family_of(a) for a in draft_archs if family_of(a)), None)
    if is_multimodal and draft_family != target_family:
        raise ViSpecConfigError(
            f"ViSpec draft {source} was made for the {draft_family} family ({draft_archs}) "
            f"but target {target_name} is {target_family or target_archs}"
        )
    target_text = model_config.hf_text_config
    check_draft_matches_target(
        config,
        hidden_size=target_text.hidden_size,
        vocab_size=model_config.get_vocab_size(),
        num_attention_heads=target_text.num_attention_heads,
        source=str(source),
    )


def _local_weights_are_vision_aware(model: str) -> bool | None:
    """From the tensor names in a local draft's safetensors header; None: not known before the weights load."""
    weights = Path(model) / SAFETENSORS_FILE
    if not weights.is_file():
        return None
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(weights), framework="pt") as f:
            names = list(f.keys())
    except SafetensorError:  # unreadable: the weight loader reports it with its own message
        return None
    return any(name.startswith(VISION_PREFIXES) for name in names)
