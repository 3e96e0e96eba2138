"""Training on a tiny Qwen2.5-VL target (no vLLM): learning, exact resume, batched loss vs a slow reference,
official-format export."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from vispec_vllm.train.batches import ShardedSamples, collate, sample_slots
from vispec_vllm.train.checkpoint import checkpoint_dir, list_checkpoints
from vispec_vllm.train.config import TrainConfig
from vispec_vllm.train.metrics import read_metrics
from vispec_vllm.train.step import DraftRollout, batch_loss
from vispec_vllm.train.trainer import CURVE_FILE, LOG_FILE, Trainer, train


@pytest.fixture(scope="module")
def qwen_target(tiny_target) -> Path:
    return tiny_target("qwen2_5_vl")


def _config(stage: int, target: Path, data: Path, out: Path, init: Path | None, **changes) -> TrainConfig:
    settings = dict(stage=stage, target=target, data=[data], out=out, init=init, lr=3e-3, max_steps=30,
                    warmup_steps=2, batch_size=4, seed=0, save_every=30, precision="fp32", device="cpu",
                    progress=False)
    return TrainConfig(**{**settings, **changes})


@pytest.fixture(scope="module")
def stage1_draft(qwen_target, train_data_dir, tmp_path_factory) -> Path:
    return train(_config(1, qwen_target, train_data_dir, tmp_path_factory.mktemp("stage1"), None, max_steps=24))


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)


def test_stage1_loss_falls_and_accuracy_rises(stage1_draft):
    log = read_metrics(stage1_draft.parent / LOG_FILE)
    assert [r["step"] for r in log] == list(range(1, 25))
    first, last = log[:4], log[-4:]
    assert _mean([r["loss"] for r in last]) < 0.6 * _mean([r["loss"] for r in first])
    assert _mean([r["acc"] for r in last]) > _mean([r["acc"] for r in first]) + 0.2
    assert {"vloss", "ploss", "rloss"} <= set(log[0])
    assert (stage1_draft.parent / CURVE_FILE).stat().st_size > 0


def test_stage1_export_is_an_official_eagle_checkpoint(stage1_draft, qwen_target):
    from safetensors.torch import load_file

    from vispec_vllm.draft import ViSpecDraft
    from vispec_vllm.factory import target_info

    state = load_file(str(stage1_draft / "model.safetensors"))
    assert len(state) == 14 and not any(k.startswith(("imadpt", "img_fc", "lm_head")) for k in state)
    info = target_info(qwen_target)
    from vispec_vllm.factory.drafts import read_target_tensor

    assert torch.equal(state["embed_tokens.weight"], read_target_tensor(qwen_target, info.embed_key))
    assert ViSpecDraft.from_pretrained(stage1_draft).num_q is None


def _full_data_loss(draft_dir: Path, target: Path, data: Path, *, num_q: int, mtp_steps: int) -> float:
    """Stage-2 loss of a saved draft over every sample at once (no noise): a deterministic yardstick."""
    from vispec_vllm.draft import ViSpecDraft
    from vispec_vllm.train.draft_init import attach_target_weights

    draft = ViSpecDraft.from_pretrained(draft_dir, num_q=num_q, seed=0)
    attach_target_weights(draft, target)
    samples = ShardedSamples([data])
    batch = collate([samples[i] for i in range(len(samples))])
    with torch.no_grad():
        predictions = DraftRollout(draft, mtp_steps=mtp_steps, use_image_path=True)(
            batch.hidden_states, batch.next_ids, batch.image_mask, batch.image_embeds, batch.attention_mask)
        return float(batch_loss(draft, predictions, batch, stage=2).loss)


def test_stage2_learns_with_mtp_and_exports_the_vispec_format(stage1_draft, qwen_target, train_data_dir, tmp_path):
    from safetensors.torch import load_file

    from vispec_vllm.draft import ViSpecDraft

    exported = train(_config(2, qwen_target, train_data_dir, tmp_path / "stage2", stage1_draft, num_q=3, mtp_steps=2,
                             lr=1e-3, max_steps=16, save_every=8))
    log = read_metrics(tmp_path / "stage2" / LOG_FILE)
    assert all(len(r["acc_passes"]) == 3 for r in log)  # the target-feature pass and two MTP passes
    # the stage-2 start (stage-1 weights, the same seeded fresh adaptor) against the result, on all the data
    before = _full_data_loss(stage1_draft, qwen_target, train_data_dir, num_q=3, mtp_steps=2)
    after = _full_data_loss(exported, qwen_target, train_data_dir, num_q=3, mtp_steps=2)
    print(f"stage-2 loss on all data: {before:.3f} -> {after:.3f}")
    assert after < 0.95 * before
    state = load_file(str(exported / "model.safetensors"))
    assert len(state) == 22 and state["imadpt.q"].shape[0] == 3
    stage1 = load_file(str(stage1_draft / "model.safetensors"))
    assert torch.equal(state["embed_tokens.weight"], stage1["embed_tokens.weight"])  # frozen
    assert ViSpecDraft.from_pretrained(exported).num_q == 3
    assert [p.name for p in list_checkpoints(tmp_path / "stage2")] == ["step_00000008", "step_00000016"]


def test_resumed_training_continues_exactly(stage1_draft, qwen_target, train_data_dir, tmp_path):
    """A run restarted from its step-3 checkpoint repeats steps 4..6 of the uninterrupted run bit for bit."""
    settings = dict(max_steps=6, save_every=3, warmup_steps=2, batch_size=3, mtp_steps=1)
    train(_config(2, qwen_target, train_data_dir, tmp_path / "whole", stage1_draft, **settings))
    resumed_out = tmp_path / "resumed"
    (resumed_out / "checkpoints").mkdir(parents=True)
    shutil.copytree(checkpoint_dir(tmp_path / "whole", 3), checkpoint_dir(resumed_out, 3))
    shutil.copy(tmp_path / "whole" / LOG_FILE, resumed_out / LOG_FILE)  # holds steps 1..6: 4..6 get redone
    trainer = Trainer(_config(2, qwen_target, train_data_dir, resumed_out, stage1_draft, **settings))
    assert trainer.step == 3
    trainer.run()
    whole, resumed = read_metrics(tmp_path / "whole" / LOG_FILE), read_metrics(resumed_out / LOG_FILE)
    assert [r["step"] for r in resumed] == [1, 2, 3, 4, 5, 6]
    for a, b in zip(whole, resumed, strict=True):
        assert (a["loss"], a["acc"], a["lr"]) == (b["loss"], b["acc"], b["lr"])
    from safetensors.torch import load_file

    final_whole = load_file(str(tmp_path / "whole" / "draft" / "model.safetensors"))
    final_resumed = load_file(str(resumed_out / "draft" / "model.safetensors"))
    assert all(torch.equal(final_whole[k], final_resumed[k]) for k in final_whole)


def _reference_stage2_loss(draft, sample, mtp_steps: int) -> tuple[float, int]:
    """Sum of the per-position stage-2 loss over one sample and all passes, by explicit loops."""
    slots = sample_slots(sample)
    length = len(slots["next_ids"])
    image_rows = iter(slots["image_embeds"])
    token_rows = draft.embed_tokens.weight[slots["next_ids"]]
    embeds = torch.stack([next(image_rows) if slots["image_mask"][t] else token_rows[t] for t in range(length)])[None]
    image_mask = slots["image_mask"][None]
    features = slots["hidden_states"][None]
    total, count = 0.0, 0
    for _ in range(1 + mtp_steps):
        pred = draft(features, embeds, image_mask).hidden_states
        for t in range(length):
            if not slots["loss_mask"][t]:
                continue
            q = torch.softmax(draft.compute_logits(slots["target_hidden"][t]), -1)
            logits = draft.compute_logits(pred[0, t])
            l1 = sum(abs(float(a) - float(b)) for a, b in zip(torch.softmax(logits, -1), q, strict=True))
            top = sorted(range(len(q)), key=lambda v: -float(q[v]))[:10]
            listmle = 0.0
            for i, v in enumerate(top):
                listmle -= float(logits[v]) - float(torch.logsumexp(logits[top[i:]], 0))
            total += 10 * l1 + 0.1 * listmle
            count += 1
        features = torch.cat([slots["hidden_states"][None, :1], pred[:, :-1]], dim=1)
    return total, count


def test_batched_stage2_loss_equals_a_per_sample_reference(qwen_target, train_data_dir, tmp_path):
    from vispec_vllm.draft import ViSpecDraft
    from vispec_vllm.factory import build_tiny_draft
    from vispec_vllm.train.draft_init import attach_target_weights

    draft = ViSpecDraft.from_pretrained(build_tiny_draft(qwen_target, tmp_path / "d", seed=1, num_q=2))
    attach_target_weights(draft, qwen_target)
    samples = ShardedSamples([train_data_dir])
    chosen = [samples[i] for i in (0, 1, 2)]  # image, text, image; different lengths
    assert len({len(s) for s in chosen}) == 3 and chosen[0].image_mask.any() and not chosen[1].image_mask.any()
    batch = collate(chosen)
    with torch.no_grad():
        predictions = DraftRollout(draft, mtp_steps=2, use_image_path=True)(
            batch.hidden_states, batch.next_ids, batch.image_mask, batch.image_embeds, batch.attention_mask)
        batched = batch_loss(draft, predictions, batch, stage=2)
        sums, counts = zip(*(_reference_stage2_loss(draft, s, mtp_steps=2) for s in chosen), strict=True)
    assert batched.positions * 3 == sum(counts)
    assert float(batched.loss) == pytest.approx(sum(sums) / sum(counts), rel=1e-5)
    assert F.mse_loss(predictions[1], predictions[0]) > 0  # the MTP pass really reads different features


def test_command_lines_build_train_and_export(qwen_target, tmp_path):
    from safetensors.torch import load_file

    from vispec_vllm.data.__main__ import main as data_main
    from vispec_vllm.train.__main__ import main as train_main
    from vispec_vllm.train.export import main as export_main

    source = tmp_path / "sharegpt.json"
    source.write_text(json.dumps([{"id": str(i), "conversations": [
        {"from": "human", "value": f"Where is tree {i}?"}, {"from": "gpt", "value": "Near the big red house."}]}
        for i in range(3)]))
    data = tmp_path / "data"
    assert data_main(["extract", "--answers", "dataset", "--target", str(qwen_target), "--data", str(source),
                      "--out", str(data), "--shard-size", "2", "--device", "cpu", "--no-progress"]) == 0
    assert json.loads((data / "manifest.json").read_text())["samples"] == 3
    run = tmp_path / "run"
    assert train_main(["--stage", "1", "--target", str(qwen_target), "--data", str(data), "--out", str(run),
                       "--max-steps", "2", "--batch-size", "2", "--lr", "1e-3", "--device", "cpu",
                       "--no-progress"]) == 0
    assert len(read_metrics(run / LOG_FILE)) == 2
    assert export_main([str(run / "draft"), str(tmp_path / "bf16"), "--dtype", "bfloat16"]) == 0
    state = load_file(str(tmp_path / "bf16" / "model.safetensors"))
    assert len(state) == 14 and {t.dtype for t in state.values()} == {torch.bfloat16}
