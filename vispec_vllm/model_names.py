"""Architecture names: what an official ViSpec `config.json` says, and what vLLM turns it into.

Official ViSpec draft configs are copies of the target family's config with `num_hidden_layers: 1`, so they
name the *target's* architecture. vLLM's `EAGLEConfig` prefixes "Eagle" to a draft's architecture for
`method="eagle"`; the plugin registers those prefixed names, so official directories load unchanged.
"""

from __future__ import annotations

FAMILY_OF_ARCHITECTURE: dict[str, str] = {
    "Qwen2_5_VLForConditionalGeneration": "qwen2_5_vl",
    "LlavaForConditionalGeneration": "llava",
    "LlavaNextForConditionalGeneration": "llava",
}
EAGLE_PREFIX = "Eagle"
VISPEC_ARCHITECTURES: tuple[str, ...] = tuple(EAGLE_PREFIX + a for a in FAMILY_OF_ARCHITECTURE)


def is_vispec_architecture(name: str) -> bool:
    return name in VISPEC_ARCHITECTURES


def family_of(architecture: str) -> str | None:
    """'qwen2_5_vl' or 'llava' for a target or draft architecture name (with or without the Eagle prefix)."""
    return FAMILY_OF_ARCHITECTURE.get(architecture.removeprefix(EAGLE_PREFIX))
