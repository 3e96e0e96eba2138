"""An OpenAI-compatible vLLM server (`python -m vllm.entrypoints.openai.api_server`, equivalent to `vllm serve`) for
tests: the tiny Qwen2.5-VL target, with or without a ViSpec draft, in its own process on 127.0.0.1, every wait
bounded, and every descendant process stopped with it."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import psutil
import pytest

MODEL_NAME = "tiny-qwen2_5_vl"
STARTUP_LIMIT_S = 300  # a guard against a hung start-up, not a measurement
STOP_LIMIT_S = 60


@dataclass
class Server:
    process: subprocess.Popen
    base_url: str
    log: Path
    media_dir: Path
    descendants: list[psutil.Process] = field(default_factory=list)

    def log_tail(self, num_lines: int = 40) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-num_lines:])

    def stop(self) -> list[psutil.Process]:
        """SIGTERM, then SIGKILL if it does not exit; returns the descendants still alive (killed as well)."""
        if self.process.poll() is None:
            self.descendants += [p for p in descendants(self.process.pid) if p not in self.descendants]
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=STOP_LIMIT_S)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        _, alive = psutil.wait_procs(self.descendants, timeout=STOP_LIMIT_S)
        for process in alive:
            process.kill()
        return alive


def descendants(pid: int) -> list[psutil.Process]:
    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


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
    port = _free_port()
    command = [
        sys.executable, "-m", "vllm.entrypoints.openai.api_server",
        "--model", str(target),
        "--served-model-name", MODEL_NAME,
        "--host", "127.0.0.1",
        "--port", str(port),
        "--dtype", "float32",
        "--enforce-eager",
        "--max-model-len", "1024",
        "--max-num-seqs", str(max_num_seqs),
        "--seed", "0",
        "--allowed-local-media-path", str(media_dir),
        "--limit-mm-per-prompt", json.dumps({"image": max_images}),
    ]  # fmt: skip
    if spec is not None:
        command += ["--speculative-config", json.dumps(spec)]
    full_env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "VLLM_CPU_KVCACHE_SPACE": "1"}
    full_env.pop("VLLM_ENABLE_V1_MULTIPROCESSING", None)  # conftest's in-process setting is for LLM() tests only
    full_env.update(env or {})
    log = workdir / "server.log"
    with log.open("wb") as sink:
        process = subprocess.Popen(command, stdout=sink, stderr=subprocess.STDOUT, env=full_env)
    return Server(process=process, base_url=f"http://127.0.0.1:{port}", log=log, media_dir=media_dir)


def wait_until_healthy(server: Server) -> None:
    """Fails the test if the server exits or is not healthy in time; records its engine processes."""
    deadline = time.monotonic() + STARTUP_LIMIT_S
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            pytest.fail(f"server exited with {server.process.returncode} during start-up:\n{server.log_tail()}")
        try:
            if httpx.get(f"{server.base_url}/health", timeout=5).status_code == 200:
                server.descendants = descendants(server.process.pid)
                return
        except httpx.TransportError:
            pass
        time.sleep(1)
    pytest.fail(f"server not healthy after {STARTUP_LIMIT_S} s:\n{server.log_tail()}")


def wait_for_exit(server: Server, limit_s: float) -> float:
    """For a server that should fail to start: the seconds until it exits (fails the test past `limit_s`). Its
    descendants are recorded meanwhile, so `stop` can check that none outlives it."""
    start = time.monotonic()
    while server.process.poll() is None:
        if time.monotonic() - start > limit_s:
            pytest.fail(f"server still running after {limit_s} s:\n{server.log_tail()}")
        server.descendants += [p for p in descendants(server.process.pid) if p not in server.descendants]
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
