"""Stage A: the target's own greedy answers, generated with vLLM (`LLM.chat`, batched).

Output: one JSONL file per shard under <out>/answers/, one line per source record of that shard, either
`{"status": "ok", "prompt_token_ids", "answer_token_ids", ...}` or `{"status": "skipped", "reason"}`.
Each file is written to a temporary name and renamed, so a rerun skips finished shards and redoes the rest.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from vispec_vllm.data.conversation import PromptStyle, generation_messages, with_pil_image
from vispec_vllm.data.encoding import encode_prompt
from vispec_vllm.data.manifest import DatasetSpec, answers_path
from vispec_vllm.data.records import RecordSkipped, SkipReason, SourceRecord, iter_records, load_source, open_image


def prompt_style(spec: DatasetSpec) -> PromptStyle:
    return PromptStyle(system_prompt=spec.system_prompt, extra_instruction=spec.extra_instruction)


def load_slice(spec: DatasetSpec) -> list:
    return load_source(Path(spec.source), start=spec.start, end=spec.end, shuffle_seed=spec.shuffle_seed)


def shard_chunks(items: list, shard_size: int) -> list[list]:
    return [items[i : i + shard_size] for i in range(0, len(items), shard_size)]


def skipped_line(index: int, sample_id: str | None, reason: SkipReason) -> dict:
    return {"index": index, "id": sample_id, "status": "skipped", "reason": reason.value}


@dataclass
class _Request:
    record: SourceRecord
    prompt_ids: list[int]
    chat_messages: list[dict]


def _prepare(chunk: list, spec: DatasetSpec, processor, max_prompt_len: int | None) -> tuple[dict, list[_Request]]:
    """Skip lines for unusable records, and the chat requests for the others."""
    lines: dict[int, dict] = {}
    requests = []
    image_folder = Path(spec.image_folder) if spec.image_folder else None
    for index, record, reason in iter_records(chunk, image_folder):
        if record is None:
            lines[index] = skipped_line(index, None, reason)
            continue
        try:
            image = open_image(record.image_path) if record.image_path else None
            messages = generation_messages(record, prompt_style(spec))
            prompt_ids = encode_prompt(processor, messages, image).input_ids
            if max_prompt_len is not None and len(prompt_ids) > max_prompt_len:
                raise RecordSkipped(SkipReason.PROMPT_TOO_LONG, f"{len(prompt_ids)} prompt tokens")
        except RecordSkipped as skipped:
            lines[index] = skipped_line(index, record.sample_id, skipped.reason)
            continue
        requests.append(_Request(record, prompt_ids.tolist(), with_pil_image(messages, image)))
    return lines, requests


def _answer_line(request: _Request, output) -> dict:
    record = request.record
    if list(output.prompt_token_ids) != request.prompt_ids:
        # vLLM rendered/tokenised the chat differently from the HF processor: the teacher-forced pass
        # would not see what the target saw, so the record is dropped (and counted).
        return skipped_line(record.index, record.sample_id, SkipReason.PROMPT_MISMATCH)
    completion = output.outputs[0]
    return {
        "index": record.index,
        "id": record.sample_id,
        "status": "ok",
        "image": str(record.image_path) if record.image_path else None,
        "prompt_token_ids": request.prompt_ids,
        "answer_token_ids": list(completion.token_ids),
        "finish_reason": completion.finish_reason,
    }


def write_jsonl_atomic(path: Path, lines: Iterable[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for line in lines:
            f.write(json.dumps(line) + "\n")
    os.replace(tmp, path)


def read_answers(path: Path) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def greedy_sampling_params(max_new_tokens: int):
    from vllm import SamplingParams

    return SamplingParams(temperature=0.0, max_tokens=max_new_tokens)


def engine_max_model_len(llm) -> int | None:
    try:
        return int(llm.llm_engine.model_config.max_model_len)
    except AttributeError:
        return None


def generate_answers(
    llm,
    spec: DatasetSpec,
    out_dir: Path,
    processor,
    *,
    records_per_call: int = 512,
    sampling_params=None,
    progress: bool = True,
    after_shard: Callable[[int], None] | None = None,
) -> int:
    """Generate the answers of every unfinished shard; returns the number of shards written now.

    `llm` is a vLLM `LLM` (anything with the same `chat` method works); several shards are sent per
    `chat` call (at least `records_per_call` records) so that vLLM batches well.
    """
    chunks = shard_chunks(load_slice(spec), spec.shard_size)
    todo = [k for k in range(len(chunks)) if not answers_path(out_dir, k).exists()]
    params = sampling_params if sampling_params is not None else greedy_sampling_params(spec.max_new_tokens)
    max_len = engine_max_model_len(llm)
    max_prompt_len = None if max_len is None else max_len - 1
    total = sum(len(c) for c in chunks)
    done = total - sum(len(chunks[k]) for k in todo)
    bar = tqdm(total=total, initial=done, desc="generate answers", unit="rec", disable=not progress)
    written = 0
    while todo:
        group = []
        while todo and sum(len(chunks[k]) for k in group) < records_per_call:
            group.append(todo.pop(0))
        prepared = {k: _prepare(chunks[k], spec, processor, max_prompt_len) for k in group}
        requests = [r for k in group for r in prepared[k][1]]
        outputs = llm.chat([r.chat_messages for r in requests], params, use_tqdm=False) if requests else []
        answered = {r.record.index: _answer_line(r, o) for r, o in zip(requests, outputs, strict=True)}
        for k in group:
            lines = {**prepared[k][0], **answered}
            write_jsonl_atomic(answers_path(out_dir, k), [lines[index] for index, _ in chunks[k]])
            bar.update(len(chunks[k]))
            written += 1
            if after_shard is not None:
                after_shard(k)
    bar.close()
    return written
