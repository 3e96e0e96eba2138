"""What a data directory holds: the spec that defines its shards, and a manifest summarising the shard files.

The spec is fixed at the first run; later runs (resume, `extract` after `generate`) must pass the same one.
The manifest is always recomputed from the shard files, which are the ground truth.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from vispec_vllm.data.shards import ShardReader, shard_name

SPEC_FILE = "spec.json"
MANIFEST_FILE = "manifest.json"
ANSWERS_DIR = "answers"


@dataclass(frozen=True)
class DatasetSpec:
    target: str  # target model directory
    source: str  # source JSON file
    image_folder: str | None
    start: int
    end: int | None
    shuffle_seed: int | None
    shard_size: int  # source records per shard
    answers: str  # "generate" (target's greedy answers from vLLM) | "dataset" (the source's own answers)
    system_prompt: str
    extra_instruction: str
    max_new_tokens: int
    max_len: int | None  # tokens kept per sample
    dtype: str  # dtype of the stored hidden states / embeddings
    # image processor overrides for both engines, e.g. Qwen's official {"min_pixels": 200704, "max_pixels": 1003520}
    processor_kwargs: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> DatasetSpec:
        return cls(**{f.name: data[f.name] for f in fields(cls) if f.name in data})


def write_json_atomic(path: Path, data: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)


def claim_spec(out_dir: Path, spec: DatasetSpec) -> None:
    """Record the spec of a new directory, or check that a resumed one was made with the same spec."""
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / SPEC_FILE
    if path.exists():
        existing = json.loads(path.read_text())
        if existing != spec.to_json():
            changed = sorted(k for k in spec.to_json() if existing.get(k) != spec.to_json()[k])
            raise ValueError(
                f"{out_dir} was made with different settings ({', '.join(changed)}); "
                "use the same arguments to resume or choose a new --out"
            )
        return
    write_json_atomic(path, spec.to_json())


def load_spec(out_dir: Path) -> DatasetSpec:
    return DatasetSpec.from_json(json.loads((out_dir / SPEC_FILE).read_text()))


def answers_path(out_dir: Path, shard: int) -> Path:
    return out_dir / ANSWERS_DIR / shard_name(shard).replace(".safetensors", ".jsonl")


def shard_paths(out_dir: Path) -> list[Path]:
    return sorted(out_dir.glob("shard_*.safetensors"))


def write_manifest(out_dir: Path, spec: DatasetSpec, num_records: int, target_summary: dict) -> dict:
    """Summarise the finished shards (counts, skipped records by reason) into manifest.json."""
    num_shards = -(-num_records // spec.shard_size)
    skipped: Counter[str] = Counter()
    per_shard = []
    samples = tokens = answer_tokens = image_tokens = 0
    for path in shard_paths(out_dir):
        reader = ShardReader(path)
        skipped.update(reader.skipped)
        file_tokens = reader.token_offsets[-1]
        file_answer = reader.answer_token_count()
        file_image = reader.image_offsets[-1]
        per_shard.append({"file": path.name, "samples": len(reader), "tokens": file_tokens,
                          "skipped": sum(reader.skipped.values())})
        samples += len(reader)
        tokens += file_tokens
        answer_tokens += file_answer
        image_tokens += file_image
    manifest = {
        "format": "vispec-data-v1",
        "spec": spec.to_json(),
        "target": target_summary,
        "dtype": spec.dtype,
        "source_file": spec.source,
        "start": spec.start,
        "end": spec.end,
        "records": num_records,
        "num_shards": num_shards,
        "complete_shards": len(per_shard),
        "complete": len(per_shard) == num_shards,
        "samples": samples,
        "tokens": tokens,
        "answer_tokens": answer_tokens,
        "image_tokens": image_tokens,
        "skipped": dict(sorted(skipped.items())),
        "shards": per_shard,
    }
    write_json_atomic(out_dir / MANIFEST_FILE, manifest)
    return manifest
