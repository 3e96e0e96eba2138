"""Data stages on a tiny Qwen2.5-VL target without vLLM: resumable shards, skipped records, answer masks.

The generation stage is driven by a stand-in with `LLM.chat`'s interface (vLLM itself is exercised in
test_train_e2e.py); the teacher-forced stage runs the real transformers target.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from vispec_vllm.data.answers import read_answers
from vispec_vllm.data.encoding import encode_prompt
from vispec_vllm.data.manifest import MANIFEST_FILE, DatasetSpec, answers_path, shard_paths
from vispec_vllm.data.pipeline import load_processor, run_extract, run_generate
from vispec_vllm.data.shards import ShardReader

ANSWER_LENGTH = 5


class ScriptedChatLLM:
    """`LLM.chat` stand-in: the prompt ids the target's processor gives, and a fixed answer per prompt length."""

    def __init__(self, target: Path) -> None:
        self.processor = load_processor(target)
        self.calls = 0

    def chat(self, conversations, sampling_params, use_tqdm=False):
        self.calls += 1
        outputs = []
        for messages in conversations:
            image = next((p["image_pil"] for m in messages for p in m["content"] if p["type"] == "image_pil"), None)
            placeholders = [{**m, "content": [{"type": "image"} if p["type"] == "image_pil" else p
                                              for p in m["content"]]} for m in messages]
            prompt_ids = encode_prompt(self.processor, placeholders, image).input_ids.tolist()
            answer = [(len(prompt_ids) * 7 + k) % 900 + 10 for k in range(ANSWER_LENGTH)]
            outputs.append(SimpleNamespace(prompt_token_ids=prompt_ids,
                                           outputs=[SimpleNamespace(token_ids=answer, finish_reason="length")]))
        return outputs


def _records(tmp_path: Path, num: int) -> tuple[Path, Path]:
    from vispec_vllm.factory import make_test_image

    folder = tmp_path / "images"
    folder.mkdir()
    records = []
    for i in range(num):
        if i % 2 == 0:
            make_test_image(i, size=(112, 112)).save(folder / f"{i}.png")
            records.append({"id": f"r{i}", "image": f"{i}.png",
                            "conversations": [{"from": "human", "value": f"<image>\nWhat is in picture {i}?"},
                                              {"from": "gpt", "value": "A dog."}]})
        else:
            records.append({"id": f"r{i}", "conversations": [{"from": "human", "value": f"Tell me about tree {i}."},
                                                              {"from": "gpt", "value": "It is tall."}]})
    source = tmp_path / "data.json"
    source.write_text(json.dumps(records))
    return source, folder


def _spec(target: Path, source: Path, folder: Path, **changes) -> DatasetSpec:
    fields = dict(target=str(target), source=str(source), image_folder=str(folder), start=0, end=None,
                  shuffle_seed=None, shard_size=3, answers="generate", system_prompt="Be brief.",
                  extra_instruction="Please answer with at least 1000 words.", max_new_tokens=ANSWER_LENGTH,
                  max_len=512, dtype="float32")
    return DatasetSpec(**{**fields, **changes})


class Interrupted(Exception):
    pass


def _interrupt_after(shard: int):
    def hook(k: int) -> None:
        if k == shard:
            raise Interrupted(f"after shard {k}")

    return hook


def _shard_tensors(directory: Path) -> list[dict[str, torch.Tensor]]:
    from safetensors.torch import load_file

    return [load_file(str(p)) for p in shard_paths(directory)]


@pytest.fixture(scope="module")
def qwen_target(tiny_target) -> Path:
    return tiny_target("qwen2_5_vl")


def test_interrupted_stages_resume_to_the_same_shards(qwen_target, tmp_path):
    source, folder = _records(tmp_path, 8)  # 3 shards: 3 + 3 + 2 records
    spec = _spec(qwen_target, source, folder)
    whole, resumed = tmp_path / "whole", tmp_path / "resumed"
    llm = ScriptedChatLLM(qwen_target)

    run_generate(spec, whole, llm=llm, records_per_call=1, progress=False)
    run_extract(spec, whole, device="cpu", progress=False)

    with pytest.raises(Interrupted):
        run_generate(spec, resumed, llm=llm, records_per_call=1, progress=False, after_shard=_interrupt_after(1))
    assert [answers_path(resumed, k).exists() for k in range(3)] == [True, True, False]
    calls = llm.calls
    run_generate(spec, resumed, llm=llm, records_per_call=1, progress=False)
    assert llm.calls == calls + 1  # only the unfinished shard was generated again
    with pytest.raises(Interrupted):
        run_extract(spec, resumed, device="cpu", progress=False, after_shard=_interrupt_after(0))
    partial = json.loads((resumed / MANIFEST_FILE).read_text())
    assert partial["complete_shards"] == 1 and not partial["complete"] and partial["samples"] == 3
    first_shard = shard_paths(resumed)[0].stat().st_mtime_ns
    manifest = run_extract(spec, resumed, device="cpu", progress=False)
    assert shard_paths(resumed)[0].stat().st_mtime_ns == first_shard  # finished shards are not rewritten

    assert [p.name for p in shard_paths(resumed)] == [f"shard_{k:05d}.safetensors" for k in range(3)]
    assert not list(resumed.rglob("*.tmp"))
    for k in range(3):
        assert read_answers(answers_path(whole, k)) == read_answers(answers_path(resumed, k))
    for a, b in zip(_shard_tensors(whole), _shard_tensors(resumed), strict=True):
        assert a.keys() == b.keys() and all(torch.equal(a[key], b[key]) for key in a)
    ids = [sid for p in shard_paths(resumed) for sid in ShardReader(p).sample_ids]
    assert ids == [f"r{i}" for i in range(8)]  # every record once, in source order
    assert manifest["complete"] and manifest["samples"] == 8 and manifest["skipped"] == {}
    assert manifest["image_tokens"] == 4 * 16  # four 112x112 images of 8x8 patches merged 2x2
    assert manifest["answer_tokens"] == 8 * ANSWER_LENGTH
    assert manifest["target"]["hidden_size"] == 128 and manifest["dtype"] == "float32"


def test_teacher_forced_states_are_the_targets(qwen_target, tmp_path):
    """Stored hidden states are the lm_head inputs, image rows are the vision features, masks line up."""
    from transformers import AutoModelForImageTextToText

    source, folder = _records(tmp_path, 2)
    spec = _spec(qwen_target, source, folder)
    run_generate(spec, tmp_path / "out", llm=ScriptedChatLLM(qwen_target), progress=False)
    run_extract(spec, tmp_path / "out", device="cpu", progress=False)
    reader = ShardReader(shard_paths(tmp_path / "out")[0])
    sample = reader.sample(0)  # the image record
    model = AutoModelForImageTextToText.from_pretrained(str(qwen_target), dtype=torch.float32).eval()
    processor = load_processor(qwen_target)
    answer = read_answers(answers_path(tmp_path / "out", 0))[0]
    assert sample.input_ids.tolist() == answer["prompt_token_ids"] + answer["answer_token_ids"]
    assert sample.answer_mask.sum() == ANSWER_LENGTH and bool(sample.answer_mask[-ANSWER_LENGTH:].all())
    assert sample.image_mask.sum() == len(sample.image_embeds) == 16
    image_pad = processor.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    assert torch.equal(sample.image_mask, sample.input_ids == image_pad)
    from PIL import Image

    inputs = processor(text=[processor.apply_chat_template(
        [{"role": "system", "content": [{"type": "text", "text": "Be brief."}]},
         {"role": "user", "content": [{"type": "text", "text": "What is in picture 0?"}, {"type": "image"},
                                      {"type": "text", "text": spec.extra_instruction}]}],
        add_generation_prompt=True, tokenize=False)], images=[Image.open(folder / "0.png").convert("RGB")],
        return_tensors="pt")
    assert inputs["input_ids"][0].tolist() == answer["prompt_token_ids"]
    full = torch.cat([inputs["input_ids"], torch.tensor([answer["answer_token_ids"]])], dim=1)
    mm_types = torch.cat([inputs["mm_token_type_ids"], torch.zeros(1, ANSWER_LENGTH, dtype=torch.long)], dim=1)
    with torch.no_grad():
        out = model(input_ids=full, pixel_values=inputs["pixel_values"], image_grid_thw=inputs["image_grid_thw"],
                    mm_token_type_ids=mm_types, output_hidden_states=True)
    assert torch.allclose(model.lm_head(sample.hidden_states), out.logits[0], atol=1e-5)
    assert torch.allclose(sample.image_embeds, out.hidden_states[0][0][sample.image_mask], atol=1e-6)


def test_bad_records_are_skipped_counted_and_never_fatal(qwen_target, tmp_path):
    source, folder = _records(tmp_path, 4)
    records = json.loads(source.read_text())
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    records += [
        {"id": "missing", "image": "nowhere.png", "conversations": records[0]["conversations"]},
        {"id": "broken", "image": "broken.png", "conversations": records[0]["conversations"]},
        {"id": "empty", "conversations": []},
        {"id": "long", "conversations": [{"from": "human", "value": "word " * 600}]},
        ["not", "a", "record"],
    ]
    source.write_text(json.dumps(records))
    spec = _spec(qwen_target, source, folder)
    run_generate(spec, tmp_path / "out", llm=ScriptedChatLLM(qwen_target), progress=False)
    manifest = run_extract(spec, tmp_path / "out", device="cpu", progress=False)
    assert manifest["samples"] == 4
    # the long prompt fills max_len, which leaves no answer token to train on
    assert manifest["skipped"] == {"empty_conversation": 1, "image_missing": 1, "image_unreadable": 1,
                                   "invalid_record": 1, "no_answer_tokens": 1}
    assert [s["samples"] for s in manifest["shards"]] == [3, 1, 0]
    assert sum(len(ShardReader(p)) for p in shard_paths(tmp_path / "out")) == 4


def test_dataset_answers_mark_exactly_the_assistant_turns(qwen_target, tmp_path):
    """answers='dataset' (official stage 1): the conversation's own replies are the trained tokens."""
    records = [{"id": "chat", "conversations": [
        {"from": "gpt", "value": "dropped: conversations start with the user"},
        {"from": "human", "value": "Where is the cat?"}, {"from": "gpt", "value": "On the red chair."},
        {"from": "human", "value": "And the dog?"}, {"from": "gpt", "value": "Under the table."}]}]
    source = tmp_path / "sharegpt.json"
    source.write_text(json.dumps(records))
    spec = _spec(qwen_target, source, tmp_path, answers="dataset", image_folder=None, system_prompt="")
    manifest = run_extract(spec, tmp_path / "out", device="cpu", progress=False)
    assert manifest["samples"] == 1
    sample = ShardReader(shard_paths(tmp_path / "out")[0]).sample(0)
    tokenizer = load_processor(qwen_target).tokenizer
    assert tokenizer.decode(sample.input_ids[sample.answer_mask]) == (
        "On the red chair.<|im_end|>\nUnder the table.<|im_end|>\n")
    assert "Where is the cat?" in tokenizer.decode(sample.input_ids[~sample.answer_mask])


def test_processor_kwargs_reach_the_image_processor(qwen_target, tmp_path):
    from vispec_vllm.factory import make_test_image

    make_test_image(5).save(tmp_path / "big.png")  # 224x224: 64 image tokens by default
    (tmp_path / "d.json").write_text(json.dumps([{"id": "x", "image": "big.png", "conversations": [
        {"from": "human", "value": "<image>\nWhat is it?"}, {"from": "gpt", "value": "A boat."}]}]))
    spec = _spec(qwen_target, tmp_path / "d.json", tmp_path, answers="dataset",
                 processor_kwargs={"size": {"shortest_edge": 56 * 56, "longest_edge": 112 * 112}})
    manifest = run_extract(spec, tmp_path / "out", device="cpu", progress=False)
    assert manifest["image_tokens"] == 16 and manifest["spec"]["processor_kwargs"]["size"]["longest_edge"] == 12544


@pytest.mark.parametrize("family", ["qwen2_5_vl", "llava", "llava_next"])
def test_prompt_ids_match_the_chat_tokenisation_vllm_uses(family, tiny_target):
    """Rendered chats already hold their special tokens: no second BOS (vLLM's chat path adds none)."""
    from vispec_vllm.factory import make_test_image

    target = tiny_target(family)
    processor = load_processor(target)
    image = make_test_image(3)
    messages = [{"role": "user", "content": [{"type": "text", "text": "What is it?"}, {"type": "image"}]}]
    ids = encode_prompt(processor, messages, image).input_ids.tolist()
    hf_messages = [{"role": "user", "content": [{"type": "text", "text": "What is it?"},
                                                {"type": "image", "image": image}]}]
    expected = processor.apply_chat_template(hf_messages, add_generation_prompt=True, tokenize=True,
                                             return_dict=True)["input_ids"]
    assert ids == list(expected[0] if isinstance(expected[0], list) else expected)
    bos = processor.tokenizer.bos_token_id
    assert bos is None or ids.count(bos) <= 1
