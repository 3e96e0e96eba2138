"""Load-adaptive speculation calibration (`python -m vispec_vllm.calibrate`).

The planning step on synthetic measurements: no drafting where it cannot pay off, the largest K where drafts are
accepted and cheap, K falling with the batch size where the target's step grows with its tokens, ranges merged
and covering 1..max_num_seqs in the form vLLM validates, K capped. Then the command end to end on the factory
Qwen2.5-VL and its trained draft: the schedule it writes is taken by vLLM, which follows it and keeps greedy
output the target's own, and its --profile parts add up to no more than the step.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys

import pytest

from vispec_vllm.calibrate.plan import (
    BatchTiming,
    best_k,
    conditional_acceptance,
    merge_ranges,
    plan_schedule,
    step_ms_at,
    tokens_per_row,
)

MEASURED = (1, 2, 4, 8, 16, 32)


def timings(verify_ms, draft_first_ms: float, draft_token_ms: float, max_k: int = 3) -> list[BatchTiming]:
    """Synthetic steps: verify_ms(b, tokens a row) plus the draft's first pass and draft_token_ms per draft."""
    return [BatchTiming(b, tuple(verify_ms(b, k + 1) + draft_first_ms + k * draft_token_ms for k in range(max_k + 1)),
                        verify_ms(b, 1)) for b in MEASURED]


def memory_bound(b: int, tokens: int) -> float:
    return 10.0  # the step costs the same whatever the tokens: small models on a large GPU


def compute_bound(b: int, tokens: int) -> float:
    return 2.0 + 0.3 * b * tokens  # every token costs: large batches


def lookup_of(schedule, max_num_seqs: int, k: int) -> list[int]:
    from vllm.v1.spec_decode.dynamic.utils import build_dynamic_sd_schedule_lookup

    return build_dynamic_sd_schedule_lookup(schedule, vllm_max_batch_size=max_num_seqs, vllm_num_speculative_tokens=k)


def test_conditional_acceptance_and_expected_tokens():
    conditional = conditional_acceptance([80, 60, 30], drafts=100)
    assert conditional == pytest.approx([0.8, 0.75, 0.5])
    assert tokens_per_row(conditional, 0) == 1.0
    assert tokens_per_row(conditional, 3) == pytest.approx(1 + 0.8 + 0.6 + 0.3)  # 1 + accepted / rounds
    assert conditional_acceptance([5, 0, 0], drafts=10) == [0.5, 0.0, 0.0]
    with pytest.raises(ValueError, match="no draft rounds"):
        conditional_acceptance([0, 0, 0], drafts=0)


def test_no_drafting_where_drafts_are_rarely_accepted_and_costly():
    plan = plan_schedule(timings(memory_bound, 2.0, 4.0), [0.1, 0.1, 0.1], num_speculative_tokens=3, max_num_seqs=32)
    assert plan.schedule == [(1, 32, 0)]
    assert all(p.best_k == 0 and p.tokens_per_s[0] == max(p.tokens_per_s) for p in plan.predictions)
    assert all(p.speedup < 1 for p in plan.predictions)  # K=0 still pays the draft's first pass


def test_largest_k_where_drafts_are_accepted_and_cheap():
    plan = plan_schedule(timings(memory_bound, 0.2, 0.3), [0.9, 0.9, 0.9], num_speculative_tokens=3, max_num_seqs=32)
    assert plan.schedule == [(1, 32, 3)]
    assert all(p.speedup > 2 for p in plan.predictions)


def test_k_falls_with_batch_size_in_merged_ranges_covering_every_batch_size():
    max_num_seqs = 48  # beyond the largest measured batch size: its K carries on
    acceptance = [0.8, 0.7, 0.6]
    measured = timings(compute_bound, 0.5, 0.2)
    plan = plan_schedule(measured, acceptance, num_speculative_tokens=3, max_num_seqs=max_num_seqs)
    schedule = plan.schedule
    assert schedule[0][0] == 1 and schedule[-1][1] == max_num_seqs
    assert all(after[0] == before[1] + 1 for before, after in zip(schedule, schedule[1:], strict=False))
    ks = [k for _, _, k in schedule]
    assert ks[0] == 3 and ks[-1] == 0 and ks == sorted(ks, reverse=True)
    assert len(set(ks)) == len(ks)  # neighbours with the same K are merged
    # vLLM validates it, and its dense lookup is the best K of every batch size
    dense = lookup_of(schedule, max_num_seqs, 3)
    assert dense[1:] == [best_k(measured, acceptance, b, 3) for b in range(1, max_num_seqs + 1)]
    assert [p.best_k for p in plan.predictions] == [dense[b] for b in MEASURED]


def test_k_is_capped_at_num_speculative_tokens():
    measured = timings(memory_bound, 0.2, 0.3, max_k=5)  # step times up to K=5
    plan = plan_schedule(measured, [0.95] * 5, num_speculative_tokens=3, max_num_seqs=8)
    assert plan.schedule == [(1, 8, 3)]
    assert all(len(p.tokens_per_s) == 4 for p in plan.predictions)


def test_step_times_between_measured_batch_sizes_are_interpolated_and_held_beyond():
    measured = [BatchTiming(2, (10.0, 20.0), 8.0), BatchTiming(6, (30.0, 40.0), 20.0)]
    assert step_ms_at(measured, 4, 0) == pytest.approx(20.0)
    assert step_ms_at(measured, 5, 1) == pytest.approx(35.0)
    assert step_ms_at(measured, 1, 1) == 20.0 and step_ms_at(measured, 9, 0) == 30.0


def test_merge_ranges():
    assert merge_ranges([3, 3, 2, 2, 2, 0, 2]) == [(1, 2, 3), (3, 5, 2), (6, 6, 0), (7, 7, 2)]


@pytest.mark.parametrize(("change", "message"), [
    (dict(acceptance=[0.5, 0.5]), "fewer than K=3"),
    (dict(timings=[BatchTiming(1, (1.0, 2.0), 1.0)]), "K up to 3"),
    (dict(timings=[BatchTiming(2, (1.0,) * 4, 1.0), BatchTiming(2, (1.0,) * 4, 1.0)]), "distinct"),
    (dict(timings=[BatchTiming(1, (1.0, 0.0, 1.0, 1.0), 1.0)]), "positive"),
    (dict(timings=[]), "no batch size"),
])
def test_bad_measurements_are_refused(change, message):
    arguments = dict(timings=timings(memory_bound, 1.0, 1.0), acceptance=[0.5] * 3)
    arguments.update(change)
    with pytest.raises(ValueError, match=message):
        plan_schedule(arguments["timings"], arguments["acceptance"], num_speculative_tokens=3, max_num_seqs=8)


def test_prompts_file_entries_and_errors(tmp_path):
    from vispec_vllm.calibrate.prompts import images_in, load_conversations
    from vispec_vllm.factory import make_test_image

    make_test_image(1, size=(64, 64)).save(tmp_path / "a.png")
    path = tmp_path / "prompts.json"
    path.write_text(json.dumps(["What is this?", {"text": "Describe it.", "image": "a.png"},
                               {"messages": [{"role": "user", "content": "Hi"}]}]))
    conversations = load_conversations(path)
    assert [images_in(c) for c in conversations] == [0, 1, 0]
    assert conversations[1][0]["content"][0]["image_url"]["url"].startswith("data:image/png;base64,")
    for bad, message in [([], "non-empty JSON list"), ([{"text": "x", "image": "missing.png"}], "cannot open image"),
                         ([42], "entry 0: expected"), ([{"messages": []}], "non-empty list of chat messages")]:
        path.write_text(json.dumps(bad))
        with pytest.raises(ValueError, match=message):
            load_conversations(path)


@pytest.mark.parametrize(("arguments", "message"), [
    (["--batch-sizes", "1,x"], "comma-separated integers"),
    (["--batch-sizes", "0,2"], ">= 1"),
    (["--max-num-seqs", "2", "--batch-sizes", "1,4"], "below the largest batch size"),
    (["--engine-args", "[1]"], "JSON object"),
])
def test_bad_command_lines_are_refused(tiny_target, arguments, message, capsys):
    from vispec_vllm.calibrate.__main__ import parse_args

    target = str(tiny_target("qwen2_5_vl"))
    with pytest.raises(SystemExit):
        parse_args(["--target", target, "--draft", target, *arguments])
    assert message in capsys.readouterr().err


def test_missing_model_directory_is_refused(tmp_path, capsys):
    from vispec_vllm.calibrate.__main__ import parse_args

    with pytest.raises(SystemExit):
        parse_args(["--target", str(tmp_path / "nope"), "--draft", str(tmp_path)])
    assert "not a directory" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------- end to end
BATCH_SIZES = (1, 2, 4)
NUM_SPECULATIVE_TOKENS = 3


@pytest.fixture(scope="module")
def calibrated(tiny_target, trained_draft, tmp_path_factory):
    """The command run once, as a user runs it: (schedule JSON, stdout)."""
    out = tmp_path_factory.mktemp("calibrate") / "schedule.json"
    command = [sys.executable, "-m", "vispec_vllm.calibrate", "--target", str(tiny_target("qwen2_5_vl")),
               "--draft", str(trained_draft), "--batch-sizes", ",".join(map(str, BATCH_SIZES)), "--steps", "8",
               "--max-tokens", "24", "--num-speculative-tokens", str(NUM_SPECULATIVE_TOKENS), "--profile",
               "--out", str(out), "--dtype", "float32", "--enforce-eager", "--max-model-len", "1024"]
    # one OpenMP thread: on a shared 2-core machine two threads wait for each other at every op (10-50x slower)
    done = subprocess.run(command, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    print(done.stdout)
    assert done.returncode == 0, done.stdout + done.stderr + out.with_suffix(".log").read_text()[-4000:]
    return json.loads(out.read_text()), done.stdout


def chat_prompts() -> list[list[dict]]:
    from vispec_vllm.factory import make_test_image
    from vispec_vllm.media import image_part

    image_turn = [image_part(make_test_image(31)), {"type": "text", "text": "Describe the picture in detail."}]
    return [[{"role": "user", "content": image_turn}], [{"role": "user", "content": "Tell me about the old house."}]]


def greedy(llm, max_tokens: tuple[int, ...] = (40, 20)) -> list[list[int]]:
    from vllm import SamplingParams

    params = [SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True) for n in max_tokens]
    return [list(o.outputs[0].token_ids) for o in llm.chat(chat_prompts(), params, use_tqdm=False)]


@pytest.mark.vllm
def test_calibrated_schedule_is_taken_by_vllm_and_keeps_greedy_output(calibrated, tiny_target):
    from conftest import vllm_engine
    from parity import drafter_of

    result, stdout = calibrated
    config = result["speculative_config"]
    schedule = config["num_speculative_tokens_per_batch_size"]
    assert result["num_speculative_tokens_per_batch_size"] == schedule
    assert schedule[0][0] == 1 and schedule[-1][1] == max(BATCH_SIZES) == result["max_num_seqs"]
    dense = lookup_of(schedule, max(BATCH_SIZES), NUM_SPECULATIVE_TOKENS)  # vLLM's own validation
    assert [b["best_k"] for b in result["batches"]] == [dense[b] for b in BATCH_SIZES]
    # the printed flag is the file's config, ready to paste
    flag = next(line for line in stdout.splitlines() if "--speculative-config" in line)
    assert json.loads(shlex.split(flag)[1]) == config

    target = tiny_target("qwen2_5_vl")
    with vllm_engine(model=str(target), limit_mm_per_prompt={"image": 1}, max_num_seqs=max(BATCH_SIZES)) as llm:
        alone = greedy(llm)
    with vllm_engine(model=str(target), limit_mm_per_prompt={"image": 1}, max_num_seqs=max(BATCH_SIZES),
                     speculative_config=config) as llm:
        drafter = drafter_of(llm)
        used: set[tuple[int, int]] = set()
        propose = drafter.propose

        def recording_propose(num_speculative_tokens, *args, **kwargs):
            used.add((kwargs["common_attn_metadata"].num_reqs, num_speculative_tokens))
            return propose(num_speculative_tokens, *args, **kwargs)

        drafter.propose = recording_propose
        with_schedule = greedy(llm)
    assert with_schedule == alone
    assert {rows for rows, _ in used} == {1, 2}
    assert all(k == dense[rows] for rows, k in used), (used, schedule)


@pytest.mark.vllm
def test_calibration_measurements(calibrated):
    result, _ = calibrated
    acceptance = result["acceptance"]
    assert acceptance["drafts"] > 0 and len(acceptance["rate_per_position"]) == NUM_SPECULATIVE_TOKENS
    rates = acceptance["rate_per_position"]
    assert rates == sorted(rates, reverse=True) and 0 < rates[0] <= 1  # a chain: later positions never more often
    assert [b["batch_size"] for b in result["batches"]] == list(BATCH_SIZES)
    for batch in result["batches"]:
        assert batch["steps"] == 8
        for key in ("step_ms", "verify_ms", "propose_ms", "predicted_tokens_per_s"):
            assert len(batch[key]) == NUM_SPECULATIVE_TOKENS + 1 and min(batch[key]) > 0, (key, batch)
        assert batch["propose_ms"][0] > 0  # at K=0 the draft still runs its first pass
        assert batch["predicted_tokens_per_s"][batch["best_k"]] == max(batch["predicted_tokens_per_s"])


@pytest.mark.vllm
def test_profile_parts_add_up_to_no_more_than_the_step(calibrated):
    result, stdout = calibrated
    assert "where the time goes" in stdout
    for batch in result["batches"]:
        profile = batch["profile"]
        parts = dict(profile["parts_ms"])
        rest = parts.pop("rest of the step")
        assert profile["k"] == NUM_SPECULATIVE_TOKENS and profile["steps"] == 8
        assert all(ms >= 0 for ms in parts.values()), parts
        assert sum(parts.values()) <= profile["step_ms"] and rest >= 0
        assert parts["target forward"] > 0 and parts["draft forwards"] > 0 and parts["scheduler"] > 0
        # K drafts a row: the first pass and K-1 chain steps, and K draft lm_heads
        assert profile["draft_forwards_per_step"] == NUM_SPECULATIVE_TOKENS
        assert profile["draft_lm_heads_per_step"] == NUM_SPECULATIVE_TOKENS


def test_draft_sample_method_is_written_into_the_speculative_config_only_when_not_vllms_default(tmp_path):
    from pathlib import Path

    from vispec_vllm.calibrate.__main__ import parse_args
    from vispec_vllm.calibrate.measure import EngineSettings

    base = EngineSettings(Path("/t"), Path("/d"), num_speculative_tokens=3, max_batch_size=8, images_per_prompt=1)
    schedule = [[1, 4, 3], [5, 8, 1]]
    assert "draft_sample_method" not in base.speculative_config(schedule)
    sampled = EngineSettings(Path("/t"), Path("/d"), 3, 8, 1, draft_sample_method="probabilistic")
    assert sampled.speculative_config(schedule) == {
        "method": "eagle", "model": "/d", "num_speculative_tokens": 3,
        "num_speculative_tokens_per_batch_size": schedule, "draft_sample_method": "probabilistic"}
    assert parse_args(["--target", str(tmp_path), "--draft", str(tmp_path)]).draft_sample_method == "greedy"
    args = parse_args(["--target", str(tmp_path), "--draft", str(tmp_path), "--draft-sample-method", "probabilistic"])
    assert args.draft_sample_method == "probabilistic"
    with pytest.raises(SystemExit):
        parse_args(["--target", str(tmp_path), "--draft", str(tmp_path), "--draft-sample-method", "random"])
    from vispec_vllm.speculative_config import eagle_config

    with pytest.raises(ValueError, match="draft_sample_method 'random'"):
        eagle_config(Path("/d"), 3, draft_sample_method="random")
