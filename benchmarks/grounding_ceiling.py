"""How much of the target's grounding error is the LM's own: the same held-out questions with the exact caption.

    python benchmarks/grounding_ceiling.py --preset small

For each held-out sample the target (vLLM, greedy, float32) answers twice: once with the image (its vision
side emits the caption's embeddings, up to its errors), once with the caption's own tokens spliced in where the
64 image tokens go (a text-only prompt, so the LM reads the exact caption). Both answers are graded against the
scene; the second accuracy is the LM's ceiling, the gap between them is what the vision side costs.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def caption_prompt_ids(processor, targets, messages: list[dict], phrases, image_token_id: int) -> list[int]:
    """The chat prompt's token ids with the single image placeholder replaced by the caption's slot ids."""
    text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    ids = processor.tokenizer(text, add_special_tokens=False)["input_ids"]
    where = ids.index(image_token_id)
    return ids[:where] + targets.slot_ids(phrases) + ids[where + 1:]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="small")
    parser.add_argument("--root", type=Path, default=None)
    parser.add_argument("--samples", type=int, default=48, help="per held-out split")
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--verbose", action="store_true")
    args = parser.parse_args(argv)
    from vispec_vllm.console import engine_output_to, quiet_vllm

    quiet_vllm(args.verbose)
    from vispec_vllm.world.build import DEFAULT_ROOT, build_world
    from vispec_vllm.world.presets import PRESETS

    world = build_world(PRESETS[args.preset], args.root or DEFAULT_ROOT, progress=True)
    log_path = None if args.verbose else ROOT / "benchmarks" / "results" / "grounding_ceiling.log"
    with engine_output_to(log_path) as out:
        return _measure(args, world, out)


def _measure(args: argparse.Namespace, world, out) -> int:
    import torch
    from transformers import AutoProcessor
    from vllm import SamplingParams, TokensPrompt

    from vispec_vllm.factory import target_info
    from vispec_vllm.world.engines import shutdown, start_engine
    from vispec_vllm.world.grading import grade_many
    from vispec_vllm.world.prompts import chat_messages
    from vispec_vllm.world.scenes import caption_phrases, make_scene, render
    from vispec_vllm.world.splits import split_samples
    from vispec_vllm.world.vision import CaptionTargets

    processor = AutoProcessor.from_pretrained(str(world.target))
    targets = CaptionTargets(processor.tokenizer, torch.empty(0), world.preset.vision)  # only the slot ids are used
    image_token_id = target_info(world.target).image_token_id
    params = SamplingParams(temperature=0.0, max_tokens=args.max_tokens)
    llm = start_engine(world.target, None, max_num_seqs=args.samples)
    report = {}
    try:
        for split in ("heldout_images", "heldout_questions"):
            samples = split_samples(split, args.samples)
            scenes = [make_scene(s.scene_seed) for s in samples]
            with_image = [chat_messages(render(scene), s.question) for scene, s in zip(scenes, samples, strict=True)]
            text_only = [TokensPrompt(prompt_token_ids=caption_prompt_ids(
                processor, targets, [{"role": "user", "content": [{"type": "image"},
                                                                 {"type": "text", "text": s.question}]}],
                caption_phrases(scene), image_token_id)) for scene, s in zip(scenes, samples, strict=True)]
            image_answers = [o.outputs[0].text for o in llm.chat(with_image, params, use_tqdm=False)]
            caption_answers = [o.outputs[0].text for o in llm.generate(text_only, params, use_tqdm=False)]
            report[split] = {}
            for name, answers in (("vision side", image_answers), ("exact caption", caption_answers)):
                correct, stated, per_kind = grade_many(list(zip(answers, scenes, strict=True)))
                report[split][name] = {"correct": correct, "stated": stated, "accuracy": correct / max(1, stated),
                                       "per_kind": per_kind}
                kinds = ", ".join(f"{k} {v:.0%}" for k, v in per_kind.items())
                print(f"{split:<18} {name:<14} {correct}/{stated} = {correct / max(1, stated):.1%}  ({kinds})",
                      file=out)
    finally:
        shutdown(llm)
    path = ROOT / "benchmarks" / "results" / "grounding_ceiling.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=1))
    print(f"wrote {path}", file=out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
