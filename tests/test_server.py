"""The OpenAI-compatible server (`python -m vllm.entrypoints.openai.api_server`, equivalent to `vllm serve`) with the
tiny Qwen2.5-VL target and its ViSpec draft, in its own process as deployed (engine core and worker processes),
driven by the `openai` client: images as data URLs and as files, streaming equal to non-streaming, the spec-decode
counters per draft position, bad requests answered 4xx while the server keeps serving, and no process left
behind once it is stopped. One server for the module."""

import base64
import io
import json
import os
import signal
import socket
import struct
import subprocess
import sys
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import openai
import psutil
import pytest

from vispec_vllm.factory import make_test_image
from vispec_vllm.media import image_part

pytestmark = pytest.mark.vllm

MODEL_NAME = "tiny-qwen2_5_vl"
NUM_SPECULATIVE_TOKENS = 3
MAX_TOKENS = 16
QUESTION = {"type": "text", "text": "Describe the picture in a few words."}
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
            self.descendants += [p for p in _descendants(self.process.pid) if p not in self.descendants]
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


def _descendants(pid: int) -> list[psutil.Process]:
    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_server(target: Path, draft: Path, workdir: Path) -> Server:
    media_dir = workdir / "media"
    media_dir.mkdir()
    port = _free_port()
    spec = {"method": "eagle", "model": str(draft), "num_speculative_tokens": NUM_SPECULATIVE_TOKENS}
    command = [
        sys.executable, "-m", "vllm.entrypoints.openai.api_server",
        "--model", str(target),
        "--served-model-name", MODEL_NAME,
        "--host", "127.0.0.1",
        "--port", str(port),
        "--dtype", "float32",
        "--enforce-eager",
        "--max-model-len", "1024",
        "--max-num-seqs", "4",
        "--seed", "0",
        "--allowed-local-media-path", str(media_dir),
        "--limit-mm-per-prompt", json.dumps({"image": 1}),
        "--speculative-config", json.dumps(spec),
    ]  # fmt: skip
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "VLLM_CPU_KVCACHE_SPACE": "1"}
    env.pop("VLLM_ENABLE_V1_MULTIPROCESSING", None)  # conftest's in-process setting is for LLM() tests only
    log = workdir / "server.log"
    with log.open("wb") as sink:
        process = subprocess.Popen(command, stdout=sink, stderr=subprocess.STDOUT, env=env)
    return Server(process=process, base_url=f"http://127.0.0.1:{port}", log=log, media_dir=media_dir)


def wait_until_healthy(server: Server) -> None:
    deadline = time.monotonic() + STARTUP_LIMIT_S
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            pytest.fail(f"server exited with {server.process.returncode} during start-up:\n{server.log_tail()}")
        try:
            if httpx.get(f"{server.base_url}/health", timeout=5).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(1)
    pytest.fail(f"server not healthy after {STARTUP_LIMIT_S} s:\n{server.log_tail()}")


@pytest.fixture(scope="module")
def server(tiny_target, tiny_draft, tmp_path_factory):
    target, draft = tiny_target("qwen2_5_vl"), tiny_draft("qwen2_5_vl")
    server = start_server(target, draft, tmp_path_factory.mktemp("server"))
    try:
        wait_until_healthy(server)
        server.descendants = _descendants(server.process.pid)
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server.base_url}/v1", api_key="unused", max_retries=0, timeout=120)


def chat(client, content, max_tokens=MAX_TOKENS, **kwargs):
    return client.chat.completions.create(
        model=MODEL_NAME,
        messages=[{"role": "user", "content": content}],
        temperature=0.0,
        max_tokens=max_tokens,
        extra_body={"ignore_eos": True},
        **kwargs,
    )


@pytest.fixture(scope="module")
def greedy_answer(client):
    """The non-streaming greedy answer about test image 1, sent as a base64 data URL."""
    return chat(client, [image_part(make_test_image(1)), QUESTION])


def test_image_as_data_url_and_as_file_give_the_same_greedy_answer(server, client, greedy_answer):
    picture = server.media_dir / "picture.png"
    make_test_image(1).save(picture)
    by_file = chat(client, [{"type": "image_url", "image_url": {"url": picture.as_uri()}}, QUESTION])
    text_only = chat(client, [QUESTION], max_tokens=1)

    assert greedy_answer.choices[0].finish_reason == "length"
    assert greedy_answer.usage.completion_tokens == MAX_TOKENS
    assert greedy_answer.choices[0].message.content
    assert greedy_answer.usage.prompt_tokens > text_only.usage.prompt_tokens  # the image's tokens are in the prompt
    assert by_file.usage.prompt_tokens == greedy_answer.usage.prompt_tokens
    assert by_file.choices[0].message.content == greedy_answer.choices[0].message.content


def test_streamed_answer_equals_the_non_streaming_answer(client, greedy_answer):
    stream = chat(
        client, [image_part(make_test_image(1)), QUESTION], stream=True, stream_options={"include_usage": True}
    )
    pieces, usage = [], None
    for chunk in stream:
        pieces.extend(choice.delta.content or "" for choice in chunk.choices)
        usage = chunk.usage or usage
    assert len(pieces) > 1  # really streamed
    assert "".join(pieces) == greedy_answer.choices[0].message.content
    assert usage.completion_tokens == MAX_TOKENS


def spec_decode_samples(server) -> dict[str, list]:
    """Samples of the vllm:spec_decode_* counters on /metrics, by sample name."""
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(f"{server.base_url}/metrics", timeout=10).text
    samples: dict[str, list] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name.startswith("vllm:spec_decode_"):
                samples.setdefault(sample.name, []).append(sample)
    return samples


def test_metrics_count_drafts_and_accepted_tokens_per_position(server, greedy_answer):
    for _ in range(20):  # the engine's stats reach the server's counters just after the response may have
        samples = spec_decode_samples(server)
        if samples["vllm:spec_decode_num_drafts_total"][0].value > 0:
            break
        time.sleep(0.5)
    num_drafts = samples["vllm:spec_decode_num_drafts_total"][0].value
    assert num_drafts > 0
    assert samples["vllm:spec_decode_num_draft_tokens_total"][0].value == NUM_SPECULATIVE_TOKENS * num_drafts
    per_position = samples["vllm:spec_decode_num_accepted_tokens_per_pos_total"]
    assert sorted(s.labels["position"] for s in per_position) == [str(i) for i in range(NUM_SPECULATIVE_TOKENS)]
    assert sum(s.value for s in per_position) == samples["vllm:spec_decode_num_accepted_tokens_total"][0].value


def _data_url_part(data: bytes, mime: str = "image/png") -> dict:
    return {"type": "image_url", "image_url": {"url": f"data:{mime};base64,{base64.b64encode(data).decode()}"}}


def _png_header_only(width: int, height: int) -> bytes:
    """A valid PNG signature and IHDR claiming width x height, with almost no pixel data: a decompression bomb's
    header, which costs nothing to send."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8-bit RGB
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0")) + chunk(b"IEND", b"")


def _png_bytes(image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


BAD_IMAGES = {
    "garbage base64": (
        lambda server: [{"type": "image_url", "image_url": {"url": "data:image/png;base64,@@not*base64@@"}}],
        "base64",
    ),
    "bytes that are not an image": (lambda server: [_data_url_part(b"hello, world " * 8)], "Failed to load image"),
    "truncated image": (lambda server: [_data_url_part(_png_bytes(make_test_image(2))[:80])], "truncated"),
    "image over the pixel limit": (lambda server: [_data_url_part(_png_header_only(20_000, 20_000))], "exceeds limit"),
    "more images than limit_mm_per_prompt": (
        lambda server: [image_part(make_test_image(2)), image_part(make_test_image(3))],
        "At most 1 image",
    ),
    "file outside the allowed media path": (
        lambda server: [{"type": "image_url", "image_url": {"url": server.log.as_uri()}}],
        "allowed-local-media-path",
    ),
}


@pytest.mark.parametrize("case", list(BAD_IMAGES))
def test_bad_image_request_gets_4xx_and_the_server_keeps_serving(server, client, case):
    make_parts, expected = BAD_IMAGES[case]
    with pytest.raises(openai.APIStatusError) as err:
        chat(client, [*make_parts(server), QUESTION], max_tokens=2)
    assert 400 <= err.value.status_code < 500, str(err.value)
    assert expected in str(err.value)

    after = chat(client, [image_part(make_test_image(4)), QUESTION], max_tokens=2)
    assert after.usage.completion_tokens == 2
    assert server.process.poll() is None


def test_stopping_the_server_leaves_no_process(server):
    engine_processes = [p for p in server.descendants if p.is_running()]
    assert engine_processes, "the server should run its engine in child processes"
    survivors = server.stop()
    assert server.process.returncode is not None
    assert survivors == []
