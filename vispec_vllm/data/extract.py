"""Stage B: one teacher-forced target pass over prompt + answer per sample (transformers), written to shards.

Recorded per token: input id, answer mask, image mask, the target's post-final-norm last hidden state (what
its lm_head reads) and, at image tokens, the merged input embedding (the projected vision features).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from tqdm import tqdm

from vispec_vllm.data.answers import load_slice, prompt_style, read_answers, shard_chunks
from vispec_vllm.data.conversation import dataset_messages, generation_messages
from vispec_vllm.data.encoding import (
    EncodedConversation,
    checked_and_truncated,
    encode_dataset_conversation,
    encode_generated,
)
from vispec_vllm.data.manifest import DatasetSpec, answers_path
from vispec_vllm.data.records import RecordSkipped, SkipReason, SourceRecord, open_image, parse_record
from vispec_vllm.data.shards import TargetSample, shard_name, write_shard


class TeacherForcedTarget:
    """The target in transformers, returning last hidden states and merged input embeddings of a sequence."""

    def __init__(self, target_dir: Path, *, dtype: torch.dtype, device: str | torch.device) -> None:
        from transformers import AutoModelForImageTextToText

        model = AutoModelForImageTextToText.from_pretrained(str(target_dir), dtype=dtype)
        self.model = model.to(device).eval()
        self.device = torch.device(device)
        self.dtype = dtype
        self.embedding = model.get_input_embeddings()
        self.hidden_size = self.embedding.weight.shape[1]

    @torch.no_grad()
    def __call__(self, encoded: EncodedConversation, image_token_id: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(hidden_states [L, H], image_embeds [M, H]) on the CPU, in the model dtype."""
        captured: dict[str, torch.Tensor] = {}

        def capture_inputs_embeds(_module, _args, kwargs):
            captured["inputs_embeds"] = kwargs["inputs_embeds"]

        inputs = {k: v.to(self.device) for k, v in encoded.model_inputs().items()}
        if "pixel_values" in inputs:
            inputs["pixel_values"] = inputs["pixel_values"].to(self.dtype)
        input_ids = inputs["input_ids"]
        decoder = self.model.model.language_model
        hook = decoder.register_forward_pre_hook(capture_inputs_embeds, with_kwargs=True)
        try:
            # The VLM body without lm_head: its last_hidden_state is the post-final-norm state.
            out = self.model.model(attention_mask=torch.ones_like(input_ids), **inputs)
        finally:
            hook.remove()
        hidden = out.last_hidden_state[0]
        merged = captured["inputs_embeds"][0]
        image_mask = encoded.input_ids.to(self.device) == image_token_id
        text_rows = self.embedding(input_ids[0][~image_mask])
        if not torch.equal(merged[~image_mask], text_rows):
            raise RuntimeError("merged input embeddings differ from the token embeddings at text tokens")
        return hidden.cpu(), merged[image_mask].cpu()


def _encoded_records(
    chunk: list, spec: DatasetSpec, processor, out_dir: Path, shard: int, image_token_id: int
) -> Iterator[tuple[SourceRecord | None, EncodedConversation | None, SkipReason | None]]:
    """(record, encoding, None) per usable record of a shard, (None/record, None, reason) for the others."""
    image_folder = Path(spec.image_folder) if spec.image_folder else None
    style = prompt_style(spec)
    answers = None
    if spec.answers == "generate":
        path = answers_path(out_dir, shard)
        if not path.exists():
            raise FileNotFoundError(f"{path} is missing: run the `generate` stage first")
        answers = {line["index"]: line for line in read_answers(path)}
    for index, raw in chunk:
        record = None
        try:
            if answers is not None and answers[index]["status"] != "ok":
                raise RecordSkipped(SkipReason(answers[index]["reason"]))
            record = parse_record(index, raw, image_folder)
            image = open_image(record.image_path) if record.image_path else None
            if answers is not None:
                line = answers[index]
                encoded = encode_generated(processor, generation_messages(record, style), image,
                                           line["answer_token_ids"])
                prompt_len = len(encoded.input_ids) - len(line["answer_token_ids"])
                if encoded.input_ids[:prompt_len].tolist() != line["prompt_token_ids"]:
                    raise RecordSkipped(SkipReason.PROMPT_MISMATCH, f"record {index}")
            else:
                encoded = encode_dataset_conversation(processor, dataset_messages(record, style), image,
                                                      image_token_id)
            yield record, checked_and_truncated(encoded, spec.max_len, image_token_id), None
        except RecordSkipped as skipped:
            yield record, None, skipped.reason


def extract_shards(
    target: TeacherForcedTarget,
    spec: DatasetSpec,
    out_dir: Path,
    processor,
    image_token_id: int,
    *,
    progress: bool = True,
    after_shard: Callable[[int], None] | None = None,
) -> int:
    """Write every missing shard; returns the number written now. Finished shards are left untouched."""
    chunks = shard_chunks(load_slice(spec), spec.shard_size)
    todo = [k for k in range(len(chunks)) if not (out_dir / shard_name(k)).exists()]
    total = sum(len(c) for c in chunks)
    done = total - sum(len(chunks[k]) for k in todo)
    bar = tqdm(total=total, initial=done, desc="extract target states", unit="rec", disable=not progress)
    dtype = getattr(torch, spec.dtype)
    for k in todo:
        samples: list[TargetSample] = []
        skipped: Counter[str] = Counter()
        for record, encoded, reason in _encoded_records(chunks[k], spec, processor, out_dir, k, image_token_id):
            bar.update(1)
            if encoded is None:
                skipped[reason.value] += 1
                continue
            hidden, image_embeds = target(encoded, image_token_id)
            samples.append(TargetSample(
                sample_id=record.sample_id,
                record_index=record.index,
                input_ids=encoded.input_ids,
                answer_mask=encoded.answer_mask,
                image_mask=encoded.input_ids == image_token_id,
                hidden_states=hidden,
                image_embeds=image_embeds,
            ))
        write_shard(out_dir / shard_name(k), samples, dict(skipped), target.hidden_size, dtype)
        if after_shard is not None:
            after_shard(k)
    bar.close()
    return len(todo)
