"""Choosing a reduced draft vocabulary in stage 1: the target token ids the draft is trained to predict.

The target ids at trained answer positions of the training shards are counted (what `batches.sample_slots`
puts under the loss: answer tokens from position 2 on, within each sample's first `max_len` tokens; each is
the token the target produced there). Ids are ranked by count (ties: smaller id first) and the first N kept:
N as asked, or the smallest N reaching a share of the trained answer tokens; N is always a multiple of 64 (at
most the vocabulary). The ids that end answers come first and are always kept: the target's EOS ids and the
last answer token of every turn that more conversation follows. The subset is stored in the draft (`d2t`),
so stage 2 and the export inherit it. A coverage report is written (`REPORT_FILE` in the run directory) and
printed.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from vispec_vllm.data.manifest import shard_paths
from vispec_vllm.data.shards import ShardReader

REPORT_FILE = "draft_vocab.json"
SIZE_MULTIPLE = 64
REPORTED_SIZES = (256, 512, 1024, 2048, 4096, 8192)
FIRST_TRAINED_POSITION = 2  # slot t predicts token t+2 (batches.sample_slots)


@dataclass(frozen=True)
class AnswerTokenCounts:
    counts: torch.Tensor  # [V] int64: trained answer tokens per target id
    turn_end_ids: tuple[int, ...]  # sorted: last answer token of every turn that more conversation follows

    @property
    def total(self) -> int:
        return int(self.counts.sum())


def count_answer_tokens(data_dirs: list[Path], vocab_size: int, max_len: int | None = None) -> AnswerTokenCounts:
    """Count the target ids at trained answer positions of every sample in `data_dirs`."""
    counts = torch.zeros(vocab_size, dtype=torch.int64)
    turn_ends: set[int] = set()
    paths = [p for d in data_dirs for p in shard_paths(Path(d))]
    if not paths:
        raise FileNotFoundError(f"no shard_*.safetensors in {[str(d) for d in data_dirs]}")
    for path in paths:
        for input_ids, answer_mask in ShardReader(path).token_rows():
            if len(input_ids) and int(input_ids.max()) >= vocab_size:
                raise ValueError(f"{path}: token id {int(input_ids.max())} is outside the target vocabulary "
                                 f"({vocab_size}); the data was made with another target")
            turn_ends.update(input_ids[:-1][answer_mask[:-1] & ~answer_mask[1:]].tolist())
            trained = answer_mask[:max_len].clone()
            trained[:FIRST_TRAINED_POSITION] = False
            counts += torch.bincount(input_ids[:max_len][trained], minlength=vocab_size)
    return AnswerTokenCounts(counts, tuple(sorted(turn_ends)))


@dataclass(frozen=True)
class DraftVocabChoice:
    d2t: torch.Tensor  # [N] int64, strictly increasing target ids
    report: dict  # what `REPORT_FILE` holds

    def summary_lines(self) -> list[str]:
        r = self.report
        lines = [f"draft vocabulary: {r['answer_tokens']:,} trained answer tokens, {r['distinct_ids']:,} distinct "
                 f"target ids (of {r['vocab_size']:,})"]
        lines += [f"  N={row['size']:>6,}: {100 * row['coverage']:.2f}% of answer tokens" for row in r["table"]]
        chosen, requested = r["chosen"], r["requested"]
        asked = (f"--draft-vocab-size {requested['size']}" if requested["size"] is not None
                 else f"--draft-vocab-coverage {requested['coverage']}")
        lines.append(f"  chosen N={chosen['size']:,} ({asked}): {100 * chosen['coverage']:.2f}% of answer tokens, "
                     f"{len(r['required_ids'])} answer-ending ids always kept")
        return lines

    def write_report(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.report, indent=1) + "\n")


def round_size(size: int, vocab_size: int) -> int:
    """Up to a multiple of SIZE_MULTIPLE, at most the vocabulary."""
    return min(vocab_size, -(-size // SIZE_MULTIPLE) * SIZE_MULTIPLE)


def ranked_ids(counts: torch.Tensor, required: list[int]) -> torch.Tensor:
    """[V] every target id: `required` first (by id), then by count, most frequent first (ties: smaller id)."""
    by_count = torch.sort(-counts, stable=True).indices  # stable over ascending ids: ties by id
    is_required = torch.zeros(len(counts), dtype=torch.bool)
    required_ids = torch.tensor(sorted(set(required)), dtype=torch.int64)
    is_required[required_ids] = True
    return torch.cat([required_ids, by_count[~is_required[by_count]]])


def choose_draft_vocab(answers: AnswerTokenCounts, *, size: int | None = None, coverage: float | None = None,
                       required: list[int] | None = None) -> DraftVocabChoice:
    """The draft vocabulary: `size` ids (rounded up), or the fewest reaching `coverage`; exactly one of them."""
    if (size is None) == (coverage is None):
        raise ValueError("give exactly one of size and coverage")
    counts, total = answers.counts, answers.total
    vocab_size = len(counts)
    if total == 0:
        raise ValueError("the training data has no trained answer tokens to choose a draft vocabulary from")
    required = sorted(set(required or ()) | set(answers.turn_end_ids))
    order = ranked_ids(counts, required)
    covered = counts[order].cumsum(0).double() / total  # [V]: share of answer tokens in the first n+1 ids
    if size is not None:
        if size < 1:
            raise ValueError(f"draft vocabulary size must be >= 1, got {size}")
        chosen = round_size(size, vocab_size)
    else:
        if not 0 < coverage <= 1:
            raise ValueError(f"draft vocabulary coverage must be in (0, 1], got {coverage}")
        needed = int(torch.searchsorted(covered, torch.tensor([coverage], dtype=torch.float64))[0]) + 1
        chosen = round_size(min(needed, vocab_size), vocab_size)
    if chosen < len(required):
        raise ValueError(f"a draft vocabulary of {chosen} ids cannot hold the {len(required)} answer-ending ids")
    sizes = sorted({n for n in REPORTED_SIZES if n < vocab_size} | {chosen})
    report = {
        "answer_tokens": total,
        "distinct_ids": int((counts > 0).sum()),
        "vocab_size": vocab_size,
        "requested": {"size": size, "coverage": coverage},
        "chosen": {"size": chosen, "coverage": float(covered[chosen - 1])},
        "required_ids": required,
        "table": [{"size": n, "coverage": float(covered[n - 1])} for n in sizes],
    }
    return DraftVocabChoice(order[:chosen].sort().values, report)


def eos_token_ids(target_dir: Path, config_eos: int) -> list[int]:
    """The target's EOS ids: its config's (`config_eos`), and generation_config.json's when it has some."""
    ids = {config_eos}
    generation = Path(target_dir) / "generation_config.json"
    if generation.is_file():
        eos = json.loads(generation.read_text()).get("eos_token_id")
        ids.update([] if eos is None else [eos] if isinstance(eos, int) else eos)
    return sorted(ids)


def choose_for_training(target_dir: Path, data_dirs: list[Path], max_len: int | None, *, size: int | None,
                        coverage: float | None) -> DraftVocabChoice:
    """Count the training data of a stage-1 run and choose its draft vocabulary (the same on every rank)."""
    from vispec_vllm.factory import target_info

    info = target_info(target_dir)
    answers = count_answer_tokens(data_dirs, info.vocab_size, max_len)
    required = eos_token_ids(target_dir, info.eos_token_id)
    choice = choose_draft_vocab(answers, size=size, coverage=coverage, required=required)
    choice.report["data"] = [str(d) for d in data_dirs]
    return choice
