"""vLLM engines for the world's target, with or without a draft, and batch-1 timing of chat requests."""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field
from pathlib import Path

from vispec_vllm.engine.metrics import SpecDecodeCounters
from vispec_vllm.speculative_config import eagle_config

MAX_MODEL_LEN = 1024
# The world's engines get a fixed KV cache. Without one, vLLM-CPU reserves 92% of the machine's memory and refuses
# to start when less than that is free, which is most of the time on a 24 GiB machine.
# VLLM_CPU_KVCACHE_SPACE, when set, still overrides this.
KV_CACHE_BYTES = 1 << 30


def start_engine(target: Path, draft: Path | None, *, num_speculative_tokens: int = 3, max_num_seqs: int = 16,
                 dtype: str = "float32", draft_sample_method: str = "greedy"):
    """draft_sample_method: vLLM's option (see vispec_vllm/speculative_config.py)."""
    from vllm import LLM

    spec = None if draft is None else eagle_config(draft, num_speculative_tokens,
                                                   draft_sample_method=draft_sample_method)
    return LLM(model=str(target), dtype=dtype, enforce_eager=True, max_model_len=MAX_MODEL_LEN,
               max_num_seqs=max_num_seqs, limit_mm_per_prompt={"image": 1}, speculative_config=spec,
               kv_cache_memory_bytes=KV_CACHE_BYTES, disable_log_stats=False, seed=0)


def shutdown(llm) -> None:
    with contextlib.suppress(Exception):
        llm.llm_engine.engine_core.shutdown()


@dataclass
class Batch1Run:
    """One pass over the conversations, one request at a time."""

    token_ids: list[list[int]]
    texts: list[str]
    seconds: list[float]  # wall time per request, prefill included
    counters: SpecDecodeCounters = field(default_factory=SpecDecodeCounters)

    @property
    def tokens(self) -> int:
        return sum(len(t) for t in self.token_ids)

    @property
    def tokens_per_second(self) -> float:
        """Mean over requests of tokens / seconds (the ViSpec paper's speed)."""
        return sum(len(t) / s for t, s in zip(self.token_ids, self.seconds, strict=True)) / len(self.seconds)


def run_batch1(llm, conversations: list[list[dict]], params) -> Batch1Run:
    before = SpecDecodeCounters.from_metrics(llm.get_metrics())
    token_ids, texts, seconds = [], [], []
    for conversation in conversations:
        started = time.perf_counter()
        output = llm.chat([conversation], params, use_tqdm=False)[0].outputs[0]
        seconds.append(time.perf_counter() - started)
        token_ids.append(list(output.token_ids))
        texts.append(output.text)
    counters = SpecDecodeCounters.from_metrics(llm.get_metrics()) - before
    return Batch1Run(token_ids, texts, seconds, counters)
