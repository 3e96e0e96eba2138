"""The draft layer's attention backend and widened head size, chosen together (`choose_draft_backend`).

GPU platforms are vLLM 0.32's real CUDA selector (`CudaPlatformBase.get_attn_backend_cls`, with its real
per-generation priority lists) on a faked device capability, with stand-in backend classes where the real ones
need GPU libraries; the CPU platform is the real one of this machine. The last test runs a vLLM engine and checks
that the live draft layer runs the chosen backend at the chosen head size, in the target's KV-cache group.
"""

import importlib
import sys
import types
from collections.abc import Callable, Iterator

import pytest
import torch
import vllm.platforms
from conftest import vllm_engine
from parity import drafter_of
from vllm import SamplingParams
from vllm.config import AttentionConfig, VllmConfig, set_current_vllm_config
from vllm.platforms.interface import DeviceCapability
from vllm.utils.torch_utils import is_quantized_kv_cache
from vllm.v1.attention.backend import AttentionBackend
from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend
from vllm.v1.attention.backends.registry import AttentionBackendEnum
from vllm.v1.attention.backends.triton_attn import TritonAttentionBackend
from vllm.v1.attention.selector import _cached_get_attn_backend, get_attn_backend

from vispec_vllm.engine import draft_model
from vispec_vllm.engine.attention_backend import DraftBackendChoice, choose_draft_backend, draft_kv_share
from vispec_vllm.engine.kv_groups import check_draft_shares_target_kv_group

HOPPER, BLACKWELL = DeviceCapability(9, 0), DeviceCapability(10, 0)
SCALE = 128**-0.5


class StandInBackend(AttentionBackend):
    """A GPU backend's selection rules without its kernels (the selector only validates and imports it)."""

    supported_kv_cache_dtypes = ["auto", "float16", "bfloat16", "fp8", "fp8_e4m3"]

    @staticmethod
    def get_impl_cls():
        raise NotImplementedError

    @staticmethod
    def get_builder_cls():
        raise NotImplementedError


class FlashAttentionStandIn(StandInBackend):
    """vLLM's FlashAttention rules: multiples of 8 up to 256; on Blackwell a head above 128 falls back from FA4
    to FA2, which has no fp8 KV cache."""

    @staticmethod
    def get_name() -> str:
        return "FLASH_ATTN"

    @classmethod
    def supports_head_size(cls, head_size: int) -> bool:
        return head_size % 8 == 0 and head_size <= 256

    @classmethod
    def supports_combination(
        cls,
        head_size: int,
        dtype: torch.dtype,
        kv_cache_dtype: str | None,
        block_size: int | None,
        use_mla: bool,
        has_sink: bool,
        use_sparse: bool,
        use_mm_prefix: bool,
        device_capability: DeviceCapability,
    ) -> str | None:
        fa2_on_blackwell = device_capability.major >= 10 and head_size > 128
        if fa2_on_blackwell and kv_cache_dtype is not None and is_quantized_kv_cache(kv_cache_dtype):
            return "FP8 KV cache requires FA4 on SM100"
        return None


class FlashInferStandIn(StandInBackend):
    """vLLM's FlashInfer rules: head sizes 64, 128, 256 and 512 only."""

    @staticmethod
    def get_name() -> str:
        return "FLASHINFER"

    @classmethod
    def get_supported_head_sizes(cls) -> list[int]:
        return [64, 128, 256, 512]


GPU_BACKENDS = {
    AttentionBackendEnum.FLASH_ATTN: FlashAttentionStandIn,
    AttentionBackendEnum.FLASHINFER: FlashInferStandIn,
    AttentionBackendEnum.TRITON_ATTN: TritonAttentionBackend,  # the real one: it imports without a GPU
}
TRITON_ONLY = {AttentionBackendEnum.TRITON_ATTN: TritonAttentionBackend}

GpuPlatform = Callable[[DeviceCapability, dict[AttentionBackendEnum, type[AttentionBackend]]], None]


@pytest.fixture(autouse=True)
def fresh_selector() -> Iterator[None]:
    """vLLM caches its selections by configuration, not by platform: each test starts and ends with none."""
    _cached_get_attn_backend.cache_clear()
    yield
    _cached_get_attn_backend.cache_clear()


@pytest.fixture
def vllm_config() -> Iterator[VllmConfig]:
    config = VllmConfig()  # built on the real (CPU) platform, before a test swaps in a GPU one
    with set_current_vllm_config(config):
        yield config


@pytest.fixture
def gpu_platform(monkeypatch, vllm_config) -> Iterator[GpuPlatform]:
    """use(capability, backends): make vLLM's real CUDA platform class the current platform, on a device of that
    capability where only `backends` are installed (the others fail to import, as missing kernels do)."""
    imported_before = "vllm.platforms.cuda" in sys.modules
    stub = types.ModuleType("vllm._C_stable_libtorch")  # the CUDA build's op library, imported for its side effects
    monkeypatch.setitem(sys.modules, "vllm._C_stable_libtorch", stub)
    cuda = importlib.import_module("vllm.platforms.cuda")

    def use(capability: DeviceCapability, backends: dict[AttentionBackendEnum, type[AttentionBackend]]) -> None:
        class Platform(cuda.CudaPlatformBase):
            @classmethod
            def get_device_capability(cls, device_id: int = 0) -> DeviceCapability:
                return capability

        def backend_class(backend: AttentionBackendEnum) -> type[AttentionBackend]:
            if backend not in backends:
                raise ImportError(f"{backend.name} is not installed")
            return backends[backend]

        monkeypatch.setattr(cuda, "_get_attn_backend_class", backend_class)
        monkeypatch.setattr(vllm.platforms, "_current_platform", Platform())

    yield use
    if not imported_before:
        sys.modules.pop("vllm.platforms.cuda")
        delattr(vllm.platforms, "cuda")


def choose(head_dim: int, kv_cache_dtype: str = "auto", dtype: torch.dtype = torch.bfloat16) -> DraftBackendChoice:
    return choose_draft_backend(head_dim, head_dim**-0.5, dtype, kv_cache_dtype)


@pytest.mark.parametrize("head_dim,padded", [(128, 136), (80, 88)])
def test_hopper_takes_flash_attention_with_eight_more(gpu_platform, head_dim, padded):
    gpu_platform(HOPPER, GPU_BACKENDS)
    choice = choose(head_dim)
    assert choice.backend is FlashAttentionStandIn
    assert choice.flags.padded_dim == padded
    assert choice.flags.head_dim == head_dim


@pytest.mark.parametrize("head_dim,padded", [(128, 136), (80, 88)])
def test_blackwell_takes_flash_attention_over_flashinfers_power_of_two(gpu_platform, head_dim, padded):
    """FlashInfer, vLLM's first choice there, would take 256 for 128 and 128 for 80."""
    gpu_platform(BLACKWELL, GPU_BACKENDS)
    assert get_attn_backend(128, torch.bfloat16, "auto") is FlashInferStandIn  # vLLM's own pick for a 128 head
    choice = choose(head_dim)
    assert (choice.backend, choice.flags.padded_dim) == (FlashAttentionStandIn, padded)


def test_blackwell_fp8_kv_cache_keeps_the_small_head_on_triton(gpu_platform):
    """FlashAttention above 128 is FA2 there, without fp8 KV: Triton takes 136 with fp8, FlashInfer would take 256."""
    gpu_platform(BLACKWELL, GPU_BACKENDS)
    choice = choose(128, kv_cache_dtype="fp8")
    assert (choice.backend, choice.flags.padded_dim) == (TritonAttentionBackend, 136)


@pytest.mark.parametrize("head_dim,padded", [(128, 136), (80, 88), (16, 32)])
def test_triton_only_takes_its_smallest_size(gpu_platform, head_dim, padded):
    """vLLM's Triton backend takes any head size from 32 up."""
    gpu_platform(HOPPER, TRITON_ONLY)
    choice = choose(head_dim)
    assert (choice.backend, choice.flags.padded_dim) == (TritonAttentionBackend, padded)


def test_a_backend_forced_for_the_draft_is_kept_with_its_larger_head(gpu_platform, vllm_config):
    vllm_config.attention_config = AttentionConfig(backend=AttentionBackendEnum.FLASHINFER)
    gpu_platform(BLACKWELL, GPU_BACKENDS)
    choice = choose(128)
    assert (choice.backend, choice.flags.padded_dim) == (FlashInferStandIn, 256)


def test_a_forced_backend_that_takes_no_size_names_the_selectors_reason(gpu_platform, vllm_config):
    vllm_config.attention_config = AttentionConfig(backend=AttentionBackendEnum.FLASHINFER)
    gpu_platform(BLACKWELL, GPU_BACKENDS)
    with pytest.raises(ValueError, match=r"accepts no head size above the draft's 128.*dtype not supported"):
        choose(128, dtype=torch.float32)  # the stand-in, like FlashInfer, takes only fp16/bf16


@pytest.mark.parametrize("head_dim,padded", [(32, 64), (64, 80), (80, 96), (128, 160)])
def test_cpu_platform_takes_cpu_attn_at_its_next_size(vllm_config, head_dim, padded):
    choice = choose(head_dim, dtype=torch.float32)
    assert choice.backend is CPUAttentionBackend
    assert choice.flags.padded_dim == padded


def test_draft_kv_share_of_qwen2_5_vl_7b():
    """The official draft: 28 KV heads of 128; the target: 28 layers of 4 KV heads of 128."""
    at_136 = draft_kv_share(28, 136, 28, 4, 128)
    at_256 = draft_kv_share(28, 256, 28, 4, 128)
    assert at_136 == pytest.approx(136 / (512 + 136))
    assert round(at_136, 2) == 0.21
    assert at_256 == pytest.approx(1 / 3)


class MarkedCPUAttention(CPUAttentionBackend):
    """CPU_ATTN under another class: only a layer built with the chosen backend explicitly can have it."""


@pytest.mark.vllm
def test_live_draft_layer_runs_the_chosen_backend_in_the_targets_kv_group(monkeypatch, tiny_target, tiny_draft):
    choices = []

    def marked_choice(*args, **kwargs) -> DraftBackendChoice:
        choice = choose_draft_backend(*args, **kwargs)
        choices.append(choice)
        return DraftBackendChoice(backend=MarkedCPUAttention, flags=choice.flags)

    monkeypatch.setattr(draft_model, "choose_draft_backend", marked_choice)
    spec = {"method": "eagle", "model": str(tiny_draft("qwen2_5_vl")), "num_speculative_tokens": 3}
    with vllm_engine(model=str(tiny_target("qwen2_5_vl")), speculative_config=spec, block_size=32) as llm:
        out = llm.generate(["Tell me a story about a cat."], SamplingParams(temperature=0.0, max_tokens=8))
        drafter = drafter_of(llm)
        runner = llm.llm_engine.engine_core.engine_core.model_executor.driver_worker.worker.model_runner
        attention = drafter.model.model.layers[0].self_attn
        group = check_draft_shares_target_kv_group(runner.kv_cache_config, drafter._draft_attn_layer_names)
    assert len(out[0].outputs[0].token_ids) == 8
    assert [(c.backend, c.flags.head_dim, c.flags.padded_dim) for c in choices] == [(CPUAttentionBackend, 32, 64)]
    assert attention.attn.attn_backend is MarkedCPUAttention
    assert attention.attn.head_size == attention.flags.padded_dim == 64
    assert group == drafter.kv_cache_gid == 0
