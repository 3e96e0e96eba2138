"""scripts/gpu_check.sh runs on the CPU (--device cpu --quick), so CI checks the GPU check script itself."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import torch

ROOT = Path(__file__).resolve().parent.parent
MASKING_CASES = {
    (dtype, head_dim, padded, kv_cache)
    for dtype in ("bf16", "fp16")
    for head_dim, padded in ((64, 72), (64, 128), (80, 88), (80, 128), (128, 136), (128, 256))
    for kv_cache in ("auto", "fp8_e4m3")
}


def load_gpu_check() -> ModuleType:
    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "scripts" / "gpu_check.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_quick_cpu_run_writes_every_section_and_passes(tmp_path):
    out = tmp_path / "results.json"
    command = [str(ROOT / "scripts" / "gpu_check.sh"), str(out), "--device", "cpu", "--quick"]
    done = subprocess.run(command, env={**os.environ, "PYTHON": sys.executable}, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "ALL CORRECTNESS CHECKS PASSED" in done.stdout
    results = json.loads(out.read_text())
    assert set(results) == {"meta", "masking", "draft", "timing", "passed"} and results["passed"]
    assert results["meta"]["device"] == "cpu" and results["meta"]["quick"]

    masking = results["masking"]
    assert {(c["dtype"], c["head_dim"], c["padded_dim"], c["kv_cache"]) for c in masking} == MASKING_CASES
    assert all(case["dropped_weights_exactly_zero"] for case in masking)
    assert all(case["kernels"]["efficient"] == {"status": "unsupported"} for case in masking)  # GPU only
    flash = [case["kernels"]["flash"] for case in masking]  # torch's CPU flash kernel
    assert all(kernel["status"] == "ok" and kernel["passed"] and kernel["finite"] for kernel in flash)

    draft = results["draft"]
    assert draft["passed"] and 0 < draft["errors"]["hidden_states"]["max_relative_error"] <= draft["tolerance"]
    flash_timing = [row for row in results["timing"] if row["kernel"] == "flash"]
    assert {row["phase"] for row in flash_timing} == {"decode", "prefill"}
    assert all(row[label]["median_ms"] > 0 for row in flash_timing for label in ("plain", "flash_attn", "flashinfer"))


def test_the_masking_check_fails_when_dropped_keys_leak():
    gpu_check = load_gpu_check()
    dropped_keys, _ = gpu_check.load_repo_modules()
    flags = dropped_keys.FlaggedHeads.for_backend(64, 64**-0.5, lambda size: True)
    object.__setattr__(flags, "key_flag", 0.05)  # past the class's own guard: dropped logits near -0.8
    case = gpu_check.masking_case(flags, "bf16", "auto", gpu_check.QUICK, torch.device("cpu"))
    assert not case["dropped_weights_exactly_zero"]
    assert case["kernels"]["flash"]["passed"] is False
