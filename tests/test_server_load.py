"""The OpenAI-compatible server under load and with clients that walk away, against the target alone.

Two servers, started together: the tiny Qwen2.5-VL target alone, and the target with the trained ViSpec draft
(its drafts are accepted, so the accept path of verification runs). 64 concurrent streaming chats with 0-3 images
of mixed sizes each: every one completes, the ViSpec server's greedy texts are the target's, and /health answers
throughout. Then clients that disconnect mid-stream at seeded points: the others' texts are still the target's,
the server aborts the requests of those that left (none runs on to its end) and keeps serving. p50/p99 latency
with and without ViSpec are printed (CPU numbers on a shared machine: not asserted).
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from dataclasses import dataclass

import httpx
import numpy as np
import openai
import pytest
from server_process import (
    MODEL_NAME,
    Server,
    metric_samples,
    speculative_config,
    start_server,
    wait_until_healthy,
)
from workload import MAX_IMAGES, mixed_image_contents

pytestmark = pytest.mark.vllm

NUM_REQUESTS = 64
MAX_TOKENS = 24
REQUEST_TIMEOUT_S = 300  # a guard against a hung request, not a measurement
HEALTH_TIMEOUT_S = 10
HEALTH_PERIOD_S = 0.1
NUM_DISCONNECTING = 8  # of the first 16 prompts
LONG_ANSWER = 600  # tokens, for the clients that disconnect
SETTLE_LIMIT_S = 30  # for the engine's counters to reach /metrics after the last response


@dataclass(frozen=True)
class Call:
    content: list[dict]
    max_tokens: int = MAX_TOKENS
    stop_after: int | None = None  # disconnect after this many content chunks


@dataclass
class Streamed:
    text: str
    latency_s: float
    completion_tokens: int | None  # None: the client disconnected before the usage chunk


async def stream_chat(client: openai.AsyncOpenAI, call: Call) -> Streamed:
    """One greedy streaming chat."""
    start = time.monotonic()
    stream = await client.chat.completions.create(
        model=MODEL_NAME,
        messages=[{"role": "user", "content": call.content}],
        temperature=0.0,
        max_tokens=call.max_tokens,
        stream=True,
        stream_options={"include_usage": True},
        extra_body={"ignore_eos": True},
    )
    pieces, completion_tokens = [], None
    async with stream:  # leaving the block closes the connection: a disconnect if the stream is not done
        async for chunk in stream:
            pieces.extend(choice.delta.content or "" for choice in chunk.choices)
            if chunk.usage is not None:
                completion_tokens = chunk.usage.completion_tokens
            if call.stop_after is not None and sum(map(bool, pieces)) >= call.stop_after:
                break
    return Streamed("".join(pieces), time.monotonic() - start, completion_tokens)


async def poll_health(http: httpx.AsyncClient, server: Server, done: asyncio.Event) -> list[int | str]:
    """/health every HEALTH_PERIOD_S until `done`: each poll's status code, or the error that replaced it."""
    answers: list[int | str] = []
    while not done.is_set():
        try:
            answers.append((await http.get(f"{server.base_url}/health", timeout=HEALTH_TIMEOUT_S)).status_code)
        except httpx.HTTPError as err:
            answers.append(repr(err))
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(done.wait(), HEALTH_PERIOD_S)
    return answers


async def _run_concurrently(server: Server, calls: list[Call]) -> tuple[list[Streamed], list[int | str]]:
    client = openai.AsyncOpenAI(base_url=f"{server.base_url}/v1", api_key="unused", max_retries=0,
                                timeout=REQUEST_TIMEOUT_S)
    async with client, httpx.AsyncClient() as http:
        done = asyncio.Event()
        poller = asyncio.create_task(poll_health(http, server, done))
        try:
            results = await asyncio.gather(*(stream_chat(client, call) for call in calls))
        finally:
            done.set()
            health = await poller
    return list(results), health


def run_concurrently(server: Server, calls: list[Call]) -> tuple[list[Streamed], list[int | str]]:
    """All calls at once (streaming), /health polled meanwhile: the results in call order and the polls."""
    return asyncio.run(_run_concurrently(server, calls))


def percentiles_ms(results: list[Streamed]) -> str:
    p50, p99 = np.percentile([r.latency_s for r in results], [50, 99]) * 1000
    return f"p50 {p50:.0f} ms, p99 {p99:.0f} ms"


def wait_until_idle(server: Server) -> None:
    """Until the server reports no running or waiting request (bounded: a stuck request fails the test)."""
    deadline = time.monotonic() + SETTLE_LIMIT_S
    while counter(server, "vllm:num_requests_running") + counter(server, "vllm:num_requests_waiting") > 0:
        assert time.monotonic() < deadline, f"requests still running after {SETTLE_LIMIT_S} s"
        time.sleep(0.5)


def counter(server: Server, name: str, **labels: str) -> float:
    """The sum of a counter's samples whose labels include `labels` (0 if none yet)."""
    samples = metric_samples(server, name).get(name, [])
    return sum(s.value for s in samples if labels.items() <= s.labels.items())


@pytest.fixture(scope="module")
def servers(tiny_target, trained_draft, tmp_path_factory):
    """(target alone, target + trained ViSpec draft), started together."""
    target = tiny_target("qwen2_5_vl")
    with contextlib.ExitStack() as stack:
        started = []
        for name, spec in (("target", None), ("vispec", speculative_config(trained_draft))):
            server = start_server(target, tmp_path_factory.mktemp(name), spec=spec, max_num_seqs=NUM_REQUESTS,
                                  max_images=MAX_IMAGES)
            stack.callback(server.stop)
            started.append(server)
        for server in started:
            wait_until_healthy(server)
        yield tuple(started)


@pytest.fixture(scope="module")
def prompts() -> list[list[dict]]:
    return mixed_image_contents(seed=0, count=NUM_REQUESTS)


@pytest.fixture(scope="module")
def target_run(servers, prompts):
    """The target alone's streamed answers to all prompts at once, and its /health polls meanwhile."""
    return run_concurrently(servers[0], [Call(p) for p in prompts])


def test_64_concurrent_streams_with_images_are_lossless_and_health_answers_throughout(servers, prompts, target_run):
    _, vispec = servers
    expected, target_health = target_run
    accepted_before = counter(vispec, "vllm:spec_decode_num_accepted_tokens_total")
    got, health = run_concurrently(vispec, [Call(p) for p in prompts])

    print(f"\n{NUM_REQUESTS} concurrent streams, {MAX_TOKENS} tokens each: target alone {percentiles_ms(expected)}; "
          f"with ViSpec {percentiles_ms(got)}; /health polls {len(target_health)} + {len(health)}")
    assert [r.completion_tokens for r in expected + got] == [MAX_TOKENS] * (2 * NUM_REQUESTS)
    mismatches = [i for i, (e, g) in enumerate(zip(expected, got, strict=True)) if e.text != g.text]
    assert mismatches == []
    assert len(health) > 0 and set(health) == {200}
    assert len(target_health) > 0 and set(target_health) == {200}
    assert counter(vispec, "vllm:spec_decode_num_accepted_tokens_total") > accepted_before
    assert {len(p) - 1 for p in prompts} == {0, 1, 2, 3}  # images a prompt


def test_clients_that_disconnect_mid_stream_are_aborted_and_the_rest_stay_lossless(servers, prompts, target_run):
    _, vispec = servers
    expected, _ = target_run
    count = 2 * NUM_DISCONNECTING
    rng = random.Random(1)
    leaving = set(rng.sample(range(count), NUM_DISCONNECTING))
    # a long answer, so the client leaves well before the server is done: 1-5 chunks of at most K+1 tokens
    calls = [Call(p, LONG_ANSWER, rng.randint(1, 5)) if i in leaving else Call(p)
             for i, p in enumerate(prompts[:count])]
    finished_before = counter(vispec, "vllm:request_success_total")
    generated_before = counter(vispec, "vllm:generation_tokens_total")

    got, health = run_concurrently(vispec, calls)

    for i, result in enumerate(got):
        if i in leaving:
            assert result.completion_tokens is None, i
            assert result.text.startswith(expected[i].text) or expected[i].text.startswith(result.text), i
        else:
            assert result.text == expected[i].text, i
    assert set(health) == {200}
    wait_until_idle(vispec)
    finished = counter(vispec, "vllm:request_success_total") - finished_before
    generated = counter(vispec, "vllm:generation_tokens_total") - generated_before
    left_with = generated - (count - NUM_DISCONNECTING) * MAX_TOKENS
    print(f"\n{count} streams, {NUM_DISCONNECTING} disconnecting after {[c.stop_after for c in calls if c.stop_after]} "
          f"chunks: {finished:.0f} finished, {left_with:.0f} tokens generated for the {NUM_DISCONNECTING} that left "
          f"(of {NUM_DISCONNECTING * LONG_ANSWER} asked)")
    assert finished == count - NUM_DISCONNECTING  # the others were aborted: none ran on to its end
    assert left_with < NUM_DISCONNECTING * LONG_ANSWER / 4
    after, _ = run_concurrently(vispec, [Call(prompts[0])])
    assert after[0].text == expected[0].text
