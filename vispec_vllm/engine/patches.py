"""Every change this plugin makes to vLLM, in one place. Idempotent; vLLM 0.32 only.

1. `EagleProposer` -> `ViSpecProposer` in `vllm.v1.spec_decode.eagle` (and in the V1 GPU/CPU runner module if
   it was imported first): vLLM has no proposer registry. The subclass is the stock proposer for non-ViSpec
   drafts.
2. `VllmConfig._get_v2_model_runner_unsupported_features` also reports a ViSpec draft, so vLLM itself falls
   back to the V1 runner with its usual one-line warning (ViSpec drives V1's proposer; Model Runner V2,
   the CUDA default, has a different speculator).
3. `EAGLEConfig.__init__` flattens an official ViSpec draft config first. Those configs are flat copies of
   the target family's config (`model_type: qwen2_5_vl` / `llava_next`); transformers 5 parses them as
   composite VLM configs (Qwen: the text keys move into `text_config`, so `vocab_size` is missing at the top,
   which EAGLEConfig needs; LLaVA: a default `text_config` with the wrong vocabulary sits next to the real
   flat keys). The flat draft config is rebuilt from the text config overlaid with the top-level keys.
4. `EngineArgs.create_engine_config` checks a ViSpec draft against its target (`validation.check_vispec_config`)
   once vLLM has built the config, in the main process: a bad pairing fails in seconds, as the last line of
   `vllm serve` / `LLM(...)`, instead of inside the worker behind "Engine core initialization failed".
5. `ImageMediaIO.load_bytes` reports an image over Pillow's decompression-bomb limit (> 178,956,970 pixels,
   read from the header) as a bad request (HTTP 400) instead of an internal error (500): vLLM checks
   `VLLM_MAX_IMAGE_PIXELS` only after `Image.open`, which raises `DecompressionBombError` first.
6. On the CPU platform, `register_triton_kernel_overrides` (where a CPU worker installs vLLM's C++ fallbacks
   for Triton kernels, at worker start, before the model runner exists) is followed by three corrections of
   vLLM's CPU sampling, each applied only where a probe shows vLLM's own code broken (`cpu_sampling`):
   a. the rejection sampler's `expand_kernel` fallback (`cpu_triton_utils._expand_kernel_impl`) writes any
      non-int64 output into an int64 copy it drops, so the per-token temperatures (and top-k, top-p) of a
      verify step stay uninitialised memory: target rows turn NaN, drafts are rejected and T > 0 output is
      not the target's distribution. It is replaced, where rejection sampling launches it
      (`rejection_sampler._expand.kernel`, and the module's `expand_kernel`), by a dtype-preserving expand
      (`cpu_sampling.expand_per_request`).
   b. `topk_topp_sampler.apply_top_k_only` (the CPU top-k path) fails on a batch of no rows, which the
      rejection sampler passes it on every step without drafts (a prefill) once speculation is on: any
      request with `top_k` stopped the engine. An empty batch is returned unchanged.
   c. `GPUModelRunner._bookkeeping_sync` (in `sample_tokens`) rewinds the seeded generator of a request
      whose sample is discarded (a chunk of a prompt) with `Generator.get_offset`, which CPU generators
      lack: a request with a `seed` and a chunked prompt stopped the engine (with or without speculation).
      `CPUModelRunner.sample_tokens` holds such a request's generator out of that step instead, so a
      discarded sample never draws from it (what the GPU rewind achieves).
7. `Scheduler.schedule` of an engine with a ViSpec draft sends a new request's multimodal items to the worker
   whole: vLLM 0.32 strips the processed inputs (pixels) of an item that lies inside the request's prefix-cache
   hit (`strip_covered_mm_data`), and the draft re-encodes such an image when its adaptor output was evicted
   (`image_encoder`). With one worker in the engine process (the default executor at TP=1) they are references
   to what the scheduler holds anyway; worker processes (TP > 1) receive them serialized, as before vLLM
   stripped them.
8. `GPUModelRunner._on_request_state_removed` (vLLM's hook for request-scoped side caches, called as the runner
   drops a finished or aborted request) also drops the request from the ViSpec proposer's image state, which
   otherwise forgets requests only in its next `propose()`. No `propose()` follows the last requests of a burst,
   so their image state (spans, adaptor outputs) stayed until the next request came; and a request id reused at
   once (with vLLM's `VLLM_DISABLE_REQUEST_ID_RANDOMIZATION`) kept the old request's images.
9. `InputProcessingContext.call_hf_processor` names the cause of a HuggingFace processor's failure in the
   ValueError it raises (HTTP 400): vLLM's message lists only the processor, the data and the kwargs, so an image
   the processor refuses (Qwen2-VL: aspect ratio over 200) was answered without the reason.
"""

from __future__ import annotations

import functools
import inspect
import sys
from collections.abc import Callable

from vllm.logger import init_logger

from vispec_vllm.compat import check_vllm_version
from vispec_vllm.model_names import family_of, is_vispec_architecture

PATCH_MARK = "__vispec_patched__"
V2_REASON = "the ViSpec draft (vispec-vllm drives V1's EAGLE proposer)"
RUNNER_MODULES = ("vllm.v1.worker.gpu_model_runner",)

logger = init_logger(f"vllm.{__name__}")  # under vLLM's configured logger, so the lines show


def apply_patches() -> None:
    check_vllm_version(required=True)
    _swap_proposer()
    _report_vispec_to_v2_runner()
    _flatten_vispec_draft_configs()
    _check_vispec_config_in_main_process()
    _reject_decompression_bombs_as_bad_requests()
    _correct_cpu_sampling_at_worker_start()
    _send_whole_mm_items_to_vispec_workers()
    _forget_removed_requests_in_the_drafter()
    _name_the_cause_of_processor_errors()


def _swap_proposer() -> None:
    import vllm.v1.spec_decode.eagle as eagle_module

    from vispec_vllm.engine.proposer import ViSpecProposer

    eagle_module.EagleProposer = ViSpecProposer
    for name in RUNNER_MODULES:
        module = sys.modules.get(name)
        if module is not None and hasattr(module, "EagleProposer"):
            module.EagleProposer = ViSpecProposer


def wrap_method(owner: object, name: str, make_wrapper: Callable[[Callable], Callable]) -> None:
    """Replace `owner.name` with `make_wrapper(original)`, once: a wrapped method is marked and left alone.

    `owner` is a class or a module. A classmethod stays one: its wrapper, like a method's, takes `cls` first.
    """
    is_classmethod = isinstance(inspect.getattr_static(owner, name), classmethod)
    original = getattr(owner, name).__func__ if is_classmethod else getattr(owner, name)
    if getattr(original, PATCH_MARK, False):
        return
    wrapper = functools.wraps(original)(make_wrapper(original))
    setattr(wrapper, PATCH_MARK, True)
    setattr(owner, name, classmethod(wrapper) if is_classmethod else wrapper)


def drafts_with_vispec(vllm_config) -> bool:
    """Is the engine's speculative draft a ViSpec draft?"""
    spec = vllm_config.speculative_config
    draft = getattr(spec, "draft_model_config", None) if spec is not None else None
    architectures = getattr(getattr(draft, "hf_config", None), "architectures", None) or []
    return any(is_vispec_architecture(a) for a in architectures)


def _report_vispec_to_v2_runner() -> None:
    from vllm.config import VllmConfig

    def make(original):
        def unsupported_features(self: VllmConfig) -> list[str]:
            features = original(self)
            if drafts_with_vispec(self):
                features.append(V2_REASON)
            return features

        return unsupported_features

    wrap_method(VllmConfig, "_get_v2_model_runner_unsupported_features", make)


def flat_draft_config(config):
    """A ViSpec draft's composite (VLM-typed) config as one flat config; any other config unchanged."""
    from transformers import PreTrainedConfig

    architectures = getattr(config, "architectures", None) or []
    text_config = getattr(config, "text_config", None)
    if text_config is None or not any(family_of(a) for a in architectures):
        return config
    top = {k: v for k, v in config.to_dict().items() if k not in ("text_config", "vision_config")}
    merged = {**text_config.to_dict(), **top}
    return PreTrainedConfig(**merged)


def _flatten_vispec_draft_configs() -> None:
    from vllm.transformers_utils.configs.eagle import EAGLEConfig

    def make(original):
        def init(self, model=None, *args, **kwargs):
            if kwargs.get("method", "eagle") == "eagle" and model is not None and not isinstance(model, dict):
                model = flat_draft_config(model)
            original(self, model, *args, **kwargs)

        return init

    wrap_method(EAGLEConfig, "__init__", make)


def _check_vispec_config_in_main_process() -> None:
    from vllm.engine.arg_utils import EngineArgs

    from vispec_vllm.engine.validation import check_vispec_config

    def make(original):
        def create_engine_config(self, *args, **kwargs):
            config = original(self, *args, **kwargs)
            check_vispec_config(config)
            return config

        return create_engine_config

    wrap_method(EngineArgs, "create_engine_config", make)


def _reject_decompression_bombs_as_bad_requests() -> None:
    from PIL import Image
    from vllm.multimodal.media.image import ImageMediaIO

    def make(original):
        def load_bytes(self, data: bytes):
            try:
                return original(self, data)
            except Image.DecompressionBombError as err:  # vLLM turns ValueError into HTTP 400
                raise ValueError(f"Failed to load image: {err}") from None

        return load_bytes

    wrap_method(ImageMediaIO, "load_bytes", make)


def _correct_cpu_sampling_at_worker_start() -> None:
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        return

    def make(original):
        def register_triton_kernel_overrides(cls) -> None:
            original(cls)
            _replace_broken_cpu_expand_kernel()
            _let_cpu_top_k_take_empty_batches()
            _keep_seeded_generators_off_discarded_samples()

        return register_triton_kernel_overrides

    wrap_method(type(current_platform), "register_triton_kernel_overrides", make)


def _replace_broken_cpu_expand_kernel() -> None:
    import vllm.v1.sample.rejection_sampler as rejection_sampler
    from vllm.triton_utils.dispatcher import KernelOverride
    from vllm.utils import cpu_triton_utils

    from vispec_vllm.engine.cpu_sampling import expand_per_request, expand_writes_float_output

    installed = rejection_sampler.expand_kernel
    if getattr(installed, "func", None) is not cpu_triton_utils._expand_kernel_impl:
        return  # Triton's kernel, another platform's fallback, or already replaced
    if expand_writes_float_output(installed):
        return  # vLLM fixed its fallback
    fixed = KernelOverride(installed, expand_per_request)  # launched like the kernel: kernel[grid](...)
    rejection_sampler.expand_kernel = fixed
    rejection_sampler._expand.kernel = fixed  # the launcher `expand_batch_to_tokens` calls
    logger.info_once(
        "vispec-vllm: vLLM's CPU expand_kernel fallback drops non-int64 outputs (the per-token temperatures, "
        "top-k and top-p of speculative decoding); replaced by a dtype-preserving expand"
    )


def _let_cpu_top_k_take_empty_batches() -> None:
    import vllm.v1.sample.ops.topk_topp_sampler as topk_topp_sampler

    from vispec_vllm.engine.cpu_sampling import top_k_accepts_empty_batch

    if top_k_accepts_empty_batch(topk_topp_sampler.apply_top_k_only):
        return

    def make(original):
        def apply_top_k_only(logits, k):
            return logits if logits.shape[0] == 0 else original(logits, k)

        return apply_top_k_only

    wrap_method(topk_topp_sampler, "apply_top_k_only", make)
    logger.info_once("vispec-vllm: vLLM's CPU top-k now takes a batch of no rows (a step without drafts)")


def _keep_seeded_generators_off_discarded_samples() -> None:
    from vispec_vllm.engine.cpu_sampling import cpu_generators_have_offsets

    if cpu_generators_have_offsets():
        return
    from vllm.v1.worker.cpu_model_runner import CPUModelRunner

    def make(original):
        def sample_tokens(self, *args, **kwargs):
            generators = self.input_batch.generators
            discarded = self.discard_request_mask.np[: self.input_batch.num_reqs].nonzero()[0]
            held_out = {i: generators.pop(i) for i in map(int, discarded) if i in generators}
            try:
                return original(self, *args, **kwargs)
            finally:
                generators.update(held_out)

        return sample_tokens

    wrap_method(CPUModelRunner, "sample_tokens", make)
    logger.info_once("vispec-vllm: seeded requests with chunked prompts supported on the CPU runner")


def _send_whole_mm_items_to_vispec_workers() -> None:
    from vllm.v1.core.sched.scheduler import Scheduler

    def make(original):
        def schedule(self, *args, **kwargs):
            output = original(self, *args, **kwargs)
            if drafts_with_vispec(self.vllm_config):
                for new_request in output.scheduled_new_reqs:
                    new_request.mm_features = self.requests[new_request.req_id].mm_features
            return output

        return schedule

    wrap_method(Scheduler, "schedule", make)


def _forget_removed_requests_in_the_drafter() -> None:
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner  # after _swap_proposer: it binds ViSpecProposer

    def make(original):
        def on_request_state_removed(self, req_id, req_state) -> None:
            original(self, req_id, req_state)
            image_states = getattr(getattr(self, "drafter", None), "image_states", None)
            if image_states is not None:  # a ViSpec draft with images; `requests` no longer holds req_id
                image_states.update((), self.requests, self.encoder_cache)

        return on_request_state_removed

    wrap_method(GPUModelRunner, "_on_request_state_removed", make)


def _name_the_cause_of_processor_errors() -> None:
    from vllm.multimodal.processing.context import InputProcessingContext

    def make(original):
        def call_hf_processor(self, *args, **kwargs):
            try:
                return original(self, *args, **kwargs)
            except ValueError as err:
                cause = err.__cause__
                if cause is None or str(cause) in str(err):
                    raise
                raise ValueError(f"{err}: {type(cause).__name__}: {cause}") from cause

        return call_hf_processor

    wrap_method(InputProcessingContext, "call_hf_processor", make)
