"""Data pipeline pieces without a model: record validation, mask expansion, shard files, spec checks."""

from __future__ import annotations

import json

import pytest
import torch

from vispec_vllm.data.conversation import PromptStyle, dataset_messages, generation_messages, with_pil_image
from vispec_vllm.data.encoding import expand_image_runs
from vispec_vllm.data.manifest import DatasetSpec, claim_spec
from vispec_vllm.data.records import SkipReason, iter_records, load_source
from vispec_vllm.data.shards import ShardReader, TargetSample, write_shard


def _conv(question: str, answer: str = "ok") -> list[dict]:
    return [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]


def test_records_are_validated_and_bad_ones_get_a_reason(tmp_path):
    from PIL import Image

    Image.new("RGB", (8, 8), "red").save(tmp_path / "good.png")
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    raw = [
        (0, {"id": "a", "image": "good.png", "conversations": _conv("<image>\nWhat is it?")}),
        (1, {"id": "b", "image": "absent.png", "conversations": _conv("<image>\nWhat?")}),
        (2, {"id": "c", "conversations": []}),
        (3, {"id": "d", "conversations": _conv("   ")}),
        (4, "not a record"),
        (5, {"id": "f", "conversations": [{"from": "gpt", "value": "hi"}, *_conv("Why?", "Because.")]}),
        (6, {"id": "g", "image": "broken.png", "conversations": _conv("<image>")}),
    ]
    results = {index: (record, reason) for index, record, reason in iter_records(raw, tmp_path)}
    assert results[0][0].image_path == tmp_path / "good.png"
    assert results[0][0].first_question == "What is it?"
    assert results[1][1] is SkipReason.IMAGE_MISSING
    assert results[2][1] is SkipReason.EMPTY_CONVERSATION
    assert results[3][1] is SkipReason.EMPTY_CONVERSATION
    assert results[4][1] is SkipReason.INVALID_RECORD
    # a leading assistant turn is dropped, as in the official ShareGPT preprocessing
    assert [t.role for t in results[5][0].turns] == ["user", "assistant"]
    # an image-only question is valid; the unreadable file is only found when the image is opened
    assert results[6][0] is not None

    from vispec_vllm.data.records import RecordSkipped, open_image

    with pytest.raises(RecordSkipped) as caught:
        open_image(results[6][0].image_path)
    assert caught.value.reason is SkipReason.IMAGE_UNREADABLE


def test_load_source_slices_after_an_optional_shuffle(tmp_path):
    path = tmp_path / "d.json"
    path.write_text(json.dumps([{"id": str(i), "conversations": _conv(f"q{i}")} for i in range(10)]))
    assert [i for i, _ in load_source(path, start=2, end=5)] == [2, 3, 4]
    shuffled = [i for i, _ in load_source(path, shuffle_seed=3)]
    assert sorted(shuffled) == list(range(10)) and shuffled != list(range(10))
    assert [i for i, _ in load_source(path, start=0, end=4, shuffle_seed=3)] == shuffled[:4]


def test_messages_put_the_image_between_question_and_instruction(tmp_path):
    from vispec_vllm.data.records import parse_record

    (tmp_path / "x.png").write_bytes(b"")
    record = parse_record(0, {"image": "x.png", "conversations": _conv("<image>\nWhat?", "A cat.")}, tmp_path)
    style = PromptStyle(system_prompt="Sys.", extra_instruction="Be long.")
    messages = generation_messages(record, style)
    assert messages[0] == {"role": "system", "content": [{"type": "text", "text": "Sys."}]}
    assert [p.get("text", p["type"]) for p in messages[1]["content"]] == ["What?", "image", "Be long."]
    full = dataset_messages(record, PromptStyle(system_prompt="", extra_instruction="ignored"))
    assert [m["role"] for m in full] == ["user", "assistant"]
    assert [p.get("text", p["type"]) for p in full[0]["content"]] == ["What?", "image"]
    marker = object()
    vllm_parts = with_pil_image(messages, marker)[1]["content"]
    assert vllm_parts[1] == {"type": "image_pil", "image_pil": marker}
    assert messages[1]["content"][1] == {"type": "image"}  # the input is not modified


def test_expand_image_runs_carries_the_mask_over_expanded_placeholders():
    image = 9
    unexpanded = [1, 2, image, 3, 4, 5]
    mask = [False, False, False, False, True, True]
    expanded = [1, 2, image, image, image, 3, 4, 5]
    assert expand_image_runs(unexpanded, mask, expanded, image) == [False] * 6 + [True, True]
    assert expand_image_runs(unexpanded, mask, [1, 2, image, 3, 4, 6], image) is None
    assert expand_image_runs(unexpanded, mask, [1, 2, 3, 4, 5], image) is None  # image run vanished
    assert expand_image_runs([1, 2], [False, True], [1, 2, 3], image) is None  # lengths differ


def _sample(n: int, length: int, hidden: int, image_at: tuple[int, ...] = ()) -> TargetSample:
    g = torch.Generator().manual_seed(n)
    image_mask = torch.zeros(length, dtype=torch.bool)
    image_mask[list(image_at)] = True
    return TargetSample(
        sample_id=f"s{n}", record_index=n,
        input_ids=torch.randint(0, 100, (length,), generator=g),
        answer_mask=torch.arange(length) >= length // 2,
        image_mask=image_mask,
        hidden_states=torch.randn(length, hidden, generator=g),
        image_embeds=torch.randn(len(image_at), hidden, generator=g),
    )


def test_shards_round_trip_and_are_written_atomically(tmp_path):
    samples = [_sample(0, 7, 4, (2, 3)), _sample(1, 5, 4), _sample(2, 9, 4, (1, 2, 3))]
    path = tmp_path / "shard_00000.safetensors"
    write_shard(path, samples, {"image_missing": 2}, hidden_size=4, dtype=torch.float32)
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temporary file left behind
    reader = ShardReader(path)
    assert len(reader) == 3 and reader.skipped == {"image_missing": 2} and reader.lengths() == [7, 5, 9]
    for i, expected in enumerate(samples):
        got = reader.sample(i)
        assert got.sample_id == expected.sample_id and got.record_index == expected.record_index
        for name in ("input_ids", "answer_mask", "image_mask", "hidden_states", "image_embeds"):
            assert torch.equal(getattr(got, name), getattr(expected, name)), name
    cut = reader.sample(2, max_len=2)  # keeps the image rows of the kept tokens only
    assert len(cut) == 2 and torch.equal(cut.image_embeds, samples[2].image_embeds[:1])

    empty = tmp_path / "shard_00001.safetensors"
    write_shard(empty, [], {"empty_conversation": 4}, hidden_size=4, dtype=torch.bfloat16)
    assert len(ShardReader(empty)) == 0 and ShardReader(empty).skipped == {"empty_conversation": 4}


def test_a_directory_keeps_the_spec_it_was_made_with(tmp_path):
    spec = DatasetSpec(target="t", source="s.json", image_folder=None, start=0, end=None, shuffle_seed=None,
                       shard_size=4, answers="generate", system_prompt="", extra_instruction="x",
                       max_new_tokens=8, max_len=64, dtype="float32")
    claim_spec(tmp_path, spec)
    claim_spec(tmp_path, spec)  # same spec: resuming is fine
    changed = DatasetSpec(**{**spec.to_json(), "shard_size": 8})
    with pytest.raises(ValueError, match="shard_size"):
        claim_spec(tmp_path, changed)
