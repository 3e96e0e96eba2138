"""Seeded chat workloads with 0-3 images of mixed sizes, and fault rounds on an in-process engine: requests aborted
at seeded steps (what vLLM does when a client disconnects) while a KV cache of a few blocks forces preemption and
recomputation. Shared by tests/test_server_load.py, tests/test_faults.py and the long soak, benchmarks/soak.py."""

from __future__ import annotations

import gc
import random
from dataclasses import dataclass
from pathlib import Path

import psutil
from parity import drafter_of

from vispec_vllm.factory import make_test_image
from vispec_vllm.media import image_part

MAX_IMAGES = 3
IMAGE_SIZES = ((112, 112), (224, 224), (300, 140), (96, 200), (160, 160))  # 16 to 64 image tokens after resizing
QUESTIONS = ("Describe the picture.", "What is shown here?", "List the colours.", "Tell a short story.")
FAULT_MAX_MODEL_LEN = 512  # room for 3 images (<= 192 tokens), the question and the longest answer
FAULT_BLOCK_SIZE = 32  # the CPU attention backend takes multiples of 32
FAULT_NUM_BLOCKS = 20  # 640 tokens for ~12 requests of up to ~300: running requests get preempted as they grow
FAULT_MAX_TOKENS = (16, 96)  # range of the answers' lengths
FAULT_MAX_STEPS = 5000  # a guard against a hung engine, not a measurement
FAULT_REQUESTS = 12  # a round
FAULT_ABORTS = 4  # planned a round; one planned after its request finished is skipped
FAULT_ABORT_WINDOW = 80  # engine steps from the start of a round


def mixed_image_contents(seed: int, count: int) -> list[list[dict]]:
    """OpenAI-style chat contents: 0-3 images of mixed sizes, before or after a question."""
    rng = random.Random(seed)
    contents = []
    for i in range(count):
        images = [image_part(make_test_image(1000 * seed + 10 * i + j, size=rng.choice(IMAGE_SIZES)))
                  for j in range(rng.randint(0, MAX_IMAGES))]
        question = {"type": "text", "text": f"{rng.choice(QUESTIONS)} ({seed}.{i})"}
        contents.append([*images, question] if rng.random() < 0.7 else [question, *images])
    return contents


@dataclass(frozen=True)
class Workload:
    contents: list[list[dict]]
    max_tokens: list[int]

    @property
    def num_images(self) -> int:
        return sum(part["type"] == "image_url" for content in self.contents for part in content)


def fault_workload(seed: int) -> Workload:
    rng = random.Random(-1 - seed)
    max_tokens = [rng.randint(*FAULT_MAX_TOKENS) for _ in range(FAULT_REQUESTS)]
    return Workload(mixed_image_contents(seed, FAULT_REQUESTS), max_tokens)


def fault_engine_kwargs(target: Path, draft: Path | None) -> dict:
    """`vllm_engine` arguments: greedy float32 with up to 3 images a prompt; with a draft, a KV cache of
    FAULT_NUM_BLOCKS blocks (the target alone gets vLLM's default, so its answers are never preempted). vLLM's
    multimodal processor cache is off: it keeps each new image's pixels (up to 4 GiB), which would blur the
    process's memory trend."""
    kwargs = dict(model=str(target), max_model_len=FAULT_MAX_MODEL_LEN, block_size=FAULT_BLOCK_SIZE, max_num_seqs=16,
                  limit_mm_per_prompt={"image": MAX_IMAGES}, mm_processor_cache_gb=0, disable_log_stats=False)
    if draft is not None:
        kwargs["speculative_config"] = {"method": "eagle", "model": str(draft), "num_speculative_tokens": 3}
        kwargs["num_gpu_blocks_override"] = FAULT_NUM_BLOCKS
    return kwargs


def _greedy(max_tokens: int):
    from vllm import SamplingParams

    return SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)


def _conversations(workload: Workload) -> list[list[dict]]:
    return [[{"role": "user", "content": content}] for content in workload.contents]


def reference_outputs(llm, workloads: list[Workload]) -> list[list[list[int]]]:
    """Each workload's greedy token ids from `llm` (the target alone), all in one batch."""
    conversations = [c for w in workloads for c in _conversations(w)]
    params = [_greedy(m) for w in workloads for m in w.max_tokens]
    outputs = iter(llm.chat(conversations, params, use_tqdm=False))
    return [[list(next(outputs).outputs[0].token_ids) for _ in w.contents] for w in workloads]


@dataclass
class RoundReport:
    requests: int
    aborted: int  # aborted while unfinished (waiting or running)
    mismatches: int  # finished requests whose token ids differ from the target alone's
    preemptions: int
    accepted_tokens: int
    rss_mib: float  # this process's resident memory after the round (the engine runs in it)
    drafter_requests: int  # the ViSpec proposer's per-request image states left after the round
    adaptor_cache: int  # its adaptor outputs kept by image identifier (a bounded LRU, shared across requests)
    runner_requests: int  # vLLM's model runner's request states left after the round

    def line(self) -> str:
        return (f"{self.requests} requests, {self.aborted} aborted, {self.preemptions} preemptions, "
                f"{self.mismatches} mismatches, {self.accepted_tokens} accepted draft tokens, RSS {self.rss_mib:.0f} "
                f"MiB, left: {self.drafter_requests} drafter / {self.runner_requests} runner request states, "
                f"{self.adaptor_cache} adaptor outputs cached")


def _counters(llm) -> dict[str, int]:
    return {m.name: m.value for m in llm.get_metrics() if hasattr(m, "value")}


def run_fault_round(llm, workload: Workload, expected: list[list[int]], rng: random.Random) -> RoundReport:
    """All requests at once, stepped by hand; FAULT_ABORTS of them (seeded) aborted at a seeded step in
    [0, FAULT_ABORT_WINDOW) if still unfinished then."""
    engine = llm.llm_engine
    before = _counters(llm)
    params = [_greedy(m) for m in workload.max_tokens]
    request_ids = llm.enqueue_chat(_conversations(workload), params, use_tqdm=False)
    # outputs carry the caller's id; vLLM appends "-" and 8 random characters to make its internal one
    index_of = {request_id.rsplit("-", 1)[0]: i for i, request_id in enumerate(request_ids)}
    abort_at = {i: rng.randrange(FAULT_ABORT_WINDOW) for i in rng.sample(range(len(request_ids)), FAULT_ABORTS)}
    finished: dict[int, list[int]] = {}
    aborted: set[int] = set()
    for step in range(FAULT_MAX_STEPS):
        for i in [i for i, at in abort_at.items() if at == step and i not in finished]:
            engine.abort_request([request_ids[i]], internal=True)
            aborted.add(i)
        if not engine.has_unfinished_requests():
            break
        for output in engine.step():
            if output.finished:
                finished[index_of[output.request_id]] = list(output.outputs[0].token_ids)
    else:
        raise TimeoutError(f"requests still unfinished after {FAULT_MAX_STEPS} engine steps")
    engine.step()  # tells the worker which requests ended, as a serving engine's busy loop does at once
    assert finished.keys() | aborted == set(range(len(request_ids))) and not finished.keys() & aborted
    after = _counters(llm)
    gc.collect()
    drafter = drafter_of(llm)
    return RoundReport(
        requests=len(request_ids),
        aborted=len(aborted),
        mismatches=sum(tokens != expected[i] for i, tokens in finished.items()),
        preemptions=after["vllm:num_preemptions"] - before["vllm:num_preemptions"],
        accepted_tokens=after["vllm:spec_decode_num_accepted_tokens"] - before["vllm:spec_decode_num_accepted_tokens"],
        rss_mib=psutil.Process().memory_info().rss / 2**20,
        drafter_requests=len(drafter.image_states.requests),
        adaptor_cache=len(drafter.image_states.adaptor_cache),
        runner_requests=len(drafter.runner.requests),
    )
