"""`python -m vispec_vllm.install_check`: print what the environment has and fail loudly on a bad vLLM."""

from __future__ import annotations

import importlib.metadata
import sys

from vispec_vllm.compat import check_vllm_version


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def main() -> int:
    vllm_version = check_vllm_version(required=True)
    import torch

    print(f"python {sys.version.split()[0]}")
    print(f"vllm {vllm_version}  torch {torch.__version__}  cuda={torch.cuda.is_available()}")
    for dist in ("transformers", "tokenizers", "torchvision", "vispec-vllm"):
        print(f"{dist} {_version(dist)}")
    plugins = [ep.value for ep in importlib.metadata.entry_points(group="vllm.general_plugins")]
    if "vispec_vllm:register" not in plugins:
        print("vispec-vllm plugin entry point NOT found (pip install -e .)", file=sys.stderr)
        return 1
    print("vllm.general_plugins: vispec_vllm:register found")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
