"""End to end on a tiny Qwen2.5-VL: vLLM answers -> teacher-forced shards -> stage 1 -> stage 2 -> export.

One vLLM engine for the data (the session fixtures `tiny_data` / `tiny_run` in conftest: 16 image + 16 text
prompts, short answers), then CPU training.
"""

from __future__ import annotations

import json

import pytest
import torch
from conftest import TINY_RUN_STEPS as STEPS

from vispec_vllm.train.batches import ShardedSamples
from vispec_vllm.train.metrics import read_metrics
from vispec_vllm.train.trainer import CURVE_FILE, LOG_FILE

pytestmark = pytest.mark.vllm

IMAGE_TOKENS = 64  # one 224x224 test image


def test_vllm_answers_are_the_targets_greedy_continuations(tiny_run):
    """Every stored answer token is the argmax of the target's logits at the previous token (fp32)."""
    from vispec_vllm.factory import target_info
    from vispec_vllm.factory.drafts import read_target_tensor

    lm_head = read_target_tensor(tiny_run.target, target_info(tiny_run.target).lm_head_key)
    for name, image_tokens in (("data_image", IMAGE_TOKENS), ("data_text", 0)):
        manifest = json.loads((tiny_run.work / name / "manifest.json").read_text())
        # a random tiny target may answer with its image placeholder token: such samples are skipped
        assert set(manifest["skipped"]) <= {"image_token_in_answer"}
        assert manifest["complete"] and manifest["samples"] + sum(manifest["skipped"].values()) == 16
        assert manifest["samples"] >= 12 and manifest["image_tokens"] == manifest["samples"] * image_tokens
        samples = ShardedSamples([tiny_run.work / name])
        matched = total = 0
        for n in range(len(samples)):
            sample = samples[n]
            answer = sample.answer_mask.nonzero().flatten()
            assert 1 <= len(answer) <= 48 and int(answer[-1]) == len(sample) - 1
            predicted = (sample.hidden_states[answer - 1] @ lm_head.T).argmax(-1)
            matched += int((predicted == sample.input_ids[answer]).sum())
            total += len(answer)
        assert matched == total, f"{name}: {matched}/{total} greedy tokens reproduced"


def test_both_stages_logged_learning_curves(tiny_run):
    for stage in ("stage1", "stage2"):
        log = read_metrics(tiny_run.work / stage / LOG_FILE)
        assert [r["step"] for r in log] == list(range(1, STEPS + 1))
        first, last = log[:10], log[-10:]
        assert sum(r["acc"] for r in last) > sum(r["acc"] for r in first)
        assert (tiny_run.work / stage / CURVE_FILE).stat().st_size > 0
    assert all(len(r["acc_passes"]) == 2 for r in read_metrics(tiny_run.work / "stage2" / LOG_FILE))  # 1 MTP step


def test_exported_draft_loads_and_its_drafts_get_accepted(tiny_run):
    from vispec_vllm.draft import ViSpecDraft
    from vispec_vllm.factory import target_info
    from vispec_vllm.factory.drafts import read_target_tensor
    from vispec_vllm.train.draft_init import attach_target_weights
    from vispec_vllm.train.evaluate import chain_acceptance

    draft = ViSpecDraft.from_pretrained(tiny_run.draft)
    assert draft.num_q == 2
    embed = read_target_tensor(tiny_run.target, target_info(tiny_run.target).embed_key)
    assert torch.equal(draft.embed_tokens.weight, embed)
    attach_target_weights(draft, tiny_run.target)
    samples = ShardedSamples([tiny_run.work / "data_image"])
    acceptance = chain_acceptance(draft, [samples[0], samples[1]], num_speculative_tokens=3)
    print(f"chain acceptance: tau={acceptance.mean_accepted:.3f} per position {acceptance.accepted_per_position}")
    # an untrained draft accepts ~nothing (a random tiny draft: tau 0.0 on this data)
    assert acceptance.mean_accepted > 1.5


def test_exported_draft_is_lossless_in_vllm_and_gets_drafts_accepted(tiny_run):
    """The export loads unchanged in the vLLM plugin; drafts are accepted, and output equals the target's."""
    from conftest import vllm_engine
    from vllm import SamplingParams

    from vispec_vllm.engine.metrics import SpecDecodeCounters
    from vispec_vllm.factory import make_test_image
    from vispec_vllm.media import image_part

    questions = ("Describe the picture in detail.", "What is in this image?", "What is the scene?")
    def ask(i: int) -> list[dict]:
        content = [image_part(make_test_image(900 + i)), {"type": "text", "text": questions[i % 3]}]
        return [{"role": "user", "content": content}]

    conversations = [ask(i) for i in range(6)] + [[{"role": "user", "content": "Tell me about the old house."}]]
    params = SamplingParams(temperature=0.0, max_tokens=32, ignore_eos=True)
    common = dict(model=str(tiny_run.target), limit_mm_per_prompt={"image": 1})
    with vllm_engine(**common) as llm:
        expected = [o.outputs[0].token_ids for o in llm.chat(conversations, params, use_tqdm=False)]
    spec = {"method": "eagle", "model": str(tiny_run.draft), "num_speculative_tokens": 3}
    with vllm_engine(**common, speculative_config=spec, disable_log_stats=False) as llm:
        got = [o.outputs[0].token_ids for o in llm.chat(conversations, params, use_tqdm=False)]
        counters = SpecDecodeCounters.from_metrics(llm.get_metrics())
    print(f"vLLM mean acceptance length {counters.mean_acceptance_length:.2f}, per position "
          f"{[round(r, 2) for r in counters.per_position_rate]}")
    assert got == expected
    assert counters.accepted_tokens > 0
