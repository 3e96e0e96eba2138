"""Every change this plugin makes to vLLM, in one place. Idempotent; vLLM 0.32 only.

1. `EagleProposer` -> `ViSpecProposer` in `vllm.v1.spec_decode.eagle` (and in the V1 GPU/CPU runner module if
   it was imported first): vLLM has no proposer registry. The subclass is the stock proposer for non-ViSpec
   drafts.
2. `VllmConfig._get_v2_model_runner_unsupported_features` also reports a ViSpec draft, so vLLM itself falls
   back to the V1 runner with its usual one-line warning (ViSpec drives V1's proposer; Model Runner V2,
   the CUDA default, has a different speculator).
"""

from __future__ import annotations

import sys

from vispec_vllm.compat import check_vllm_version
from vispec_vllm.model_names import is_vispec_architecture

PATCH_MARK = "__vispec_patched__"
V2_REASON = "the ViSpec draft (vispec-vllm drives V1's EAGLE proposer)"
RUNNER_MODULES = ("vllm.v1.worker.gpu_model_runner",)


def apply_patches() -> None:
    check_vllm_version(required=True)
    _swap_proposer()
    _report_vispec_to_v2_runner()


def _swap_proposer() -> None:
    import vllm.v1.spec_decode.eagle as eagle_module

    from vispec_vllm.engine.proposer import ViSpecProposer

    eagle_module.EagleProposer = ViSpecProposer
    for name in RUNNER_MODULES:
        module = sys.modules.get(name)
        if module is not None and hasattr(module, "EagleProposer"):
            module.EagleProposer = ViSpecProposer


def _report_vispec_to_v2_runner() -> None:
    from vllm.config import VllmConfig

    original = VllmConfig._get_v2_model_runner_unsupported_features
    if getattr(original, PATCH_MARK, False):
        return

    def unsupported_features(self: VllmConfig) -> list[str]:
        features = original(self)
        spec = self.speculative_config
        draft = getattr(spec, "draft_model_config", None) if spec is not None else None
        architectures = getattr(getattr(draft, "hf_config", None), "architectures", None) or []
        if any(is_vispec_architecture(a) for a in architectures):
            features.append(V2_REASON)
        return features

    setattr(unsupported_features, PATCH_MARK, True)
    unsupported_features.__wrapped__ = original  # type: ignore[attr-defined]
    VllmConfig._get_v2_model_runner_unsupported_features = unsupported_features
