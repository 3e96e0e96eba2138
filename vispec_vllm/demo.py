"""`python -m vispec_vllm.demo`: ViSpec speculative decoding on the small real-language world, end to end.

The small world (built on first run, cached under artifacts/worlds/small; `python -m vispec_vllm.world`) is a
LLaVA-architecture VLM whose language model is SmolLM2-135M-Instruct (real, Q4-derived weights) and whose
vision side was trained here on synthetic scenes, plus a ViSpec draft trained on the target's own answers.
The demo asks the target about held-out images (and held-out question wording), alone and with the ViSpec
draft, one request at a time, alternating the two engines over several rounds, and prints the answers, whether
the outputs are identical, the mean acceptance length and the batch-1 speedup measured in this run.
"""

from __future__ import annotations

import argparse
import statistics
import textwrap
from pathlib import Path

from vispec_vllm.console import engine_output_to, quiet_vllm
from vispec_vllm.engine.metrics import SpecDecodeCounters


def _spread(values: list[float]) -> str:
    return f"{statistics.median(values):.1f} tok/s [{min(values):.1f}-{max(values):.1f}]"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m vispec_vllm.demo", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=3)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=3, help="alternated rounds of both engines")
    parser.add_argument("--num-speculative-tokens", type=int, default=3)
    parser.add_argument("--preset", default="small")
    parser.add_argument("--root", type=Path, default=None, help="where worlds are built (default artifacts/worlds)")
    parser.add_argument("--verbose", action="store_true", help="vLLM's INFO logs")
    args = parser.parse_args(argv)
    quiet_vllm(args.verbose)

    from vispec_vllm.world.build import DEFAULT_ROOT, build_world
    from vispec_vllm.world.presets import PRESETS

    world = build_world(PRESETS[args.preset], args.root or DEFAULT_ROOT, progress=True)
    log_path = None if args.verbose else world.paths.root / "demo.log"
    with engine_output_to(log_path) as out:
        return _run(args, world, out, log_path)


def _run(args: argparse.Namespace, world, out, log_path: Path | None) -> int:
    from vllm import SamplingParams

    from vispec_vllm.world.engines import run_batch1, shutdown, start_engine
    from vispec_vllm.world.prompts import chat_messages
    from vispec_vllm.world.scenes import caption_phrases, make_scene, render
    from vispec_vllm.world.splits import split_samples

    samples = split_samples("heldout_questions", args.images)
    scenes = [make_scene(s.scene_seed) for s in samples]
    conversations = [chat_messages(render(scene), s.question) for scene, s in zip(scenes, samples, strict=True)]
    params = SamplingParams(temperature=0.0, max_tokens=args.max_tokens)

    where = f" (engine logs: {log_path})" if log_path else ""
    print(f"[demo] starting the target alone and the target + ViSpec draft (vLLM, CPU, float32){where} ...",
          file=out)
    # The ViSpec engine is started last: vLLM's metrics live in one process-wide registry, taken over by the
    # engine created last, and only the ViSpec engine's speculative-decoding counters are read.
    engines = {"target alone": start_engine(world.target, None),
               "ViSpec": start_engine(world.target, world.vispec_draft,
                                      num_speculative_tokens=args.num_speculative_tokens)}
    try:
        for llm in engines.values():
            llm.chat(conversations[:1], SamplingParams(temperature=0.0, max_tokens=8), use_tqdm=False)  # warm-up
        rates: dict[str, list[float]] = {name: [] for name in engines}
        runs = {}
        before = SpecDecodeCounters.from_metrics(engines["ViSpec"].get_metrics())
        identical = True
        for round_index in range(args.rounds):
            order = list(engines) if round_index % 2 == 0 else list(reversed(engines))
            for name in order:
                run = run_batch1(engines[name], conversations, params)
                rates[name].append(run.tokens_per_second)
                runs[name] = run
            identical &= runs["target alone"].token_ids == runs["ViSpec"].token_ids
            print(f"[demo] round {round_index + 1}/{args.rounds}: target alone "
                  f"{rates['target alone'][-1]:.1f} tok/s, ViSpec {rates['ViSpec'][-1]:.1f} tok/s", file=out)
        counters = SpecDecodeCounters.from_metrics(engines["ViSpec"].get_metrics()) - before
    finally:
        for llm in engines.values():
            shutdown(llm)

    target_run = runs["target alone"]
    lm_name = world.lm_provenance.get("upstream", world.preset.lm)
    lines = [f"\n{world.preset.name.capitalize()} world: {lm_name} (Q4-derived weights) "
             "+ a vision side trained here on synthetic scenes (not a real VLM's figures)"]
    for index, (sample, scene) in enumerate(zip(samples, scenes, strict=True)):
        answer = textwrap.shorten(" ".join(target_run.texts[index].split()), 240, placeholder=" ...")
        lines += [f"image {index + 1} (held-out) shows: {' '.join(caption_phrases(scene))}",
                  f"  Q: {sample.question}",
                  textwrap.fill(answer, 110, initial_indent="  A: ", subsequent_indent="     ")]
    speedups = [v / t for v, t in zip(rates["ViSpec"], rates["target alone"], strict=True)]
    lines += [
        f"\noutputs identical to the target alone (greedy, float32): {'yes' if identical else 'NO'} "
        f"({len(samples)} answers x {args.rounds} rounds, {target_run.tokens} tokens a round)",
        f"mean acceptance length: {counters.mean_acceptance_length:.2f} (vLLM convention, bonus token included; "
        f"K={args.num_speculative_tokens}); per position {[round(r, 2) for r in counters.per_position_rate]}",
        f"batch 1, {args.rounds} alternated rounds: target alone {_spread(rates['target alone'])}, "
        f"ViSpec {_spread(rates['ViSpec'])}",
        f"speedup: {statistics.median(speedups):.2f}x [{min(speedups):.2f}-{max(speedups):.2f}]",
    ]
    print("\n".join(lines), file=out)
    return 0 if identical else 1


if __name__ == "__main__":
    raise SystemExit(main())
