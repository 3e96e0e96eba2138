"""A reduced draft vocabulary (ours; `d2t` + `draft_vocab_size`): choice from training data, the reference
model, the checkpoint format, training and export, and a trained reduced draft inside vLLM."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import REDUCED_VOCAB
from safetensors.torch import load_file, save_file
from test_checkpoint import official_style_dir
from test_draft_model import random_draft, random_inputs, tiny_config

from vispec_vllm.data.shards import TargetSample, shard_name, write_shard
from vispec_vllm.draft import DraftCheckpointError, ViSpecConfig, ViSpecDraft, expected_keys, load_draft_checkpoint
from vispec_vllm.train.draft_vocab import (
    REPORT_FILE,
    AnswerTokenCounts,
    choose_draft_vocab,
    count_answer_tokens,
)

# ------------------------------------------------------------------------------------------ choosing the subset


def _write_samples(directory: Path, rows: list[tuple[list[int], list[bool]]]) -> Path:
    samples = [
        TargetSample(sample_id=f"s{i}", record_index=i, input_ids=torch.tensor(ids),
                     answer_mask=torch.tensor(mask), image_mask=torch.zeros(len(ids), dtype=torch.bool),
                     hidden_states=torch.zeros(len(ids), 2), image_embeds=torch.zeros(0, 2))
        for i, (ids, mask) in enumerate(rows)
    ]
    directory.mkdir(parents=True, exist_ok=True)
    write_shard(directory / shard_name(0), samples, {}, hidden_size=2, dtype=torch.float32)
    return directory


def test_counts_are_the_trained_answer_tokens(tmp_path):
    F, T = False, True
    data = _write_samples(tmp_path / "d", [
        # answers at 1 (never trained: slot t predicts t+2), 2..4 and 6 (two turns: 4 and 6 end answers)
        ([5, 9, 7, 7, 8, 1, 3], [F, T, T, T, T, F, T]),
        ([5, 7, 2, 2, 7, 7], [F, F, T, T, T, T]),  # positions 4, 5 cut by max_len 4
    ])
    whole = count_answer_tokens([data], vocab_size=12)
    assert whole.counts.tolist() == [0, 0, 2, 1, 0, 0, 0, 4, 1, 0, 0, 0]
    assert whole.total == 8 and whole.turn_end_ids == (8,)  # sample ends (3, 7) are not turn ends
    cut = count_answer_tokens([data], vocab_size=12, max_len=4)
    assert cut.counts.tolist() == [0, 0, 2, 0, 0, 0, 0, 2, 0, 0, 0, 0]
    with pytest.raises(ValueError, match="outside the target vocabulary"):
        count_answer_tokens([data], vocab_size=8)


def _counts(vocab_size: int, frequent: dict[int, int]) -> AnswerTokenCounts:
    counts = torch.zeros(vocab_size, dtype=torch.int64)
    for token, count in frequent.items():
        counts[token] = count
    return AnswerTokenCounts(counts, ())


def test_size_is_rounded_up_to_64_and_keeps_the_most_frequent_ties_by_id():
    # 100 ids seen: id 1000 + k seen 100 - k times, and 20 more ids tied at 1
    frequent = {1000 + k: 100 - k for k in range(100)} | {3000 + k: 1 for k in range(20)}
    answers = _counts(4096, frequent)
    choice = choose_draft_vocab(answers, size=100, required=[7])
    assert choice.d2t.numel() == 128 and choice.report["chosen"]["size"] == 128
    assert choice.d2t.dtype == torch.int64 and bool((choice.d2t[1:] > choice.d2t[:-1]).all())
    kept = set(choice.d2t.tolist())
    # the required id, all 100 frequent ids, all 20 ids seen once, then unseen ids by id: 0..6
    assert kept == {7} | set(range(1000, 1100)) | set(range(3000, 3020)) | set(range(7))
    assert choice.report["chosen"]["coverage"] == 1.0
    assert choose_draft_vocab(_counts(100, frequent={5: 1}), size=90).d2t.tolist() == list(range(100))  # capped


def test_coverage_picks_the_smallest_multiple_of_64_reaching_it_and_reports_a_table():
    # ranked ids cover 1/2, 1/2 + 1/4, ... of the answer tokens: id k has 2**(20 - k) tokens
    answers = _counts(2048, {k: 2 ** (20 - k) for k in range(20)})
    tight = choose_draft_vocab(answers, coverage=0.9)
    assert tight.d2t.numel() == 64 and tight.d2t[:4].tolist() == [0, 1, 2, 3]  # 4 ids reach 0.9; rounded up
    assert tight.report["chosen"]["coverage"] == 1.0
    every = choose_draft_vocab(_counts(512, {k: 1 for k in range(200)}), coverage=0.5)
    assert every.d2t.numel() == 128  # 100 ids needed
    assert every.report["chosen"]["coverage"] == pytest.approx(128 / 200)
    table = {row["size"]: row["coverage"] for row in every.report["table"]}
    assert table == {128: pytest.approx(128 / 200), 256: 1.0}  # reported sizes below the vocabulary, and the choice
    lines = every.summary_lines()
    assert "200 trained answer tokens, 200 distinct target ids (of 512)" in lines[0]
    assert "chosen N=128 (--draft-vocab-coverage 0.5): 64.00%" in lines[-1]


def test_answer_ending_ids_are_always_kept():
    answers = AnswerTokenCounts(_counts(1024, {k: 10 for k in range(200)}).counts, turn_end_ids=(900,))
    choice = choose_draft_vocab(answers, size=64, required=[1023])
    assert {900, 1023} <= set(choice.d2t.tolist())
    assert choice.report["required_ids"] == [900, 1023]
    assert set(choice.d2t.tolist()) - {900, 1023} == set(range(62))  # then the most frequent, ties by id
    with pytest.raises(ValueError, match="exactly one"):
        choose_draft_vocab(answers, size=64, coverage=0.9)
    with pytest.raises(ValueError, match="no trained answer tokens"):
        choose_draft_vocab(_counts(1024, {}), size=64)


# ------------------------------------------------------------------------------------------ the reference model

D2T = torch.tensor([0, 3, 7, 10, 22, 40, 60])


def _reduced(model: ViSpecDraft, d2t: torch.Tensor = D2T) -> ViSpecDraft:
    reduced = copy.deepcopy(model)
    reduced.set_draft_vocab(d2t)
    return reduced


def test_restricted_logits_are_the_full_logits_at_d2t():
    full = random_draft(tiny_config())
    reduced = _reduced(full)
    hidden = torch.randn(3, 5, 32, generator=torch.Generator().manual_seed(3))
    assert reduced.compute_logits(hidden).shape == (3, 5, len(D2T))
    torch.testing.assert_close(reduced.compute_logits(hidden), full.compute_logits(hidden)[..., D2T])
    # the lm_head may also come after the draft vocabulary
    late = ViSpecDraft(tiny_config(), num_q=2)
    late.load_state_dict(full.state_dict())
    late.set_draft_vocab(D2T)
    late.set_lm_head(torch.randn(61, 32, generator=torch.Generator().manual_seed(2)))  # random_draft's head
    torch.testing.assert_close(late.compute_logits(hidden), reduced.compute_logits(hidden))


def test_propose_greedy_gives_target_ids():
    full = random_draft(tiny_config())
    hidden, embeds = random_inputs(4, 6, 32, seed=5)
    proposals = full.propose_greedy(hidden, embeds, None, None, num_speculative_tokens=3)
    # a subset holding every full-vocabulary proposal proposes the same target ids
    holding = torch.tensor(sorted(set(proposals.flatten().tolist()) | {1, 59}))
    assert torch.equal(_reduced(full, holding).propose_greedy(hidden, embeds, None, None, 3), proposals)
    # a subset without the first proposals proposes other ids, all of them in the subset
    others = torch.tensor([t for t in range(61) if t not in set(proposals[:, 0].tolist())])
    drafted = _reduced(full, others).propose_greedy(hidden, embeds, None, None, 3)
    assert set(drafted.flatten().tolist()) <= set(others.tolist())
    assert not bool((drafted[:, 0] == proposals[:, 0]).any())


def test_round_trip_keeps_d2t_and_config(tmp_path):
    reduced = _reduced(random_draft(tiny_config()))
    reduced.save_pretrained(tmp_path / "d")
    config = json.loads((tmp_path / "d" / "config.json").read_text())
    state = load_file(str(tmp_path / "d" / "model.safetensors"))
    assert config["draft_vocab_size"] == len(D2T)
    assert state["d2t"].dtype == torch.int64 and torch.equal(state["d2t"], D2T)
    assert set(state) == set(expected_keys(ViSpecConfig.from_dict(config), 2))
    loaded = ViSpecDraft.from_pretrained(tmp_path / "d")
    assert torch.equal(loaded.d2t, D2T) and loaded.config == reduced.config
    loaded.set_lm_head(torch.randn(61, 32, generator=torch.Generator().manual_seed(2)))
    hidden = torch.randn(2, 32)
    torch.testing.assert_close(loaded.compute_logits(hidden), reduced.compute_logits(hidden))
    with pytest.raises(ValueError, match="already has a draft vocabulary"):
        loaded.set_draft_vocab(D2T)
    with pytest.raises(ValueError, match="set_draft_vocab"):
        ViSpecDraft(loaded.config)


def _rewrite(directory: Path, *, config: dict | None = None, d2t: torch.Tensor | None = None) -> None:
    if config is not None:
        (directory / "config.json").write_text(json.dumps(config))
    state = load_file(str(directory / "model.safetensors"))
    if d2t is not None:
        state["d2t"] = d2t
    save_file(state, str(directory / "model.safetensors"))


@pytest.mark.parametrize(
    ("d2t", "config_size", "message"),
    [
        (torch.tensor([0, 3, 3, 10, 22, 40, 60]), 7, "strictly increasing target ids, found 3 then 3 at draft ids 1"),
        (torch.tensor([0, 3, 7, 10, 22, 40, 61]), 7, r"target ids in \[0, 61\), found ids from 0 to 61"),
        (torch.tensor([-1, 3, 7, 10, 22, 40, 60]), 7, "found ids from -1 to 60"),
        (D2T.int(), 7, "non-empty int64 vector, found torch.int32"),
        (D2T, 8, r"d2t expected \[8\] found \[7\]"),
        (D2T, None, "expected draft_vocab_size in config.json with a d2t tensor"),
    ],
)
def test_bad_d2t_is_refused_in_one_line(tmp_path, d2t, config_size, message):
    directory = tmp_path / "d"
    _reduced(random_draft(tiny_config())).save_pretrained(directory)
    config = json.loads((directory / "config.json").read_text())
    config.pop("draft_vocab_size")
    if config_size is not None:
        config["draft_vocab_size"] = config_size
    _rewrite(directory, config=config, d2t=d2t)
    with pytest.raises(DraftCheckpointError, match=message) as error:
        load_draft_checkpoint(directory)
    assert "\n" not in str(error.value) and "model.safetensors" in str(error.value)


def test_draft_vocab_size_without_d2t_or_beyond_the_vocabulary(tmp_path):
    directory = official_style_dir(tmp_path)
    config = json.loads((directory / "config.json").read_text())
    _rewrite(directory, config={**config, "draft_vocab_size": 7})
    with pytest.raises(DraftCheckpointError, match=r"missing keys \[d2t\]"):
        load_draft_checkpoint(directory)
    _rewrite(directory, config={**config, "draft_vocab_size": 62})
    with pytest.raises(DraftCheckpointError, match=r"draft_vocab_size null or in \[1, 61\], found 62"):
        load_draft_checkpoint(directory)


def test_official_format_is_unaffected(tmp_path):
    directory = official_style_dir(tmp_path)
    config, state, _ = load_draft_checkpoint(directory)
    assert config.draft_vocab_size is None and "d2t" not in expected_keys(config, 2) and "d2t" not in state
    draft = ViSpecDraft.from_pretrained(directory)
    assert draft.d2t is None and draft.target_ids(torch.tensor([60])).tolist() == [60]
    draft.save_pretrained(tmp_path / "again")
    assert json.loads((tmp_path / "again" / "config.json").read_text()) == json.loads(
        (directory / "config.json").read_text())
    assert "d2t" not in load_file(str(tmp_path / "again" / "model.safetensors"))


# ------------------------------------------------------------------------------------------ training and export


def _train_config(stage: int, target: Path, data: Path, out: Path, init: Path | None, **changes):
    from vispec_vllm.train.config import TrainConfig

    settings = dict(stage=stage, target=target, data=[data], out=out, init=init, lr=3e-3, max_steps=4,
                    warmup_steps=1, batch_size=4, seed=0, precision="fp32", device="cpu", progress=False)
    return TrainConfig(**{**settings, **changes})


def _trained_answer_tokens(data: Path) -> torch.Tensor:
    """Every token the loss trains the draft to predict (slot t predicts x_{t+2}), from the training batches."""
    from vispec_vllm.train.batches import ShardedSamples, sample_slots

    samples = ShardedSamples([data])
    tokens = []
    for n in range(len(samples)):
        slots = sample_slots(samples[n])
        predicted = torch.cat([slots["next_ids"][1:], slots["next_ids"].new_zeros(1)])  # x_{t+2} at slot t
        tokens.append(predicted[slots["loss_mask"]])
    return torch.cat(tokens)


@pytest.fixture(scope="module")
def reduced_stage1(tiny_target, train_data_dir, tmp_path_factory) -> SimpleNamespace:
    from vispec_vllm.train.__main__ import main as train_main

    target, out = tiny_target("qwen2_5_vl"), tmp_path_factory.mktemp("reduced_stage1")
    assert train_main(["--stage", "1", "--target", str(target), "--data", str(train_data_dir), "--out", str(out),
                       "--max-steps", "4", "--batch-size", "4", "--lr", "3e-3", "--device", "cpu",
                       "--draft-vocab-size", "40", "--no-progress"]) == 0
    return SimpleNamespace(target=target, out=out, draft=out / "draft")


def test_stage1_chooses_the_most_frequent_answer_tokens(reduced_stage1, train_data_dir, capsys):
    from vispec_vllm.factory import target_info

    report = json.loads((reduced_stage1.out / REPORT_FILE).read_text())
    d2t = load_file(str(reduced_stage1.draft / "model.safetensors"))["d2t"]
    assert d2t.numel() == 64 == report["chosen"]["size"]  # 40 rounded up
    trained = _trained_answer_tokens(train_data_dir)
    counts = torch.bincount(trained, minlength=target_info(reduced_stage1.target).vocab_size)
    assert report["answer_tokens"] == len(trained) and report["distinct_ids"] == int((counts > 0).sum())
    assert int(counts.count_nonzero()) < 64  # a 17-word answer vocabulary: every trained token is kept
    assert set(trained.tolist()) <= set(d2t.tolist()) and report["chosen"]["coverage"] == 1.0
    assert target_info(reduced_stage1.target).eos_token_id in d2t.tolist()


def test_stage2_inherits_the_draft_vocabulary_and_export_keeps_it(reduced_stage1, train_data_dir, tmp_path):
    from vispec_vllm.train import train
    from vispec_vllm.train.export import main as export_main
    from vispec_vllm.train.metrics import read_metrics
    from vispec_vllm.train.trainer import LOG_FILE

    stage2 = train(_train_config(2, reduced_stage1.target, train_data_dir, tmp_path / "s2", reduced_stage1.draft))
    d2t = load_file(str(reduced_stage1.draft / "model.safetensors"))["d2t"]
    assert torch.equal(ViSpecDraft.from_pretrained(stage2).d2t, d2t)
    assert all(0 <= r["acc"] <= 1 and r["loss"] > 0 for r in read_metrics(tmp_path / "s2" / LOG_FILE))
    assert export_main([str(stage2), str(tmp_path / "bf16"), "--dtype", "bfloat16"]) == 0
    state = load_file(str(tmp_path / "bf16" / "model.safetensors"))
    assert torch.equal(state.pop("d2t"), d2t) and {t.dtype for t in state.values()} == {torch.bfloat16}
    assert json.loads((tmp_path / "bf16" / "config.json").read_text())["draft_vocab_size"] == 64
    assert torch.equal(ViSpecDraft.from_pretrained(tmp_path / "bf16").d2t, d2t)


def test_a_draft_vocabulary_is_chosen_once_in_stage_1(reduced_stage1, train_data_dir, tmp_path):
    from vispec_vllm.train.__main__ import build_parser
    from vispec_vllm.train.trainer import Trainer

    with pytest.raises(ValueError, match="stage 2 inherits it"):
        _train_config(2, reduced_stage1.target, train_data_dir, tmp_path, reduced_stage1.draft, draft_vocab_size=64)
    with pytest.raises(ValueError, match="mutually exclusive"):
        _train_config(1, reduced_stage1.target, train_data_dir, tmp_path, None, draft_vocab_size=64,
                      draft_vocab_coverage=0.9)
    with pytest.raises(ValueError, match="already has a draft vocabulary of 64 ids"):
        Trainer(_train_config(1, reduced_stage1.target, train_data_dir, tmp_path, reduced_stage1.draft,
                              draft_vocab_coverage=0.9))
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--stage", "1", "--target", "t", "--data", "d", "--out", "o",
                                   "--draft-vocab-size", "64", "--draft-vocab-coverage", "0.9"])


def test_the_training_loss_over_a_whole_vocabulary_subset_is_the_full_loss(tiny_target, train_data_dir, tmp_path):
    from vispec_vllm.factory import build_tiny_draft, target_info
    from vispec_vllm.train.batches import ShardedSamples, collate
    from vispec_vllm.train.draft_init import attach_target_weights
    from vispec_vllm.train.step import DraftRollout, batch_loss

    target = tiny_target("qwen2_5_vl")
    full = ViSpecDraft.from_pretrained(build_tiny_draft(target, tmp_path / "draft", seed=1))
    attach_target_weights(full, target)
    every_id = _reduced(full, torch.arange(target_info(target).vocab_size))
    samples = ShardedSamples([train_data_dir])
    batch = collate([samples[i] for i in range(4)])
    losses = []
    for draft in (full, every_id):
        with torch.no_grad():
            predictions = DraftRollout(draft, mtp_steps=1, use_image_path=True)(
                batch.hidden_states, batch.next_ids, batch.image_mask, batch.image_embeds, batch.attention_mask)
            losses.append(batch_loss(draft, predictions, batch, stage=2))
    assert float(losses[0].loss) == pytest.approx(float(losses[1].loss), rel=1e-6)
    assert losses[0].correct == losses[1].correct


# ------------------------------------------------------------------------------------------ in vLLM

@pytest.fixture(scope="module")
def served(tiny_target, trained_reduced_draft):
    """The session's trained reduced-vocabulary draft (conftest), served with its target: greedy outputs of the
    target alone and with the draft (K=3), counters, the draft's recorded proposals, and the live draft's logits
    on random hidden states next to the target lm_head's."""
    from conftest import vllm_engine
    from parity import drafter_of
    from vllm import SamplingParams

    from vispec_vllm.engine.metrics import SpecDecodeCounters
    from vispec_vllm.engine.recorder import ProposalRecorder
    from vispec_vllm.factory import make_test_image
    from vispec_vllm.media import image_part

    target, draft = tiny_target("qwen2_5_vl"), trained_reduced_draft
    questions = ("Describe the picture in detail.", "What is in this image?", "What is the scene?")
    conversations = [[{"role": "user", "content": [image_part(make_test_image(900 + i)),
                                                   {"type": "text", "text": questions[i % 3]}]}] for i in range(6)]
    conversations.append([{"role": "user", "content": "Tell me about the old house."}])
    params = SamplingParams(temperature=0.0, max_tokens=32, ignore_eos=True)
    common = dict(model=str(target), limit_mm_per_prompt={"image": 1})
    with vllm_engine(**common) as llm:
        expected = [o.outputs[0].token_ids for o in llm.chat(conversations, params, use_tqdm=False)]
    spec = {"method": "eagle", "model": str(draft), "num_speculative_tokens": 3}
    with vllm_engine(**common, speculative_config=spec, disable_log_stats=False) as llm:
        drafter = drafter_of(llm)
        drafter.recorder = ProposalRecorder()
        got = [o.outputs[0].token_ids for o in llm.chat(conversations, params, use_tqdm=False)]
        counters = SpecDecodeCounters.from_metrics(llm.get_metrics())
        model = drafter.model
        head_after_serving = model.draft_vocab_head
        hidden = torch.randn(5, model.vispec_config.hidden_size, generator=torch.Generator().manual_seed(0))
        return SimpleNamespace(draft=draft, target=target, expected=expected, got=got, counters=counters,
                               recorder=drafter.recorder, d2t=model.d2t.clone(), head_after_serving=head_after_serving,
                               logits=model.compute_logits(hidden), head_after_logits=model.draft_vocab_head,
                               full_logits=model.logits_processor(model.lm_head, hidden),
                               lm_head_rows=model.lm_head.weight[model.d2t].clone())


@pytest.mark.vllm
def test_reduced_draft_is_lossless_in_vllm_with_accepted_and_rejected_drafts(served):
    print(f"reduced draft ({REDUCED_VOCAB} ids): mean acceptance length "
          f"{served.counters.mean_acceptance_length:.2f}, accepted {served.counters.accepted_tokens} of "
          f"{served.counters.draft_tokens} draft tokens")
    assert served.got == served.expected
    assert 0 < served.counters.accepted_tokens < served.counters.draft_tokens
    exported = load_file(str(served.draft / "model.safetensors"))["d2t"]
    assert served.d2t.numel() == REDUCED_VOCAB and torch.equal(served.d2t, exported)


@pytest.mark.vllm
def test_vllm_logits_are_the_target_lm_head_at_d2t_and_minus_inf_elsewhere(served):
    assert served.logits.shape == served.full_logits.shape == (5, 1024)
    torch.testing.assert_close(served.logits[:, served.d2t], served.full_logits[:, served.d2t])
    outside = torch.ones(1024, dtype=torch.bool)
    outside[served.d2t] = False
    assert bool(torch.isneginf(served.logits[:, outside]).all())
    # built once, on the first draft, from the target's lm_head rows: not rebuilt per call
    assert served.head_after_serving is not None and served.head_after_logits is served.head_after_serving
    assert torch.equal(served.head_after_serving.weight, served.lm_head_rows)


@pytest.mark.vllm
def test_vllm_reduced_drafts_equal_the_reference(served):
    from parity import compare, load_oracle

    from vispec_vllm.factory import target_info

    report = compare(served.recorder, load_oracle(served.draft, served.target),
                     target_info(served.target).image_token_id)
    assert report.mismatched == []
    assert report.compared >= 7 * 32 // 4 and report.with_images > 0
    drafted = {t for call in served.recorder.calls for tokens in call.drafts.values() for t in tokens}
    assert drafted <= set(served.d2t.tolist())
