"""The OpenAI-compatible server (`vllm serve`, started by `vispec_vllm.server_process`) with the
tiny Qwen2.5-VL target and its ViSpec draft, in its own process as deployed (engine core and worker processes),
driven by the `openai` client: images as data URLs and as files, streaming equal to non-streaming, the spec-decode
counters per draft position, bad requests answered 4xx while the server keeps serving (fixed cases and seeded
fuzzed images), and no process left behind once it is stopped. One server for the module; the start-up failures
(a bad speculative config, a draft whose weights do not fit it) start their own."""

import base64
import io
import random
import shutil
import struct
import time
import zlib

import openai
import pytest
from server_process import (
    MODEL_NAME,
    metric_samples,
    speculative_config,
    start_server,
    wait_for_exit,
    wait_until_healthy,
)

from vispec_vllm.factory import make_test_image
from vispec_vllm.media import image_part

pytestmark = pytest.mark.vllm

NUM_SPECULATIVE_TOKENS = 3
MAX_TOKENS = 16
QUESTION = {"type": "text", "text": "Describe the picture in a few words."}
MAX_IMAGE_PIXELS = 4096 * 4096  # the server's VLLM_MAX_IMAGE_PIXELS, below Pillow's decompression-bomb limit
NUM_FUZZED_IMAGES = 16
FAILED_START_LIMIT_S = 180  # a guard against a hung start-up, not a measurement


@pytest.fixture(scope="module")
def server(tiny_target, tiny_draft, tmp_path_factory):
    target, draft = tiny_target("qwen2_5_vl"), tiny_draft("qwen2_5_vl")
    spec = speculative_config(draft, NUM_SPECULATIVE_TOKENS)
    server = start_server(target, tmp_path_factory.mktemp("server"), spec=spec,
                          env={"VLLM_MAX_IMAGE_PIXELS": str(MAX_IMAGE_PIXELS)})
    try:
        wait_until_healthy(server)
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


def test_metrics_count_drafts_and_accepted_tokens_per_position(server, greedy_answer):
    for _ in range(20):  # the engine's stats reach the server's counters just after the response may have
        samples = metric_samples(server, "vllm:spec_decode_")
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


def _image_bytes(image, fmt: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


def _jpeg_part(data: bytes) -> dict:
    return _data_url_part(data, "image/jpeg")


BAD_IMAGES = {
    "garbage base64": (
        lambda server: [{"type": "image_url", "image_url": {"url": "data:image/png;base64,@@not*base64@@"}}],
        "base64",
    ),
    "bytes that are not an image": (lambda server: [_data_url_part(b"hello, world " * 8)], "Failed to load image"),
    "empty image data": (lambda server: [_data_url_part(b"")], "cannot identify image file"),
    "truncated image": (lambda server: [_data_url_part(_image_bytes(make_test_image(2))[:80])], "truncated"),
    "truncated JPEG": (
        lambda server: [_jpeg_part(_image_bytes(make_test_image(2), "JPEG")[:2000])],
        "image file is truncated",
    ),
    "zero-size image": (lambda server: [_data_url_part(_png_header_only(0, 0))], "cannot identify image file"),
    "image over VLLM_MAX_IMAGE_PIXELS": (
        lambda server: [_data_url_part(_png_header_only(5000, 5000))],
        f"exceed the maximum of {MAX_IMAGE_PIXELS} pixels",
    ),
    "image over the pixel limit": (lambda server: [_data_url_part(_png_header_only(20_000, 20_000))], "exceeds limit"),
    "aspect ratio over 200": (
        lambda server: [_data_url_part(_image_bytes(make_test_image(5, size=(3000, 2))))],
        "aspect ratio",
    ),
    "more images than limit_mm_per_prompt": (
        lambda server: [image_part(make_test_image(2)), image_part(make_test_image(3))],
        "At most 1 image",
    ),
    "file outside the allowed media path": (
        lambda server: [{"type": "image_url", "image_url": {"url": server.log.as_uri()}}],
        "allowed-local-media-path",
    ),
    "unsupported URL scheme": (
        lambda server: [{"type": "image_url", "image_url": {"url": "ftp://127.0.0.1/picture.png"}}],
        "must be either a HTTP, data or file URL",
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


def fuzzed_image(rng: random.Random) -> tuple[str, bytes]:
    """A PNG or JPEG of a seeded test image, then damaged one way: cut short, some bytes flipped, a run of bytes
    overwritten with noise, or everything after the format's signature replaced with noise."""
    fmt = rng.choice(("PNG", "JPEG"))
    data = bytearray(_image_bytes(make_test_image(rng.randrange(1000), size=(rng.randint(28, 300),) * 2), fmt))
    damage = rng.choice(("cut", "flip", "overwrite", "noise"))
    if damage == "cut":
        data = data[: rng.randrange(1, len(data))]
    elif damage == "flip":
        for offset in rng.sample(range(len(data)), rng.randint(1, 8)):
            data[offset] ^= 1 << rng.randrange(8)
    elif damage == "overwrite":
        start = rng.randrange(len(data))
        data[start : start + rng.randint(1, 64)] = rng.randbytes(rng.randint(1, 64))
    else:
        data = data[:8] + rng.randbytes(rng.randint(0, 4096))
    return fmt, bytes(data)


def test_fuzzed_images_get_an_answer_or_a_4xx_and_the_server_keeps_serving(server, client):
    rng = random.Random(0)
    outcomes = []
    for _ in range(NUM_FUZZED_IMAGES):
        fmt, data = fuzzed_image(rng)
        try:
            answer = chat(client, [_data_url_part(data, f"image/{fmt.lower()}"), QUESTION], max_tokens=2)
        except openai.APIStatusError as err:
            assert 400 <= err.status_code < 500, str(err)
            assert "image" in str(err).lower(), str(err)
            outcomes.append(err.status_code)
        else:
            assert answer.usage.completion_tokens == 2  # damage Pillow decodes through (JPEG, mostly)
            outcomes.append(200)
    print(f"\n{NUM_FUZZED_IMAGES} fuzzed images: {outcomes.count(200)} answered, {outcomes.count(400)} answered 400")
    assert outcomes.count(400) > 0
    after = chat(client, [image_part(make_test_image(4)), QUESTION], max_tokens=2)
    assert after.usage.completion_tokens == 2
    assert server.process.poll() is None


def _draft_with_a_misshapen_weight(draft, out):
    """A copy of `draft` whose `fc.weight` is narrower than its config.json says."""
    from safetensors.torch import load_file, save_file

    out.mkdir()
    shutil.copy(draft / "config.json", out / "config.json")
    weights = load_file(draft / "model.safetensors")
    rows, columns = weights["fc.weight"].shape
    weights["fc.weight"] = weights["fc.weight"][:, : columns - 56].contiguous()
    save_file(weights, out / "model.safetensors")
    return out, f"fc.weight expected [{rows}, {columns}] found [{rows}, {columns - 56}]"


@pytest.mark.parametrize("fault", ["unknown speculative-config key", "draft weight of the wrong shape"])
def test_bad_speculative_setup_stops_the_server_at_start_up_with_a_clear_error(tiny_target, tiny_draft, tmp_path,
                                                                               fault):
    draft = tiny_draft("qwen2_5_vl")
    if fault == "unknown speculative-config key":
        spec = speculative_config(draft, num_speculative_token=3)  # a typo of num_speculative_tokens
        expected = "num_speculative_token\n  Unexpected keyword argument"
    else:
        bad_draft, expected = _draft_with_a_misshapen_weight(draft, tmp_path / "draft")
        spec = speculative_config(bad_draft)
    server = start_server(tiny_target("qwen2_5_vl"), tmp_path, spec=spec)
    try:
        seconds = wait_for_exit(server, FAILED_START_LIMIT_S)
    finally:
        survivors = server.stop()
    print(f"\n{fault}: exit code {server.process.returncode} after {seconds:.0f} s")
    assert server.process.returncode != 0
    assert survivors == []
    assert expected in server.log.read_text(errors="replace"), server.log_tail()


def test_stopping_the_server_leaves_no_process(server):
    engine_processes = [p for p in server.descendants if p.is_running()]
    assert engine_processes, "the server should run its engine in child processes"
    survivors = server.stop()
    assert server.process.returncode is not None
    assert survivors == []
