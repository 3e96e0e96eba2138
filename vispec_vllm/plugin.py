"""The `vllm.general_plugins` entry point body: runs once in every vLLM process (API server, engine, worker)."""

from __future__ import annotations

from vispec_vllm.compat import check_vllm_version
from vispec_vllm.model_names import VISPEC_ARCHITECTURES

DRAFT_MODEL_CLASS = "vispec_vllm.engine.draft_model:ViSpecDraftForVLLM"


def register() -> None:
    check_vllm_version(required=True)
    from vllm import ModelRegistry

    from vispec_vllm.engine.patches import apply_patches

    supported = set(ModelRegistry.get_supported_archs())
    for architecture in VISPEC_ARCHITECTURES:
        if architecture not in supported:
            ModelRegistry.register_model(architecture, DRAFT_MODEL_CLASS)
    apply_patches()
