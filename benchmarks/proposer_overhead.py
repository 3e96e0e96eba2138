"""Proposer overhead: ViSpec's `propose()` against stock EAGLE's, same draft size, same machine, same run.

Both drafts run inside real in-process vLLM engines on the same target, one engine after the other:

* ViSpec: the factory's ViSpec draft (`build_tiny_draft(stage="vispec")`), driven by `ViSpecProposer`;
* EAGLE: vLLM's stock EAGLE-1 (`LlamaForCausalLM` -> `EagleLlamaForCausalLM`), written here from the ViSpec
  draft's own decoder-layer and `fc` weights, so both drafts have the same sizes (hidden, heads, MLP).

Every request is one 448x448 image (256 image tokens on Qwen2.5-VL) plus a ~500-token question (~785 tokens
of prompt); every step verifies K = 3 drafts (4 query tokens per row). Only `propose()` is timed: wall clock
(`time.perf_counter`) and process CPU time around the call (CPU run, nothing to synchronise). The drafter's
`prepare_next_token_ids_padded` of the same step is timed too (ViSpec overrides it), outside `propose()`.
A call is a decode step of batch B when all B rows verify K drafts (one engine with max_num_seqs = the
largest batch serves every batch size; steps with other row counts, e.g. while prompts are still being
prefilled, are left out), and a prefill step when no row does. Each engine first runs two profiled rounds
at the largest batch (cProfile, then torch.profiler; they are also the warm-up), then timed rounds: two per
batch size by default, interleaved across batch sizes so a burst of load from other processes spoils few of
a batch size's steps, then a few one-request rounds for prefill samples. Reported: medians over the steps.
On a shared machine trust the CPU-time columns where they disagree with the wall-clock ones.

    .venv/bin/python benchmarks/proposer_overhead.py            # tiny, medium, hd128: ~10 min on 2 cores
    .venv/bin/python benchmarks/proposer_overhead.py --quick    # tiny only, ~2 min

Sizes: "tiny" is the factory target (hidden 128, 4 heads of 32, MLP 256); "medium" is the same target widened
to hidden 1024 (16 heads of 64, MLP 2816, 1 layer; built here with the factory's seeded weights), "hd128" the
same with 8 heads of 128, the head size of the 7B targets. The draft matches each (MHA, as the official drafts).
The ViSpec draft's heads are one flag coordinate wider in vLLM (CPU_ATTN sizes: 32 -> 64, 64 -> 80,
128 -> 160), so its attention reads more per key than EAGLE's, and fewer keys (whole dropped image blocks are
skipped). Tiny drafts are dominated by fixed per-call costs. Results: a table on stdout,
`results/proposer_overhead.json`, `results/proposer_overhead.png` and both proposers' profiles in
`results/proposer_overhead_profile.txt`.
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import gc
import inspect
import io
import itertools
import json
import os
import platform
import pstats
import random
import shutil
import statistics
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DEFAULT_MODEL_ROOT = REPO / "artifacts" / "benchmarks"
DEFAULT_RESULTS = REPO / "benchmarks" / "results"
NUM_SPECULATIVE_TOKENS = 3
IMAGE_SIDE = 448  # 32x32 patches of 14 px, merged 2x2: 256 image tokens
IMAGE_PIXELS = {"longest_edge": IMAGE_SIDE * IMAGE_SIDE, "shortest_edge": 112 * 112}
QUESTION_WORDS = 300  # ~500 text tokens with the factory tokenizer
RATIO_GOAL = 1.15
PROFILE_TOP = 25
QUESTION_VOCABULARY = (
    "red blue green circle square shape colour light shadow corner edge centre picture image scene story "
    "bright dark small large round sharp soft left right above below between behind front near far describe "
    "explain compare count where what which why how many the a of and with in on at to from is are was were"
)


# ---------------------------------------------------------------------------------------------- models
@dataclass(frozen=True)
class TextSize:
    """Language-model sizes of a widened benchmark target (vision tower as in the factory, wider output)."""

    hidden: int
    heads: int
    kv_heads: int
    intermediate: int
    layers: int
    mrope_section: tuple[int, int, int]  # sums to head_dim / 2


SIZES: dict[str, TextSize | None] = {
    "tiny": None,  # the factory target as built
    "medium": TextSize(hidden=1024, heads=16, kv_heads=4, intermediate=2816, layers=1, mrope_section=(8, 12, 12)),
    # the head size of the 7B targets (128): the one that decides how much the flag coordinate costs
    "hd128": TextSize(hidden=1024, heads=8, kv_heads=2, intermediate=2816, layers=1, mrope_section=(16, 24, 24)),
}
TARGET_MARKER = "proposer_overhead_target.json"
PROCESSOR_FILES = ("chat_template.jinja", "processor_config.json", "tokenizer.json", "tokenizer_config.json")


@dataclass(frozen=True)
class ModelSet:
    target: Path
    vispec_draft: Path
    eagle_draft: Path


def build_models(root: Path, size_name: str) -> ModelSet:
    from vispec_vllm.factory import build_tiny_draft, build_tiny_target

    tiny = build_tiny_target("qwen2_5_vl", root / "qwen2_5_vl-tiny")
    size = SIZES[size_name]
    target = tiny if size is None else build_wide_target(tiny, root / f"qwen2_5_vl-{size_name}", size)
    vispec = build_tiny_draft(target, root / f"{size_name}-draft-vispec", stage="vispec")
    eagle = write_stock_eagle_draft(vispec, root / f"{size_name}-draft-eagle1-llama")
    return ModelSet(target, vispec, eagle)


def build_wide_target(tiny_target: Path, out_dir: Path, size: TextSize, seed: int = 0) -> Path:
    """The tiny Qwen2.5-VL target with a wider language model; tokenizer and processor files are copied."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    from vispec_vllm.factory.weights import save_model, seeded_model

    identity = {**asdict(size), "seed": seed, "source": json.loads((tiny_target / "vispec_factory.json").read_text())}
    marker = out_dir / TARGET_MARKER
    if marker.is_file() and json.loads(marker.read_text()) == identity:
        return out_dir
    config = Qwen2_5_VLConfig.from_pretrained(tiny_target)
    text = config.text_config
    text.hidden_size, text.intermediate_size = size.hidden, size.intermediate
    text.num_attention_heads, text.num_key_value_heads = size.heads, size.kv_heads
    text.num_hidden_layers, text.layer_types = size.layers, ["full_attention"] * size.layers
    text.rope_parameters["mrope_section"] = list(size.mrope_section)
    config.vision_config.out_hidden_size = size.hidden
    model = seeded_model(Qwen2_5_VLForConditionalGeneration, config, seed)
    model.generation_config.bos_token_id = None
    shutil.rmtree(out_dir, ignore_errors=True)
    out_dir.mkdir(parents=True)
    save_model(model, out_dir)
    for name in PROCESSOR_FILES:
        shutil.copy2(tiny_target / name, out_dir / name)
    marker.write_text(json.dumps(identity, indent=2, sort_keys=True) + "\n")
    return out_dir


def write_stock_eagle_draft(vispec_draft: Path, out_dir: Path) -> Path:
    """A vLLM EAGLE-1 draft (`LlamaForCausalLM`) with the ViSpec draft's `fc` and decoder-layer weights.

    Same sizes as the ViSpec draft; no `embed_tokens`/`lm_head` (shared from the target), no input norm;
    vLLM's EAGLE `fc` has no bias, so the ViSpec `fc.bias` is dropped; `qkv_bias` keeps the q/k/v biases.
    """
    from safetensors.torch import load_file, save_file

    source = json.loads((vispec_draft / "config.json").read_text())
    weights = load_file(str(vispec_draft / "model.safetensors"))
    kept = {name: tensor for name, tensor in weights.items() if name == "fc.weight" or name.startswith("layers.0.")}
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": source["hidden_size"],
        "intermediate_size": source["intermediate_size"],
        "num_attention_heads": source["num_attention_heads"],
        "num_key_value_heads": source["num_key_value_heads"],
        "num_hidden_layers": 1,
        "vocab_size": source["vocab_size"],
        "max_position_embeddings": source["max_position_embeddings"],
        "rms_norm_eps": source["rms_norm_eps"],
        "rope_theta": source["rope_theta"],
        "hidden_act": "silu",
        "attention_bias": False,
        "qkv_bias": bool(source.get("qkv_bias", False)),
        "mlp_bias": False,
        "tie_word_embeddings": False,
        "torch_dtype": "float32",
    }
    shutil.rmtree(out_dir, ignore_errors=True)
    out_dir.mkdir(parents=True)
    (out_dir / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    save_file({name: kept[name].contiguous() for name in sorted(kept)}, str(out_dir / "model.safetensors"),
              metadata={"format": "pt"})
    return out_dir


# ---------------------------------------------------------------------------------------------- prompts
def question(seed: int) -> str:
    rng, words = random.Random(seed), QUESTION_VOCABULARY.split()
    return "Look at the picture. " + " ".join(rng.choice(words) for _ in range(QUESTION_WORDS)) + "?"


def conversations(count: int, first_seed: int) -> list[list[dict]]:
    """`count` one-image chats, all different (no two requests share an image or a question)."""
    from vispec_vllm.factory import make_test_image
    from vispec_vllm.media import image_part

    chats = []
    for seed in range(first_seed, first_seed + count):
        image = make_test_image(seed, size=(IMAGE_SIDE, IMAGE_SIDE))
        chats.append([{"role": "user", "content": [image_part(image), {"type": "text", "text": question(seed)}]}])
    return chats


# ---------------------------------------------------------------------------------------------- timing
@dataclass
class ProposeCall:
    kind: str  # "decode": every row verifies K drafts; "prefill": no row does; "mixed": both
    num_rows: int
    num_tokens: int
    propose_ms: float  # wall clock
    propose_cpu_ms: float  # CPU time of the process during the call (robust to other processes' load)
    prepare_ms: float  # wall clock of the drafter's prepare_next_token_ids_padded in the same step


@dataclass
class ProfileHooks:
    """Per-call profilers: cProfile (Python functions) and torch.profiler (aten ops, self CPU time)."""

    python: cProfile.Profile | None = None
    torch_ops: dict[str, list[float]] | None = None  # op -> [self CPU us, calls]
    rows: int = 0  # profile only decode calls of this many rows
    skip: int = 0  # ...after skipping this many of them
    profiled: int = 0  # calls profiled so far


class ProposeTimer:
    """Wraps the live drafter's `propose` and `prepare_next_token_ids_padded` (instance attributes)."""

    def __init__(self, drafter, num_speculative_tokens: int) -> None:
        self.calls: list[ProposeCall] = []
        self.recording = False
        self.hooks = ProfileHooks()
        self._decode_query_len = num_speculative_tokens + 1
        self._last_prepare_s = 0.0
        propose, prepare = drafter.propose, drafter.prepare_next_token_ids_padded
        signature = inspect.signature(propose)

        def timed_prepare(*args, **kwargs):
            start = time.perf_counter()
            out = prepare(*args, **kwargs)
            self._last_prepare_s = time.perf_counter() - start
            return out

        def timed_propose(*args, **kwargs):
            cad = signature.bind(*args, **kwargs).arguments["common_attn_metadata"]
            kind, num_rows = self._classify(cad)  # before the call: stock EAGLE rewrites the metadata
            num_tokens = int(cad.num_actual_tokens)
            profiling = self._should_profile(kind, num_rows)
            with self._profiled() if profiling else contextlib.nullcontext():
                start, start_cpu = time.perf_counter(), time.process_time()
                out = propose(*args, **kwargs)
                elapsed, elapsed_cpu = time.perf_counter() - start, time.process_time() - start_cpu
            if self.recording:
                prepare_ms = self._last_prepare_s * 1e3
                self.calls.append(ProposeCall(kind, num_rows, num_tokens, elapsed * 1e3, elapsed_cpu * 1e3, prepare_ms))
            self._last_prepare_s = 0.0
            return out

        drafter.propose = timed_propose
        drafter.prepare_next_token_ids_padded = timed_prepare

    def _classify(self, cad) -> tuple[str, int]:
        num_rows = int(cad.num_reqs)
        qsl = cad.query_start_loc_cpu[: num_rows + 1]
        query_lens = (qsl[1:] - qsl[:-1]).tolist()
        decoding = sum(1 for n in query_lens if n == self._decode_query_len)
        kind = "decode" if decoding == num_rows else "prefill" if decoding == 0 else "mixed"
        return kind, num_rows

    def _should_profile(self, kind: str, num_rows: int) -> bool:
        hooks = self.hooks
        if (hooks.python is None and hooks.torch_ops is None) or kind != "decode" or num_rows != hooks.rows:
            return False
        hooks.skip -= 1
        hooks.profiled += hooks.skip < 0
        return hooks.skip < 0

    @contextlib.contextmanager
    def _profiled(self) -> Iterator[None]:
        hooks = self.hooks
        if hooks.python is not None:
            hooks.python.enable()
            try:
                yield
            finally:
                hooks.python.disable()
            return
        import torch

        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            yield
        assert hooks.torch_ops is not None
        for event in prof.key_averages():
            entry = hooks.torch_ops.setdefault(event.key, [0.0, 0])
            entry[0] += event.self_cpu_time_total
            entry[1] += event.count


@dataclass
class Summary:
    n: int
    median_ms: float
    p10_ms: float
    p90_ms: float
    cpu_median_ms: float
    prepare_median_ms: float
    tokens_median: float

    @classmethod
    def of(cls, calls: list[ProposeCall]) -> Summary | None:
        if not calls:
            return None
        times = sorted(c.propose_ms for c in calls)
        return cls(
            n=len(calls),
            median_ms=statistics.median(times),
            p10_ms=times[int(0.1 * (len(times) - 1))],
            p90_ms=times[int(0.9 * (len(times) - 1))],
            cpu_median_ms=statistics.median(c.propose_cpu_ms for c in calls),
            prepare_median_ms=statistics.median(c.prepare_ms for c in calls),
            tokens_median=statistics.median(c.num_tokens for c in calls),
        )


@dataclass
class EngineResult:
    decode: dict[int, Summary | None] = field(default_factory=dict)  # batch -> its decode steps
    prefill: Summary | None = None  # prefill steps of one request
    prompt_tokens: int = 0
    acceptance: float | None = None  # accepted / drafted tokens over the timed rounds
    python_profile: str = ""
    torch_profile: str = ""
    wall_s: float = 0.0
    load_average: tuple[float, ...] = ()  # 1-minute load average before and after the timed rounds


@dataclass(frozen=True)
class RunPlan:
    batches: tuple[int, ...]
    max_tokens: int  # tokens per request in a timed round (~ decode steps, drafts are rarely accepted)
    rounds: int  # timed rounds per batch size, interleaved (1, 8, 32, 1, 8, 32, ...) to spread them in time
    profile_batch: int
    profile_tokens: int
    prefill_rounds: int  # extra one-request rounds that add prefill samples


def drafter_of(llm):
    return llm.llm_engine.engine_core.engine_core.model_executor.driver_worker.worker.model_runner.drafter


def run_engine(draft: Path, target: Path, plan: RunPlan) -> EngineResult:
    """One in-process engine: a cProfile round (also the warm-up), a torch.profiler round, then the timed rounds."""
    from vllm import LLM, SamplingParams

    from vispec_vllm.engine.metrics import SpecDecodeCounters

    started = time.perf_counter()
    llm = LLM(
        model=str(target),
        dtype="float32",
        enforce_eager=True,
        max_model_len=2048,
        max_num_seqs=max(*plan.batches, plan.profile_batch),  # a step's batch is checked per call instead
        max_num_batched_tokens=8192,
        enable_prefix_caching=False,  # every round prefills its prompts in full, as a fresh request would
        limit_mm_per_prompt={"image": 1},
        mm_processor_kwargs={"size": IMAGE_PIXELS},
        speculative_config={"method": "eagle", "model": str(draft), "num_speculative_tokens": NUM_SPECULATIVE_TOKENS},
        disable_log_stats=False,
        seed=0,
    )
    result = EngineResult()
    try:
        timer = ProposeTimer(drafter_of(llm), NUM_SPECULATIVE_TOKENS)
        round_index = itertools.count()

        def generate(engine, batch: int, tokens: int):  # fresh images and questions every round
            params = SamplingParams(temperature=0.0, max_tokens=tokens, ignore_eos=True)
            return engine.chat(conversations(batch, next(round_index) * 1000), params, use_tqdm=False)

        timer.hooks = ProfileHooks(python=cProfile.Profile(), rows=plan.profile_batch, skip=2)
        outputs = generate(llm, plan.profile_batch, plan.profile_tokens)
        result.prompt_tokens = int(statistics.median(len(o.prompt_token_ids) for o in outputs))
        result.python_profile = format_python_profile(timer.hooks.python)
        timer.hooks = ProfileHooks(torch_ops={}, rows=plan.profile_batch, skip=2)
        generate(llm, plan.profile_batch, plan.profile_tokens)
        result.torch_profile = format_torch_profile(timer.hooks.torch_ops or {}, timer.hooks.profiled)
        timer.hooks = ProfileHooks()

        before = SpecDecodeCounters.from_metrics(llm.get_metrics())
        result.load_average = (os.getloadavg()[0],)
        timer.recording = True
        decode_calls: dict[int, list[ProposeCall]] = {batch: [] for batch in plan.batches}
        prefill_calls = []
        for _ in range(plan.rounds):
            for batch in plan.batches:
                timer.calls.clear()
                generate(llm, batch, plan.max_tokens)
                decode_calls[batch] += [c for c in timer.calls if c.kind == "decode" and c.num_rows == batch]
                prefill_calls += [c for c in timer.calls if c.kind == "prefill" and c.num_rows == 1]
        result.decode = {batch: Summary.of(calls) for batch, calls in decode_calls.items()}
        for _ in range(plan.prefill_rounds):
            timer.calls.clear()
            generate(llm, 1, 2)
            prefill_calls += [c for c in timer.calls if c.kind == "prefill"]
        result.prefill = Summary.of(prefill_calls)
        result.load_average += (os.getloadavg()[0],)
        counters = SpecDecodeCounters.from_metrics(llm.get_metrics()) - before
        result.acceptance = counters.accepted_tokens / counters.draft_tokens if counters.draft_tokens else None
    finally:
        with contextlib.suppress(Exception):
            llm.llm_engine.engine_core.shutdown()
        del llm
        gc.collect()
    result.wall_s = time.perf_counter() - started
    return result


def format_python_profile(profile: cProfile.Profile | None) -> str:
    if profile is None:
        return ""
    buffer = io.StringIO()
    stats = pstats.Stats(profile, stream=buffer)
    stats.sort_stats("tottime").print_stats(PROFILE_TOP)
    return buffer.getvalue()


def format_torch_profile(ops: dict[str, list[float]], profiled_calls: int) -> str:
    total = sum(us for us, _ in ops.values()) or 1.0
    per_call = max(profiled_calls, 1)
    aten_ops = sum(calls for name, (_, calls) in ops.items() if name.startswith("aten::"))
    lines = [f"{profiled_calls} propose() calls profiled: {total / 1e3 / per_call:.2f} ms self CPU and "
             f"{aten_ops / per_call:.0f} aten ops per call (with profiler overhead)",
             f"{'self CPU ms':>12} {'share':>6} {'calls':>7}  op"]
    for name, (us, calls) in sorted(ops.items(), key=lambda item: -item[1][0])[:PROFILE_TOP]:
        lines.append(f"{us / 1e3:12.2f} {100 * us / total:5.1f}% {calls:7d}  {name}")
    lines.append(f"{total / 1e3:12.2f} 100.0%          total self CPU time over the profiled calls")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------- report
def ratio(vispec: Summary | None, eagle: Summary | None, statistic: str = "median_ms") -> float | None:
    if vispec is None or eagle is None or getattr(eagle, statistic) <= 0:
        return None
    return getattr(vispec, statistic) / getattr(eagle, statistic)


def table(size: str, eagle: EngineResult, vispec: EngineResult) -> str:
    lines = [
        f"{'size':>6} {'step':>7} {'batch':>5} {'tokens':>6} {'n':>3} | {'eagle ms':>8} {'vispec ms':>9} "
        f"{'ratio':>5} | {'eagle cpu':>9} {'vispec cpu':>10} {'ratio':>5} | {'eagle p10-p90':>15} "
        f"{'vispec p10-p90':>15} | {'prep e/v ms':>11}"
    ]
    rows = [("decode", batch, eagle.decode[batch], vispec.decode[batch]) for batch in eagle.decode]
    rows.append(("prefill", 1, eagle.prefill, vispec.prefill))
    for kind, batch, e, v in rows:
        if e is None or v is None:
            continue
        lines.append(
            f"{size:>6} {kind:>7} {batch:5d} {v.tokens_median:6.0f} {min(e.n, v.n):3d} | {e.median_ms:8.2f} "
            f"{v.median_ms:9.2f} {ratio(v, e):5.2f} | {e.cpu_median_ms:9.2f} {v.cpu_median_ms:10.2f} "
            f"{ratio(v, e, 'cpu_median_ms'):5.2f} | {e.p10_ms:7.2f}-{e.p90_ms:<7.2f} {v.p10_ms:7.2f}-{v.p90_ms:<7.2f} "
            f"| {e.prepare_median_ms:5.2f}/{v.prepare_median_ms:<5.2f}"
        )
    return "\n".join(lines)


def plot(path: Path, results: dict[str, dict[str, EngineResult]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(5.5 * len(results), 4.4), squeeze=False)
    width = 0.38
    for ax, (size, by_method) in zip(axes[0], results.items(), strict=True):
        eagle_result, vispec_result = by_method["eagle"], by_method["vispec"]
        pairs = [(b, eagle_result.decode[b], vispec_result.decode[b]) for b in eagle_result.decode]
        pairs = [(b, e, v) for b, e, v in pairs if e is not None and v is not None]
        xs = range(len(pairs))
        ax.bar([x - width / 2 for x in xs], [e.median_ms for _, e, _ in pairs], width, label="stock EAGLE propose()")
        bars = ax.bar([x + width / 2 for x in xs], [v.median_ms for _, _, v in pairs], width, label="ViSpec propose()")
        for bar, (_, e, v) in zip(bars, pairs, strict=True):
            label = f"x{ratio(v, e):.2f}\n(cpu x{ratio(v, e, 'cpu_median_ms'):.2f})"
            ax.annotate(label, (bar.get_x() + bar.get_width() / 2, bar.get_height()), ha="center", va="bottom",
                        fontsize=8)
        ax.set_xticks(list(xs), [f"batch {b}" for b, _, _ in pairs])
        ax.set_ylabel("median wall ms per decode step")
        ax.set_title(f"{size} draft, K={NUM_SPECULATIVE_TOKENS}, goal ViSpec/EAGLE <= {RATIO_GOAL}", fontsize=10)
        ax.legend(loc="upper left", fontsize=8)
        ax.margins(y=0.25)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def engine_json(result: EngineResult) -> dict:
    return {
        "decode": {b: None if s is None else asdict(s) for b, s in result.decode.items()},
        "prefill": None if result.prefill is None else asdict(result.prefill),
        "acceptance": result.acceptance,
        "engine_wall_s": round(result.wall_s, 1),
        "load_average_1min_before_after": result.load_average,
    }


def results_json(results: dict[str, dict[str, EngineResult]], plan: RunPlan, threads: int, wall_s: float) -> dict:
    import torch
    import vllm

    sizes = {}
    for size, by_method in results.items():
        eagle, vispec = by_method["eagle"], by_method["vispec"]
        sizes[size] = {
            "text_size": None if SIZES[size] is None else asdict(SIZES[size]),
            "prompt_tokens": vispec.prompt_tokens,
            "ratio_decode_wall": {b: ratio(vispec.decode[b], eagle.decode[b]) for b in eagle.decode},
            "ratio_decode_cpu": {b: ratio(vispec.decode[b], eagle.decode[b], "cpu_median_ms") for b in eagle.decode},
            "ratio_prefill_wall": ratio(vispec.prefill, eagle.prefill),
            "eagle": engine_json(eagle),
            "vispec": engine_json(vispec),
        }
    return {
        "plan": asdict(plan),
        "num_speculative_tokens": NUM_SPECULATIVE_TOKENS,
        "image_tokens": (IMAGE_SIDE // 28) ** 2,
        "ratio_goal": RATIO_GOAL,
        "machine": {"cpu_count": os.cpu_count(), "torch_threads": threads, "platform": platform.platform(),
                    "python": sys.version.split()[0], "torch": torch.__version__, "vllm": vllm.__version__},
        "sizes": sizes,
        "total_wall_s": round(wall_s, 1),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny size only, fewer steps (~2 min)")
    parser.add_argument("--sizes", nargs="+", choices=tuple(SIZES), help="default: all (tiny with --quick)")
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 8, 32])
    parser.add_argument("--max-tokens", type=int, help="tokens per request in a timed round (default 32, quick 16)")
    parser.add_argument("--rounds", type=int, default=2, help="timed rounds per batch size")
    parser.add_argument("--profile-batch", type=int, help="batch whose decode steps are profiled (default: largest)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (default 1: on a shared 2-core machine, 2 OpenMP threads wait for each "
                             "other at every op while one is descheduled, and the timings mean nothing)")
    parser.add_argument("--model-root", type=Path, default=DEFAULT_MODEL_ROOT, help="where models are built/cached")
    parser.add_argument("--results", type=Path, default=DEFAULT_RESULTS)
    args = parser.parse_args(argv)
    sizes = args.sizes or (["tiny"] if args.quick else list(SIZES))
    batches = tuple(sorted(set(args.batches)))
    plan = RunPlan(
        batches=batches,
        max_tokens=args.max_tokens or (16 if args.quick else 32),
        rounds=args.rounds,
        profile_batch=args.profile_batch or max(batches),
        profile_tokens=12 if args.quick else 16,
        prefill_rounds=3 if args.quick else 5,
    )
    for name, value in (("HF_HUB_OFFLINE", "1"), ("TRANSFORMERS_OFFLINE", "1"), ("TOKENIZERS_PARALLELISM", "false"),
                        ("VLLM_ENABLE_V1_MULTIPROCESSING", "0"), ("VLLM_CPU_KVCACHE_SPACE", "2")):
        os.environ.setdefault(name, value)
    import torch

    torch.set_num_threads(args.threads)  # before the first engine: vLLM's CPU worker disables set_num_threads

    started = time.perf_counter()
    results: dict[str, dict[str, EngineResult]] = {}
    for size in sizes:
        models = build_models(args.model_root, size)
        results[size] = {
            method: run_engine(draft, models.target, plan)
            for method, draft in (("eagle", models.eagle_draft), ("vispec", models.vispec_draft))
        }

    print(f"\npropose() per step, K={NUM_SPECULATIVE_TOKENS}: medians over steps (n = steps); tokens = query tokens; "
          "cpu = process CPU time; prep = prepare_next_token_ids_padded (outside propose)")
    print("\n\n".join(table(size, m["eagle"], m["vispec"]) for size, m in results.items()))
    for size, by_method in results.items():
        print(f"{size}: prompt {by_method['vispec'].prompt_tokens} tokens ({(IMAGE_SIDE // 28) ** 2} image); "
              + "; ".join(f"{method}: acceptance {r.acceptance}, engine {r.wall_s:.0f} s, load {r.load_average}"
                          for method, r in by_method.items()))

    args.results.mkdir(parents=True, exist_ok=True)
    profiles = []
    for size, by_method in results.items():
        for method, result in by_method.items():
            where = f"{size} {method}, decode steps of batch {plan.profile_batch}"
            profiles += [f"===== torch.profiler: {where} =====", result.torch_profile, "",
                         f"===== cProfile: {where} =====", result.python_profile, ""]
    (args.results / "proposer_overhead_profile.txt").write_text("\n".join(profiles))
    payload = results_json(results, plan, args.threads, time.perf_counter() - started)
    (args.results / "proposer_overhead.json").write_text(json.dumps(payload, indent=2) + "\n")
    plot(args.results / "proposer_overhead.png", results)
    print(f"wrote {args.results}/proposer_overhead.{{json,png}}, proposer_overhead_profile.txt "
          f"({time.perf_counter() - started:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
