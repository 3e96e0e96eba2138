"""An OpenAI-compatible `vllm serve` for tests (`vispec_vllm.server_process`): the tiny Qwen2.5-VL target, with or
without a ViSpec draft, greedy float32; failures to start fail the test."""

from __future__ import annotations

import json
import time
from pathlib import Path

import httpx
import pytest

from vispec_vllm.server_process import ServerError, ServerProcess, launch_server

MODEL_NAME = "tiny-qwen2_5_vl"
STARTUP_LIMIT_S = 300  # a guard against a hung start-up, not a measurement

Server = ServerProcess


def speculative_config(draft: Path, num_speculative_tokens: int = 3, **extra) -> dict:
    return {"method": "eagle", "model": str(draft), "num_speculative_tokens": num_speculative_tokens, **extra}


def start_server(
    target: Path,
    workdir: Path,
    *,
    spec: dict | None = None,
    max_num_seqs: int = 4,
    max_images: int = 1,
    env: dict[str, str] | None = None,
) -> Server:
    """Starts the server process (it is not serving yet: see `wait_until_healthy`); `spec`: the speculative
    config, None for the target alone. Greedy float32, so outputs can be compared token for token."""
    media_dir = workdir / "media"
    media_dir.mkdir()
    serve_args = [
        "--served-model-name", MODEL_NAME,
        "--dtype", "float32",
        "--enforce-eager",
        "--max-model-len", "1024",
        "--max-num-seqs", str(max_num_seqs),
        "--seed", "0",
        "--limit-mm-per-prompt", json.dumps({"image": max_images}),
    ]  # fmt: skip
    if spec is not None:
        serve_args += ["--speculative-config", json.dumps(spec)]
    return launch_server(target, serve_args, workdir / "server.log", media_dir=media_dir,
                         env={"VLLM_CPU_KVCACHE_SPACE": "1", **(env or {})})


def wait_until_healthy(server: Server) -> None:
    """Fails the test if the server exits or is not healthy in time; records its engine processes."""
    try:
        server.wait_until_healthy(STARTUP_LIMIT_S)
    except ServerError as error:
        pytest.fail(str(error))


def wait_for_exit(server: Server, limit_s: float) -> float:
    """For a server that should fail to start: the seconds until it exits (fails the test past `limit_s`). Its
    descendants are recorded meanwhile, so `stop` can check that none outlives it."""
    start = time.monotonic()
    while server.process.poll() is None:
        if time.monotonic() - start > limit_s:
            pytest.fail(f"server still running after {limit_s} s:\n{server.log_tail()}")
        server.record_descendants()
        time.sleep(0.2)
    return time.monotonic() - start


def metric_samples(server: Server, prefix: str) -> dict[str, list]:
    """Samples of the Prometheus metrics on /metrics whose name starts with `prefix`, by sample name."""
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(f"{server.base_url}/metrics", timeout=10).text
    samples: dict[str, list] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name.startswith(prefix):
                samples.setdefault(sample.name, []).append(sample)
    return samples
