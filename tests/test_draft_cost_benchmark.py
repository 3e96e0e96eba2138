"""`benchmarks/draft_cost.py` end to end on the tiny target and its trained reduced-vocabulary draft: both variants
(the draft, and a copy without `d2t` drafting over the whole vocabulary) calibrated with --profile, alternated.
Checks the report has every variant and batch size with a positive c and target step time, and that the copy has
no reduced vocabulary. The timing values themselves are not checked."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.vllm

ROOT = Path(__file__).resolve().parent.parent


def test_draft_cost_runs_both_variants(tiny_target, trained_reduced_draft, tmp_path):
    out = tmp_path / "draft_cost"
    command = [sys.executable, str(ROOT / "benchmarks" / "draft_cost.py"), "--target", str(tiny_target("qwen2_5_vl")),
               "--draft", str(trained_reduced_draft), "--repeats", "1", "--batch-sizes", "1", "--steps", "4",
               "--out", str(out)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    rows = json.loads((out / "draft_cost.json").read_text())["rows"]
    assert sorted((r["variant"], r["batch_size"]) for r in rows) == [("full vocabulary", 1), ("reduced vocabulary", 1)]
    for row in rows:
        assert len(row["c"]) == 1 and row["c"][0] > 0 and row["target_ms_query_1"][0] > 0
    copy = json.loads((out / "full_vocabulary_draft" / "config.json").read_text())
    assert "draft_vocab_size" not in copy
    assert "draft step cost" in done.stdout
