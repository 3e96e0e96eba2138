"""A `vllm serve` process on 127.0.0.1 (started as `python -m vllm.entrypoints.cli.main serve`, which is what the
`vllm` script runs): its log in a file, every wait bounded, and every descendant process stopped with it.
Used by the serving benchmark and by the server tests."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import psutil

STOP_LIMIT_S = 60


class ServerError(RuntimeError):
    """The server exited or did not become healthy; the message ends with the tail of its log."""


@dataclass
class ServerProcess:
    process: subprocess.Popen
    base_url: str
    log: Path
    media_dir: Path | None = None  # --allowed-local-media-path, if any
    descendants: list[psutil.Process] = field(default_factory=list)

    def log_tail(self, num_lines: int = 40) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-num_lines:])

    def wait_until_healthy(self, limit_s: float) -> None:
        """Returns once /health answers 200, and records the engine processes; ServerError if the process exits
        or `limit_s` passes first."""
        import httpx

        deadline = time.monotonic() + limit_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise ServerError(f"server exited with {self.process.returncode} during start-up:\n{self.log_tail()}")
            try:
                if httpx.get(f"{self.base_url}/health", timeout=5).status_code == 200:
                    self.descendants = descendants(self.process.pid)
                    return
            except httpx.TransportError:
                pass
            time.sleep(1)
        raise ServerError(f"server not healthy after {limit_s:.0f} s:\n{self.log_tail()}")

    def record_descendants(self) -> None:
        self.descendants += [p for p in descendants(self.process.pid) if p not in self.descendants]

    def stop(self) -> list[psutil.Process]:
        """SIGTERM, then SIGKILL if it does not exit; returns the descendants still alive (killed as well)."""
        if self.process.poll() is None:
            self.record_descendants()
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


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launch_server(model: Path, serve_args: list[str], log: Path, *, env: dict[str, str] | None = None,
                  media_dir: Path | None = None) -> ServerProcess:
    """Starts `vllm serve <model> --host 127.0.0.1 --port <free port> <serve_args>` (not serving yet: see
    `ServerProcess.wait_until_healthy`), offline, with stdout and stderr in `log`; `env` is added to this
    process's environment."""
    port = free_port()
    command = [sys.executable, "-m", "vllm.entrypoints.cli.main", "serve", str(model),
               "--host", "127.0.0.1", "--port", str(port), *serve_args]
    if media_dir is not None:
        command += ["--allowed-local-media-path", str(media_dir)]
    full_env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    full_env.pop("VLLM_ENABLE_V1_MULTIPROCESSING", None)  # an in-process setting of LLM() users, not for servers
    full_env.update(env or {})
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("wb") as sink:
        process = subprocess.Popen(command, stdout=sink, stderr=subprocess.STDOUT, env=full_env)
    return ServerProcess(process=process, base_url=f"http://127.0.0.1:{port}", log=log, media_dir=media_dir)
