"""Correct stand-ins for vLLM 0.32's broken CPU sampling fallbacks, and probes that find the broken ones.

`patches.py` installs these (the plugin changes vLLM only there); each probe runs the vLLM function on a tiny
input, so a vLLM that fixes the bug is left alone.
"""

from __future__ import annotations

from collections.abc import Callable

import torch


def expand_per_request(
    output: torch.Tensor,  # [num_tokens], any dtype; written in place
    values: torch.Tensor,  # [batch_size]
    cu_num_tokens: torch.Tensor,  # [batch_size], cumulative token count up to and including each request
    replace_from: float,
    replace_to: float,
    max_num_tokens: int | None = None,
) -> None:
    """The contract of vLLM's rejection-sampler `expand_kernel`, in the output's own dtype.

    Request r owns output[cu[r-1] : cu[r]] (request 0 from 0); its first min(count, max_num_tokens) slots get
    values[r], or replace_to where values[r] == replace_from. Slots no request owns are left as they are.
    """
    ends = cu_num_tokens.to(torch.long)
    starts = torch.cat([ends.new_zeros(1), ends])[:-1]
    counts = (ends - starts).clamp(min=0, max=max_num_tokens)
    filled = values.masked_fill(values == replace_from, replace_to)
    # slot i of request r is output[starts[r] + i]
    first_slot = torch.cumsum(counts, 0) - counts
    within = torch.arange(int(counts.sum()), device=counts.device) - first_slot.repeat_interleave(counts)
    output[starts.repeat_interleave(counts) + within] = filled.repeat_interleave(counts).to(output.dtype)


def expand_writes_float_output(expand: Callable) -> bool:
    """Whether an `expand_kernel` implementation fills a float32 output (vLLM 0.32's CPU one does not)."""
    output = torch.zeros(3)
    try:
        expand(output, torch.tensor([0.0, 2.5]), torch.tensor([1, 3], dtype=torch.int32), 0, 1)
    except (RuntimeError, AttributeError):  # AttributeError: vLLM's C++ op not loaded
        return False
    return torch.equal(output, torch.tensor([1.0, 2.5, 2.5]))


def top_k_accepts_empty_batch(apply_top_k: Callable) -> bool:
    """Whether a top-k mask function takes a batch of no rows (vLLM 0.32's CPU `apply_top_k_only` raises)."""
    try:
        apply_top_k(torch.zeros(0, 4), torch.zeros(0, dtype=torch.int32))
    except RuntimeError:
        return False
    return True


def cpu_generators_have_offsets() -> bool:
    """Whether a CPU torch.Generator supports get_offset (vLLM rewinds per-request generators with it)."""
    try:
        torch.Generator(device="cpu").get_offset()
    except RuntimeError:
        return False
    return True
