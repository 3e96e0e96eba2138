"""The ViSpec draft in pure PyTorch: config, official checkpoint format, slot layout and the reference model.

Nothing here imports vLLM; `vispec_vllm.engine` wraps these pieces for vLLM.
"""

from vispec_vllm.draft.adaptor import ImgAdaptor
from vispec_vllm.draft.checkpoint import (
    DraftCheckpointError,
    check_draft_matches_target,
    expected_keys,
    load_draft_checkpoint,
)
from vispec_vllm.draft.config import ViSpecConfig
from vispec_vllm.draft.image_spans import SlotLayout, build_slot_layout, compressed_slots, find_image_runs
from vispec_vllm.draft.model import ViSpecDraft, ViSpecDraftOutput

__all__ = [
    "DraftCheckpointError",
    "ImgAdaptor",
    "SlotLayout",
    "ViSpecConfig",
    "ViSpecDraft",
    "ViSpecDraftOutput",
    "build_slot_layout",
    "check_draft_matches_target",
    "compressed_slots",
    "expected_keys",
    "find_image_runs",
    "load_draft_checkpoint",
]
