"""The one place vLLM is patched: applied by the plugin entry point, idempotent, reversible in what it reports."""

import importlib.metadata
import sys

import pytest

from vispec_vllm.model_names import VISPEC_ARCHITECTURES


def test_entry_point_is_declared():
    eps = importlib.metadata.entry_points(group="vllm.general_plugins")
    assert "vispec_vllm:register" in [ep.value for ep in eps]


def test_register_is_idempotent_and_swaps_the_proposer():
    import vllm.v1.spec_decode.eagle as eagle_module
    from vllm import ModelRegistry
    from vllm.config import VllmConfig
    from vllm.engine.arg_utils import EngineArgs
    from vllm.multimodal.media.image import ImageMediaIO
    from vllm.multimodal.processing.context import InputProcessingContext
    from vllm.transformers_utils.configs.eagle import EAGLEConfig
    from vllm.v1.core.sched.scheduler import Scheduler
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    import vispec_vllm
    from vispec_vllm.engine.patches import PATCH_MARK
    from vispec_vllm.engine.proposer import ViSpecProposer

    wrapped = [
        (VllmConfig, "_get_v2_model_runner_unsupported_features"),
        (EAGLEConfig, "__init__"),
        (EngineArgs, "create_engine_config"),
        (ImageMediaIO, "load_bytes"),
        (Scheduler, "schedule"),
        (GPUModelRunner, "_on_request_state_removed"),
        (InputProcessingContext, "call_hf_processor"),
    ]
    vispec_vllm.register()
    first = [getattr(owner, name) for owner, name in wrapped]
    vispec_vllm.register()
    for (owner, name), before in zip(wrapped, first, strict=True):
        after = getattr(owner, name)
        assert after is before and getattr(after, PATCH_MARK)  # patched exactly once
        assert not getattr(after.__wrapped__, PATCH_MARK, False)

    assert eagle_module.EagleProposer is ViSpecProposer
    runner = sys.modules.get("vllm.v1.worker.gpu_model_runner")
    if runner is not None:
        assert runner.EagleProposer is ViSpecProposer
    supported = ModelRegistry.get_supported_archs()
    for arch in VISPEC_ARCHITECTURES:
        assert arch in supported


def test_v2_runner_check_reports_only_vispec_drafts():
    from types import SimpleNamespace

    from vllm.config import VllmConfig

    import vispec_vllm
    from vispec_vllm.engine.patches import V2_REASON

    vispec_vllm.register()
    check = VllmConfig._get_v2_model_runner_unsupported_features

    def fake_config(architectures):
        draft = SimpleNamespace(hf_config=SimpleNamespace(architectures=architectures))
        spec = SimpleNamespace(
            draft_model_config=draft, method="eagle", parallel_drafting=False, use_heterogeneous_vocab=False
        )
        parallel = SimpleNamespace(distributed_executor_backend="mp", pipeline_parallel_size=1, use_ubatching=False)
        return SimpleNamespace(speculative_config=spec, parallel_config=parallel)

    assert V2_REASON in check(fake_config(["EagleQwen2_5_VLForConditionalGeneration"]))
    assert V2_REASON not in check(fake_config(["EagleLlamaForCausalLM"]))


def test_cpu_sampling_corrections_are_applied_once_at_worker_start():
    """Patch 6: on the CPU platform, each time vLLM installs its CPU kernel fallbacks the broken expand is
    replaced again (vLLM re-installs its own), and the top-k and seeded-sampling wrappers are applied once."""
    import inspect

    import vllm.v1.sample.ops.topk_topp_sampler as topk_topp_sampler
    import vllm.v1.sample.rejection_sampler as rejection_sampler
    from vllm.platforms import current_platform
    from vllm.triton_utils import HAS_TRITON

    import vispec_vllm
    from vispec_vllm.engine.cpu_sampling import expand_per_request
    from vispec_vllm.engine.patches import PATCH_MARK

    if not current_platform.is_cpu() or HAS_TRITON:
        pytest.skip("the corrected fallbacks are vLLM's CPU ones, installed only without Triton-CPU")
    from vllm.v1.worker.cpu_model_runner import CPUModelRunner

    platform = type(current_platform)
    vispec_vllm.register()
    vispec_vllm.register()
    hook = inspect.getattr_static(platform, "register_triton_kernel_overrides")
    assert isinstance(hook, classmethod) and getattr(hook.__func__, PATCH_MARK)
    assert not getattr(hook.__func__.__wrapped__, PATCH_MARK, False)
    for _ in range(2):
        current_platform.register_triton_kernel_overrides()
        assert rejection_sampler.expand_kernel.func is expand_per_request
        assert rejection_sampler._expand.kernel is rejection_sampler.expand_kernel
        for owner, name in ((topk_topp_sampler, "apply_top_k_only"), (CPUModelRunner, "sample_tokens")):
            wrapper = getattr(owner, name)
            assert getattr(wrapper, PATCH_MARK) and not getattr(wrapper.__wrapped__, PATCH_MARK, False)
