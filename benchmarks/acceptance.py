"""Acceptance length, speedup and batched throughput: target alone vs stage-1 EAGLE vs ViSpec, in vLLM.

Measured the way the ViSpec paper does (README "Evaluation Results"):
- tau = accepted draft tokens per drafting round, excluding the bonus token (vLLM's mean acceptance length
  is tau + 1; both are printed);
- speedup = mean over samples of (tokens / wall time) with the draft, divided by the same mean for the
  target alone; samples run one at a time (batch 1), greedy, the wall time including prefill;
plus batched throughput: all samples submitted at once (tokens / wall time of the whole batch).

The default models are the embedded tiny ones (a factory Qwen2.5-VL target and a ViSpec draft trained on its
outputs by `vispec_vllm.train.train_tiny_draft`; its stage-1 checkpoint is the EAGLE baseline). On a CPU such
tiny models are dominated by per-step overhead, so speedups there say nothing about real models; the tau
column is the meaningful one. Point --target/--vispec/--eagle at real models on a GPU for real numbers.
Questions and images are generated here (held-out seeds), not from a public benchmark.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
QUESTIONS = ("Describe the picture in detail.", "What is in this image?", "Describe the shapes in the image.",
             "What can you see on the left side?", "What is the scene?", "How many objects are there?")


@dataclass
class MethodResult:
    method: str
    tau: float  # accepted drafts per round (paper convention)
    mean_acceptance_length: float  # vLLM convention: tau + 1
    per_position_acceptance: list[float]
    batch1_tokens_per_s: float  # mean over samples of tokens / seconds
    batched_tokens_per_s: float
    speedup: float = 1.0
    batched_speedup: float = 1.0


def conversations(num: int, seed_offset: int = 5000) -> list[list[dict]]:
    from vispec_vllm.factory import make_test_image
    from vispec_vllm.media import image_part

    return [
        [{"role": "user", "content": [image_part(make_test_image(seed_offset + i)),
                                      {"type": "text", "text": QUESTIONS[i % len(QUESTIONS)]}]}]
        for i in range(num)
    ]


def measure(method: str, target: Path, draft: Path | None, convs, args) -> MethodResult:
    from vllm import LLM, SamplingParams

    from vispec_vllm.engine.metrics import SpecDecodeCounters

    spec = None if draft is None else {"method": "eagle", "model": str(draft),
                                       "num_speculative_tokens": args.num_speculative_tokens}
    llm = LLM(model=str(target), dtype=args.dtype, enforce_eager=True, max_model_len=args.max_model_len,
              max_num_seqs=len(convs), limit_mm_per_prompt={"image": 1}, speculative_config=spec,
              disable_log_stats=False, seed=0)
    try:
        params = SamplingParams(temperature=0.0, max_tokens=args.max_tokens)
        llm.chat(convs[:2], params, use_tqdm=False)  # warm-up (3 in the paper; 1 suffices for eager CPU)
        before = SpecDecodeCounters.from_metrics(llm.get_metrics())
        rates = []
        for conv in convs:
            start = time.perf_counter()
            out = llm.chat([conv], params, use_tqdm=False)[0]
            rates.append(len(out.outputs[0].token_ids) / (time.perf_counter() - start))
        counters = SpecDecodeCounters.from_metrics(llm.get_metrics()) - before
        start = time.perf_counter()
        outs = llm.chat(convs, params, use_tqdm=False)
        batched = sum(len(o.outputs[0].token_ids) for o in outs) / (time.perf_counter() - start)
    finally:
        llm.llm_engine.engine_core.shutdown()
    mal = counters.mean_acceptance_length
    return MethodResult(method, mal - 1.0, mal, counters.per_position_rate, sum(rates) / len(rates), batched)


def plot(results: list[MethodResult], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(12, 3.6))
    names = [r.method for r in results]
    for ax, values, title in zip(
        axes,
        ([r.tau for r in results], [r.speedup for r in results], [r.batched_tokens_per_s for r in results]),
        ("tau (accepted drafts / round)", "speedup, batch 1", "batched throughput (tok/s)"),
        strict=True,
    ):
        ax.bar(names, values, color=["#999999", "#4C72B0", "#DD8452"][: len(names)])
        ax.set_title(title)
        for i, v in enumerate(values):
            ax.text(i, v, f"{v:.2f}", ha="center", va="bottom")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--target", type=Path, help="target model dir (default: tiny factory Qwen2.5-VL)")
    parser.add_argument("--vispec", type=Path, help="ViSpec draft dir (default: tiny trained draft)")
    parser.add_argument("--eagle", type=Path, help="stage-1 EAGLE draft dir (default: the tiny stage-1 checkpoint)")
    parser.add_argument("--samples", type=int, default=12)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--max-model-len", type=int, default=2048)
    parser.add_argument("--num-speculative-tokens", type=int, default=3)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--train-steps", type=int, default=300)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = parser.parse_args(argv)
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

    target, vispec, eagle = args.target, args.vispec, args.eagle
    if target is None:
        from vispec_vllm.factory import build_tiny_target
        from vispec_vllm.train import train_tiny_draft
        from vispec_vllm.train.trainer import EXPORT_DIR

        work = ROOT / "artifacts" / "demo"
        target = build_tiny_target("qwen2_5_vl", work / "qwen2_5_vl")
        vispec = train_tiny_draft(target, work / "qwen2_5_vl-vispec-draft", steps=args.train_steps)
        eagle = work / "qwen2_5_vl-vispec-draft" / "stage1" / EXPORT_DIR
    convs = conversations(args.samples)
    results = [measure("target alone", target, None, convs, args)]
    if eagle is not None:
        results.append(measure("EAGLE (stage 1)", target, eagle, convs, args))
    if vispec is not None:
        results.append(measure("ViSpec", target, vispec, convs, args))
    for r in results:
        r.speedup = r.batch1_tokens_per_s / results[0].batch1_tokens_per_s
        r.batched_speedup = r.batched_tokens_per_s / results[0].batched_tokens_per_s

    print(f"\n{args.samples} image questions x <= {args.max_tokens} tokens, greedy, {args.dtype}, "
          f"K={args.num_speculative_tokens}; target {target}")
    print(f"{'method':<18}{'tau':>6}{'MAL':>6}{'batch-1 tok/s':>15}{'speedup':>9}{'batched tok/s':>15}{'ratio':>7}"
          "  per-position acceptance")
    for r in results:
        print(f"{r.method:<18}{r.tau:>6.2f}{r.mean_acceptance_length:>6.2f}{r.batch1_tokens_per_s:>15.1f}"
              f"{r.speedup:>9.2f}{r.batched_tokens_per_s:>15.1f}{r.batched_speedup:>7.2f}  "
              f"{[round(p, 2) for p in r.per_position_acceptance]}")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "acceptance.json").write_text(json.dumps([asdict(r) for r in results], indent=1))
    plot(results, args.out / "acceptance.png")
    print(f"wrote {args.out / 'acceptance.json'} and {args.out / 'acceptance.png'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
