"""One-command check of ViSpec's attention pieces on a GPU: torch only, never imports vLLM.

Writes one JSON file (and prints a short summary) with three sections:

* masking: `FlaggedHeads` (kernels/dropped_keys.py) hides dropped image keys inside torch's fused SDPA kernels
  (flash, memory-efficient; causal, no mask) for bf16 and fp16, head sizes 64/80/128 padded the way
  FlashAttention (+8) and FlashInfer (next power of two) take them, with the KV in the compute dtype and
  round-tripped through float8_e4m3fn (an fp8 KV cache at scale 1). Each kernel's output at visible queries
  is compared with float64 attention over the visible keys only, next to the same kernel's own error on the
  unpadded, visible-only inputs; the weights of dropped keys (explicit softmax over the flagged heads, in
  float32 and in the compute dtype) must be exactly 0. A kernel that refuses a case is "unsupported".
* draft: the reference `ViSpecDraft` (vispec_vllm/draft) in bf16 on the device against float64 on the CPU,
  same random weights and inputs with images.
* timing: flagged (padded) heads against plain heads through the fused kernels, at decode and prefill shapes
  (CUDA events, warmup, median).

    scripts/gpu_check.sh [OUT_FILE]
    python scripts/gpu_check.py --out OUT_FILE [--device cpu] [--quick]

`--device cpu --quick` runs every section on small shapes in well under a minute (CI tests the script so).
"""

from __future__ import annotations

import argparse
import copy
import importlib
import importlib.util
import json
import platform
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

ROOT = Path(__file__).resolve().parent.parent
KERNELS = {"flash": SDPBackend.FLASH_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION}
PADDINGS: dict[str, Callable[[int], bool]] = {
    "flash_attn": lambda size: True,  # FlashAttention takes any multiple of 8: head + 8
    "flashinfer": lambda size: size & (size - 1) == 0,  # the next power of two
}
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
# a kernel's error on flagged heads may be twice its own error on plain heads, or this, whichever is larger
ERROR_FLOOR = {"bf16": 1e-2, "fp16": 2e-3}
DRAFT_TOLERANCE = 3e-2  # bf16 draft: max |error| / max |float64 output|


@dataclass(frozen=True)
class Sizes:
    """Shapes of one run (full or --quick)."""

    batch: int
    heads: int
    length: int  # masking check: prefill length (keys = queries)
    draft_hidden: int
    draft_heads: int
    draft_length: int
    decode_batch: int
    decode_kv_lengths: tuple[int, ...]
    prefill_length: int
    timing_heads: int
    timing_head_dims: tuple[int, ...]
    warmup: int
    iterations: int


FULL = Sizes(batch=2, heads=4, length=512, draft_hidden=1024, draft_heads=8, draft_length=192, decode_batch=16,
             decode_kv_lengths=(1024, 4096), prefill_length=2048, timing_heads=32, timing_head_dims=(64, 128),
             warmup=5, iterations=25)
QUICK = Sizes(batch=1, heads=2, length=64, draft_hidden=128, draft_heads=2, draft_length=40, decode_batch=2,
              decode_kv_lengths=(256,), prefill_length=128, timing_heads=2, timing_head_dims=(64,), warmup=1,
              iterations=3)


def load_repo_modules() -> tuple[ModuleType, ModuleType]:
    """kernels/dropped_keys.py by path (installed or not) and the pure-PyTorch draft package from this checkout."""
    spec = importlib.util.spec_from_file_location("vispec_gpu_check_dropped_keys", ROOT / "kernels" / "dropped_keys.py")
    assert spec is not None and spec.loader is not None
    dropped_keys = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = dropped_keys  # dataclasses look their module up while the class is built
    spec.loader.exec_module(dropped_keys)
    sys.path.insert(0, str(ROOT))
    return dropped_keys, importlib.import_module("vispec_vllm.draft")


def dropped_positions(length: int, device: torch.device) -> torch.Tensor:
    """[L] bool: one image's dropped slots at the very start (queries there see no visible key) and one later."""
    dropped = torch.zeros(length, dtype=torch.bool, device=device)
    dropped[: length // 8] = True
    dropped[length // 3 : length // 2] = True
    return dropped


# --------------------------------------------------------------------------------------------------- masking


def flagged(flags: Any, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dropped: torch.Tensor):
    """Real q, k, v [B, H, L, head_dim] -> q', k', v' [B, H, L, padded_dim] (flags set, dropped keys hidden)."""
    batch, heads, length, _ = q.shape
    pad = (0, flags.padded_dim - flags.head_dim)
    query_flag = flags.query_bias(q.new_zeros(heads * flags.head_dim), heads).view(1, heads, 1, flags.padded_dim)
    wide_k = F.pad(k, pad).permute(2, 0, 1, 3).reshape(length, batch * heads, flags.padded_dim)  # [L, B*H, P]
    hidden_k = flags.hide(wide_k, dropped).reshape(length, batch, heads, flags.padded_dim).permute(1, 2, 0, 3)
    return F.pad(q, pad) + query_flag, hidden_k.contiguous(), F.pad(v, pad)


def fused(kernel: SDPBackend, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor | str:
    """Causal SDPA through one fused kernel, or "unsupported" where the kernel refuses the inputs."""
    try:
        with warnings.catch_warnings(), sdpa_kernel(kernel):
            warnings.simplefilter("ignore")  # a refusing kernel warns why, then raises
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)
    except RuntimeError:
        return "unsupported"


def dropped_weight_max(q: torch.Tensor, k: torch.Tensor, dropped: torch.Tensor, rows: torch.Tensor,
                       scale: float) -> float:
    """Largest softmax weight on a dropped key at the `rows` queries, softmax computed in q's dtype."""
    length = q.shape[-2]
    causal = torch.ones(length, length, dtype=torch.bool, device=q.device).tril()
    logits = (q @ k.transpose(-1, -2)) * scale
    weights = torch.softmax(logits.masked_fill(~causal, -torch.inf), dim=-1)
    return weights[..., rows, :][..., dropped].max().item()


def visible_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, visible: torch.Tensor,
                      scale: float) -> torch.Tensor:
    """float64 causal attention of the visible queries over the visible keys only: [B, H, L_visible, head_dim]."""
    q, k, v = (t[..., visible, :].double() for t in (q, k, v))
    return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)


def max_error(out: torch.Tensor, reference: torch.Tensor) -> float:
    return (out.double() - reference).abs().max().item()


def kernel_result(kernel: SDPBackend, wide: tuple[torch.Tensor, ...], real: tuple[torch.Tensor, ...],
                  visible: torch.Tensor, reference: torch.Tensor, dtype_name: str, head_dim: int,
                  scale: float) -> dict[str, Any]:
    """One fused kernel on the flagged heads, next to its own error on the plain visible-only heads."""
    out = fused(kernel, *wide, scale)
    if isinstance(out, str):
        return {"status": out}
    own = fused(kernel, *(t[..., visible, :] for t in real), scale)
    own_error = None if isinstance(own, str) else max_error(own, reference)
    error = max_error(out[..., visible, :head_dim], reference)
    tolerance = max(ERROR_FLOOR[dtype_name], 2 * (own_error or 0.0))
    finite = bool(out.isfinite().all())
    return {"status": "ok", "max_abs_diff": error, "plain_heads_max_abs_diff": own_error, "tolerance": tolerance,
            "finite": finite, "passed": finite and error <= tolerance}


def masking_case(flags: Any, dtype_name: str, kv_cache: str, sizes: Sizes, device: torch.device) -> dict[str, Any]:
    """One dtype, head size, padding and KV format through every fused kernel (see the module docstring)."""
    dtype = DTYPES[dtype_name]
    generator = torch.Generator().manual_seed(flags.padded_dim)
    shape = (sizes.batch, sizes.heads, sizes.length, flags.head_dim)
    q, k, v = (torch.randn(shape, generator=generator).mul(1.5).to(device, dtype) for _ in range(3))
    dropped = dropped_positions(sizes.length, device)
    wide = flagged(flags, q, k, v, dropped)
    if kv_cache == "fp8_e4m3":  # stored at scale 1 and read back, as vLLM's default k_scale does
        wide = (wide[0], *(t.to(torch.float8_e4m3fn).to(dtype) for t in wide[1:]))
    real = (q, wide[1][..., : flags.head_dim], wide[2][..., : flags.head_dim])  # the keys the kernel really reads
    visible = ~dropped
    rows = visible.cumsum(0) > 0  # queries that see a visible key
    reference = visible_reference(*real, visible, flags.scale)
    weights = {name: dropped_weight_max(wide[0].to(cast), wide[1].to(cast), dropped, rows, flags.scale)
               for name, cast in (("float32", torch.float32), (dtype_name, dtype))}
    kernels = {name: kernel_result(kernel, wide, real, visible, reference, dtype_name, flags.head_dim, flags.scale)
               for name, kernel in KERNELS.items()}
    return {"dtype": dtype_name, "kv_cache": kv_cache, "head_dim": flags.head_dim, "padded_dim": flags.padded_dim,
            "dropped_logit": flags.dropped_logit, "dropped_weight_max": weights,
            "dropped_weights_exactly_zero": all(value == 0.0 for value in weights.values()), "kernels": kernels}


def check_masking(dropped_keys: ModuleType, sizes: Sizes, device: torch.device) -> list[dict[str, Any]]:
    cases = []
    for dtype_name in DTYPES:
        for head_dim in (64, 80, 128):
            for padding, accepts in PADDINGS.items():
                flags = dropped_keys.FlaggedHeads.for_backend(head_dim, head_dim**-0.5, accepts)
                for kv_cache in ("auto", "fp8_e4m3"):
                    cases.append({"padding": padding, **masking_case(flags, dtype_name, kv_cache, sizes, device)})
    return cases


# ----------------------------------------------------------------------------------------------------- draft


def randomize(model: torch.nn.Module, seed: int) -> None:
    """Seeded weights of a trained layer's scale: matrices N(0, 1/fan_in), norm weights near 1, vectors small."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in sorted(model.named_parameters()):
            values = torch.randn(param.shape, generator=generator)
            if "norm" in name:
                values = 1.0 + 0.1 * values
            elif param.dim() >= 2:
                values /= param.shape[-1] ** 0.5
            else:
                values *= 0.02
            param.copy_(values)


def draft_inputs(sizes: Sizes) -> dict[str, torch.Tensor]:
    """Two rows with three images between text, the second row right-padded, float64 on the CPU."""
    generator = torch.Generator().manual_seed(1)
    length, hidden = sizes.draft_length, sizes.draft_hidden
    image_mask = torch.zeros(2, length, dtype=torch.bool)
    image_mask[0, 2 : length // 3] = True
    image_mask[0, length // 2 : 3 * length // 4] = True
    image_mask[1, length // 4 : length // 2] = True
    attention_mask = torch.ones(2, length, dtype=torch.bool)
    attention_mask[1, 7 * length // 8 :] = False
    return {"hidden_states": torch.randn(2, length, hidden, generator=generator, dtype=torch.float64),
            "inputs_embeds": torch.randn(2, length, hidden, generator=generator, dtype=torch.float64),
            "image_mask": image_mask, "attention_mask": attention_mask}


def check_draft(draft_package: ModuleType, sizes: Sizes, device: torch.device) -> dict[str, Any]:
    config = draft_package.ViSpecConfig(
        hidden_size=sizes.draft_hidden, intermediate_size=sizes.draft_hidden * 11 // 4,
        num_attention_heads=sizes.draft_heads, num_key_value_heads=sizes.draft_heads, vocab_size=64,
        max_position_embeddings=4096, rms_norm_eps=1e-6, rope_theta=10000.0, qkv_bias=True)
    model = draft_package.ViSpecDraft(config, num_q=3)
    randomize(model, seed=0)
    inputs = draft_inputs(sizes)
    with torch.no_grad():
        expected = model.double().eval()(**inputs)
        low = copy.deepcopy(model).to(device, torch.bfloat16)
        out = low(**{name: t.to(device, torch.bfloat16) if t.is_floating_point() else t.to(device)
                     for name, t in inputs.items()})
    errors = {}
    for field in ("hidden_states", "global_feature"):
        reference = getattr(expected, field)
        error = max_error(getattr(out, field).cpu(), reference)
        errors[field] = {"max_abs_error": error, "max_relative_error": error / reference.abs().max().item()}
    worst = max(value["max_relative_error"] for value in errors.values())
    return {"config": {"hidden_size": config.hidden_size, "head_dim": config.head_dim, "num_q": 3,
                       "length": sizes.draft_length, "batch": 2},
            "errors": errors, "tolerance": DRAFT_TOLERANCE, "passed": worst <= DRAFT_TOLERANCE}


# ---------------------------------------------------------------------------------------------------- timing


def median_ms(run: Callable[[], torch.Tensor | str], device: torch.device, sizes: Sizes) -> float:
    """Median wall time of `run` in milliseconds (CUDA events on a GPU) after `sizes.warmup` calls."""
    for _ in range(sizes.warmup):
        run()
    times = []
    for _ in range(sizes.iterations):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            run()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            began = time.perf_counter()
            run()
            times.append((time.perf_counter() - began) * 1e3)
    return statistics.median(times)


def attention_timer(kernel: SDPBackend, batch: int, heads: int, q_len: int, kv_len: int, dim: int,
                    device: torch.device) -> Callable[[], torch.Tensor | str]:
    """Prefill (q_len == kv_len) is causal; decode queries (a few draft tokens) read the whole KV."""
    q = torch.randn(batch, heads, q_len, dim, device=device, dtype=torch.bfloat16)
    k, v = (torch.randn(batch, heads, kv_len, dim, device=device, dtype=torch.bfloat16) for _ in range(2))

    def run() -> torch.Tensor | str:
        try:
            with warnings.catch_warnings(), sdpa_kernel(kernel):
                warnings.simplefilter("ignore")
                return F.scaled_dot_product_attention(q, k, v, is_causal=q_len == kv_len, scale=dim**-0.5)
        except RuntimeError:
            return "unsupported"

    return run


def timing_shapes(sizes: Sizes) -> list[tuple[str, int, int, int]]:
    """(phase, batch, q_len, kv_len)."""
    decode = [("decode", sizes.decode_batch, q_len, kv_len) for q_len in (1, 4) for kv_len in sizes.decode_kv_lengths]
    return [*decode, ("prefill", 1, sizes.prefill_length, sizes.prefill_length)]


def check_timing(dropped_keys: ModuleType, sizes: Sizes, device: torch.device) -> list[dict[str, Any]]:
    rows = []
    for kernel_name, kernel in KERNELS.items():
        for phase, batch, q_len, kv_len in timing_shapes(sizes):
            for head_dim in sizes.timing_head_dims:
                dims = {"plain": head_dim} | {
                    padding: dropped_keys.FlaggedHeads.for_backend(head_dim, 1.0, accepts).padded_dim
                    for padding, accepts in PADDINGS.items()}
                row: dict[str, Any] = {"kernel": kernel_name, "phase": phase, "batch": batch,
                                       "heads": sizes.timing_heads, "q_len": q_len, "kv_len": kv_len,
                                       "head_dim": head_dim}
                for label, dim in dims.items():
                    run = attention_timer(kernel, batch, sizes.timing_heads, q_len, kv_len, dim, device)
                    row[label] = ({"status": "unsupported"} if isinstance(run(), str) else
                                  {"head_size": dim, "median_ms": median_ms(run, device, sizes)})
                rows.append(row)
    return rows


# ------------------------------------------------------------------------------------------------------ main


def correctness_passed(results: dict[str, Any]) -> bool:
    """Every correctness check that ran passed (unsupported kernels are not failures)."""
    masking_ok = all(case["dropped_weights_exactly_zero"] and all(
        kernel.get("passed", True) for kernel in case["kernels"].values()) for case in results["masking"])
    return masking_ok and results["draft"]["passed"]


def summary_lines(results: dict[str, Any]) -> list[str]:
    masking = results["masking"]
    ran = [kernel for case in masking for kernel in case["kernels"].values() if kernel["status"] == "ok"]
    lines = [
        f"masking: {len(masking)} cases, dropped weights exactly 0 in "
        f"{sum(case['dropped_weights_exactly_zero'] for case in masking)}; fused kernel runs {len(ran)} "
        f"({sum(kernel['passed'] for kernel in ran)} passed), worst max|diff| "
        f"{max((kernel['max_abs_diff'] for kernel in ran), default=float('nan')):.3g}",
        f"draft bf16 vs float64: max relative error "
        f"{results['draft']['errors']['hidden_states']['max_relative_error']:.3g} "
        f"(tolerance {DRAFT_TOLERANCE}) -> {'pass' if results['draft']['passed'] else 'FAIL'}",
    ]
    for row in results["timing"]:
        times = " ".join(f"{label}={row[label]['median_ms']:.3f}ms" if "median_ms" in row[label] else f"{label}=n/a"
                         for label in ("plain", *PADDINGS))
        lines.append(f"timing {row['kernel']} {row['phase']} b{row['batch']} q{row['q_len']} kv{row['kv_len']} "
                     f"d{row['head_dim']}: {times}")
    lines.append(f"ALL CORRECTNESS CHECKS {'PASSED' if results['passed'] else 'FAILED'} "
                 f"({results['meta']['seconds']:.1f} s)")
    return lines


def device_meta(device: torch.device, quick: bool) -> dict[str, Any]:
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    return {"device": str(device), "device_name": name, "torch": torch.__version__, "cuda": torch.version.cuda,
            "quick": quick, "python": platform.python_version()}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("gpu_check_results.json"), help="the JSON file to write")
    parser.add_argument("--device", default="cuda", help="torch device (default cuda)")
    parser.add_argument("--quick", action="store_true", help="small shapes and few timing iterations")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device)
    sizes = QUICK if args.quick else FULL
    started = time.perf_counter()
    dropped_keys, draft_package = load_repo_modules()
    results: dict[str, Any] = {
        "meta": device_meta(device, args.quick),
        "masking": check_masking(dropped_keys, sizes, device),
        "draft": check_draft(draft_package, sizes, device),
        "timing": check_timing(dropped_keys, sizes, device),
    }
    results["passed"] = correctness_passed(results)
    results["meta"]["seconds"] = time.perf_counter() - started
    args.out.write_text(json.dumps(results, indent=1) + "\n")
    print("\n".join(summary_lines(results)))
    print(f"results: {args.out}")
    return 0 if results["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
