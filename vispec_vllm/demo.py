"""`python -m vispec_vllm.demo`: ViSpec speculative decoding on the embedded tiny models, end to end.

Builds (once, cached under artifacts/demo) a tiny Qwen2.5-VL target and a ViSpec draft trained on the
target's own outputs, then runs the same image+text chat batch through vLLM twice, without and with the
ViSpec draft, and prints: whether the greedy outputs are identical (they must be), the mean acceptance
length, per-position acceptance, and the wall-clock of both runs. Tiny models are dominated by per-step
overhead on a CPU, so the speed ratio here says nothing about real models; benchmarks/ has the real numbers.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

from vispec_vllm.engine.metrics import SpecDecodeCounters

DEFAULT_ROOT = Path(__file__).resolve().parent.parent / "artifacts" / "demo"
QUESTIONS = (
    "Describe this image in detail.",
    "What colours and shapes can you see?",
    "Write a short story about this picture.",
    "Explain what is happening in the image.",
)


def build_models(root: Path, family: str, train_steps: int) -> tuple[Path, Path]:
    from vispec_vllm.factory import build_tiny_target
    from vispec_vllm.train import train_tiny_draft

    target = build_tiny_target(family, root / family)
    draft = train_tiny_draft(target, root / f"{family}-vispec-draft", steps=train_steps)
    return target, draft


def chat_batch(num_requests: int) -> list[list[dict]]:
    from vispec_vllm.factory import make_test_image
    from vispec_vllm.media import image_part

    conversations = []
    for i in range(num_requests):
        content = [
            image_part(make_test_image(seed=i)),
            {"type": "text", "text": QUESTIONS[i % len(QUESTIONS)]},
        ]
        conversations.append([{"role": "user", "content": content}])
    return conversations


def run(target: Path, draft: Path | None, conversations, max_tokens: int, num_spec: int):
    from vllm import LLM, SamplingParams

    spec = None if draft is None else {"method": "eagle", "model": str(draft), "num_speculative_tokens": num_spec}
    llm = LLM(model=str(target), dtype="float32", enforce_eager=True, max_model_len=2048, max_num_seqs=16,
              limit_mm_per_prompt={"image": 1}, speculative_config=spec, disable_log_stats=False, seed=0)
    try:
        params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
        llm.chat(conversations[:1], params, use_tqdm=False)  # warm-up
        before = SpecDecodeCounters.from_metrics(llm.get_metrics())
        start = time.perf_counter()
        outputs = llm.chat(conversations, params, use_tqdm=False)
        elapsed = time.perf_counter() - start
        counters = SpecDecodeCounters.from_metrics(llm.get_metrics()) - before
        return [o.outputs[0].token_ids for o in outputs], elapsed, counters
    finally:
        llm.llm_engine.engine_core.shutdown()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--family", default="qwen2_5_vl", choices=("qwen2_5_vl", "llava", "llava_next"))
    parser.add_argument("--root", type=Path, default=DEFAULT_ROOT, help="where models are built and cached")
    parser.add_argument("--requests", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--num-speculative-tokens", type=int, default=3)
    parser.add_argument("--train-steps", type=int, default=300)
    args = parser.parse_args(argv)
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

    target, draft = build_models(args.root, args.family, args.train_steps)
    conversations = chat_batch(args.requests)
    base_tokens, base_s, _ = run(target, None, conversations, args.max_tokens, args.num_speculative_tokens)
    spec_tokens, spec_s, counters = run(target, draft, conversations, args.max_tokens, args.num_speculative_tokens)

    identical = base_tokens == spec_tokens
    total = sum(len(t) for t in base_tokens)
    print(f"\ntarget {target}\ndraft  {draft}")
    print(f"{args.requests} image+text chats x {args.max_tokens} tokens, greedy, float32")
    print(f"outputs identical to the target alone: {identical}")
    print(f"mean acceptance length (vLLM, incl. bonus token): {counters.mean_acceptance_length:.2f}")
    print(f"ViSpec tau (accepted drafts per step, paper convention): {counters.mean_acceptance_length - 1:.2f}")
    print(f"per-position acceptance rate: {[round(r, 3) for r in counters.per_position_rate]}")
    print(f"baseline {total / base_s:.1f} tok/s, ViSpec {total / spec_s:.1f} tok/s (tiny model on CPU: overhead-bound)")
    return 0 if identical else 1


if __name__ == "__main__":
    raise SystemExit(main())
