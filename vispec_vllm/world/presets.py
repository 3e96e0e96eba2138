"""World presets: which LM, how big the vision side, how much data and training.

- `small`: the demo's world (SmolLM2-135M-Instruct); built in at most 15 minutes on a 2-core CPU.
- `full`: the benchmark world (Qwen2.5-Coder-0.5B-Instruct, Q4-derived); at most 2 hours on a 2-core CPU.
- `tiny`: the same code path at toy sizes, for CI (an LM given as a local GGUF or HF directory).

The ViSpec draft gets stage 1 then stage 2 (`draft_stage1_steps` + `draft_stage2_steps`); the vision-blind EAGLE
draft gets the same stage 1, then stage 1 continued for the stage-2 steps without the image path: same data,
same seeds, same schedule, same total number of steps. Both continuations start from the stage-1 draft at
`draft_stage2_lr`, a tenth of `draft_lr` as in the official recipe (3e-5 then 3e-6): at the stage-1 rate, stage 2's
loss (10 x L1 between distributions + 0.1 x ListMLE) drove the full world's ViSpec draft from 0.94 to 0.25 top-1
accuracy before it partly recovered.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from vispec_vllm.world.vision import VisionSpec


@dataclass(frozen=True)
class WorldPreset:
    name: str
    lm: str  # an entry of world.lm.LM_SOURCES ("" = the LM is given on the command line)
    vision: VisionSpec = field(default_factory=lambda: VisionSpec(num_layers=3))
    vision_steps: int = 2500
    vision_batch: int = 32
    vision_lr: float = 2e-3
    train_samples: int = 384  # image questions answered by the target for draft training
    eval_samples: int = 48  # per held-out split (grounded accuracy, benchmarks)
    max_new_tokens: int = 128
    # dtype of the vLLM engine that writes the training answers and the grounding answers. The teacher-forced
    # hidden states are always float32 (the served target's), so bfloat16 here only changes which greedy answers
    # the drafts learn from: on this CPU (AMX-BF16) it generates 2.6x faster, which is what lets `full` fit 2 h.
    answer_dtype: str = "float32"
    draft_vocab_size: int | None = 2048  # reduced draft head (None: the target's full vocabulary)
    draft_stage1_steps: int = 600
    draft_stage2_steps: int = 600
    draft_batch: int = 4
    draft_lr: float = 1e-3  # stage 1
    draft_stage2_lr: float = 1e-4  # stage 2 and the blind draft's continued stage 1
    # stage 2's extra self-fed passes: 2 trains every position of the K=3 chain the demo and benchmarks serve
    # (the official code's default; its README uses 1, which with the stage-1 rate as well gave the full world's
    # third position 0.00 acceptance; the two causes were not separated)
    draft_mtp_steps: int = 2
    num_q: int = 2
    seed: int = 0

    def to_json(self) -> dict:
        return asdict(self)


PRESETS: dict[str, WorldPreset] = {
    "small": WorldPreset(
        name="small",
        lm="smollm2-135m",
        # the build's largest step, generating the training answers, runs 1.8x faster in bfloat16 (answers +
        # teacher-forced data 175 s vs 323 s) and keeps the build under 15 minutes. Fewer vision steps would
        # too, but cost grounding: 1500 steps gave 81% of facts right on held-out images, 2500 give 85%.
        answer_dtype="bfloat16",
    ),
    "full": WorldPreset(
        name="full",
        lm="qwen2.5-coder-0.5b",
        answer_dtype="bfloat16",
        train_samples=768,
        draft_stage1_steps=1000,
        draft_stage2_steps=1000,
    ),
    "tiny": WorldPreset(
        name="tiny",
        lm="",
        # 256 image tokens (64 a row): a tiny BPE vocabulary spells the caption words in many pieces.
        vision=VisionSpec(image_size=224, slots_per_phrase=64, hidden_size=32, intermediate_size=64, num_layers=1,
                          num_heads=2),
        vision_steps=4,
        vision_batch=8,
        train_samples=8,
        eval_samples=4,
        max_new_tokens=24,
        draft_vocab_size=128,
        draft_stage1_steps=6,
        draft_stage2_steps=6,
        draft_batch=2,
    ),
}
