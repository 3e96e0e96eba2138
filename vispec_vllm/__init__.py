"""ViSpec (vision-aware speculative decoding) for vLLM 0.32."""

from vispec_vllm.compat import check_vllm_version

__version__ = "0.1.0"

check_vllm_version()


def register() -> None:
    """`vllm.general_plugins` entry point (runs in every vLLM process)."""
    from vispec_vllm.plugin import register as _register

    _register()
