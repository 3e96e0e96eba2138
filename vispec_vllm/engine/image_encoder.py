"""Re-encoding one image with the target's vision encoder, for the ViSpec image path.

vLLM encodes an image only while its placeholder tokens are being computed, so an image inside a prefix-cache
hit is never encoded again. Its adaptor output then comes from `AdaptorOutputCache`; once evicted from there,
`TargetImageEncoder` runs the target's `embed_multimodal` on the image's processed inputs, batched as vLLM's
runner batches them (`GPUModelRunner._execute_mm_encoder`). vLLM 0.32's scheduler strips those inputs from an
image that lies inside a prefix-cache hit; `patches` keeps them for engines with a ViSpec draft.
"""

from __future__ import annotations

import torch
from vllm.multimodal.utils import group_and_batch_mm_kwargs
from vllm.utils.platform_utils import is_pin_memory_available


class MissingImagePixels(LookupError):
    """The worker got no processed inputs for an image it must re-encode."""


def carries_pixels(feature) -> bool:
    """Does a `MultiModalFeatureSpec` still hold its encoder inputs (not only the host-side metadata vLLM keeps
    of a stripped item for M-RoPE positions)?"""
    data = feature.data
    return data is not None and any(e.data is not None and not e.field.keep_on_cpu for e in data.values())


class TargetImageEncoder:
    def __init__(self, target_model: torch.nn.Module, device: torch.device) -> None:
        self.target_model = target_model  # a vLLM `SupportsMultiModal` model
        self.device = device

    def __call__(self, feature) -> torch.Tensor:
        """[N, H]: what vLLM caches for this image (`runner.encoder_cache[feature.identifier]`)."""
        if not carries_pixels(feature):
            raise MissingImagePixels(f"image {feature.identifier} lies inside a prefix-cache hit and its pixels "
                                     "were not sent to the worker")
        ((_, _, kwargs),) = group_and_batch_mm_kwargs(
            [(feature.modality, feature.data)], device=self.device, pin_memory=is_pin_memory_available()
        )
        (embedding,) = self.target_model.embed_multimodal(**kwargs)
        return embedding
