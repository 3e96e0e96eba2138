"""The ViSpec proposer's decode path makes no device-to-host sync and no blocking host-to-device copy.

On CUDA either one waits for the stream and cancels vLLM's async scheduling. This machine has no GPU, so the
audit looks at what would sync there: every aten op the plugin runs inside `propose()` and
`prepare_next_token_ids_padded()` (vLLM's own inherited helpers excluded: metadata builders, sampling, slot
update) goes through a `TorchDispatchMode` that counts `_local_scalar_dense` (`.item()`, `bool(tensor)`),
`nonzero`, boolean-mask indexing, `masked_select` and `repeat_interleave` without `output_size`; and every
`Tensor.to(<device>)` call without `non_blocking=True` is counted as a blocking copy. Counted per phase:
decode steps (every row past its prompt) must have none; prefill steps may, and their counts are printed.
The run makes requests finish at different steps, so the image tables are rebuilt during decode steps too.
"""

from __future__ import annotations

from collections import Counter, defaultdict

import pytest
import torch
from conftest import vllm_engine
from torch.utils._python_dispatch import TorchDispatchMode

pytestmark = pytest.mark.vllm

aten = torch.ops.aten
SYNCING_OPS = {
    aten._local_scalar_dense.default: "item/bool",
    aten.nonzero.default: "nonzero",
    aten.masked_select.default: "masked_select",
    aten.is_nonzero.default: "item/bool",
    aten.equal.default: "equal",
}
INDEXING_OPS = (aten.index.Tensor, aten.index_put_.default, aten.index_put.default, aten._index_put_impl_.default)
VLLM_HELPERS = (
    "build_per_group_and_layer_attn_metadata",
    "_sample_draft_tokens",
    "_update_positions_dependent_metadata",
    "_determine_batch_execution_and_padding",
    "_get_slot_mapping",
    "prepare_next_token_ids_padded",
)


def sync_kind(func, args, kwargs) -> str | None:
    if func in SYNCING_OPS:
        return SYNCING_OPS[func]
    if func in INDEXING_OPS:
        indices = args[1] if len(args) > 1 else ()
        if any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in indices):
            return "boolean-mask indexing"
    if func is aten.repeat_interleave.Tensor and kwargs.get("output_size") is None:
        return "repeat_interleave without output_size"
    return None


def targets_a_device(args, kwargs) -> bool:
    """Does a `Tensor.to(...)` call name a device (directly or through another tensor)?"""
    if "device" in kwargs:
        return True
    return any(isinstance(a, torch.device | str | torch.Tensor) for a in args)


class DecodePathAudit(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.phase = "idle"
        self.inside = 0  # in an audited plugin method
        self.paused = 0  # in one of vLLM's own helpers
        self.events: dict[str, Counter] = defaultdict(Counter)
        self.calls: Counter = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if not self.paused:
            kind = sync_kind(func, args, kwargs)
            if kind is not None:
                self.events[self.phase][kind] += 1
        return func(*args, **kwargs)

    def record_copy(self) -> None:
        if self.inside and not self.paused:
            self.events[self.phase]["blocking host-to-device copy"] += 1


def phase_of(drafter) -> str:
    batch = drafter.runner.input_batch
    num_rows = batch.num_reqs
    past_prompt = batch.num_computed_tokens_cpu[:num_rows] >= batch.num_prompt_tokens[:num_rows]
    return "decode" if bool(past_prompt.all()) else "prefill"


def install_audit(drafter, audit: DecodePathAudit, monkeypatch) -> None:
    from vispec_vllm.engine.image_state import ImageStateStore
    from vispec_vllm.engine.proposer import ViSpecProposer

    def audited(method):
        def run(self, *args, **kwargs):
            audit.phase = phase_of(self)
            audit.calls[(audit.phase, method.__name__)] += 1
            audit.inside += 1
            try:
                with audit:
                    return method(self, *args, **kwargs)
            finally:
                audit.inside -= 1
        return run

    def vllm_own(method):
        def run(*args, **kwargs):
            audit.paused += 1
            try:
                return method(*args, **kwargs)
            finally:
                audit.paused -= 1
        return run

    for name in VLLM_HELPERS:
        owner = next(c for c in ViSpecProposer.__mro__[1:] if name in c.__dict__)
        monkeypatch.setattr(owner, name, vllm_own(owner.__dict__[name]))
    for name in ("propose", "prepare_next_token_ids_padded"):
        monkeypatch.setattr(ViSpecProposer, name, audited(ViSpecProposer.__dict__[name]))
    build_tables = ImageStateStore._build_tables

    def counted_build(store, *args, **kwargs):
        audit.calls[(audit.phase, "_build_tables")] += 1
        return build_tables(store, *args, **kwargs)

    monkeypatch.setattr(ImageStateStore, "_build_tables", counted_build)
    original_to = torch.Tensor.to

    def watched_to(tensor, *args, **kwargs):
        if targets_a_device(args, kwargs) and not kwargs.get("non_blocking", False):
            audit.record_copy()
        return original_to(tensor, *args, **kwargs)

    monkeypatch.setattr(torch.Tensor, "to", watched_to)


def test_decode_steps_make_no_host_sync_and_no_blocking_copy(tiny_target, trained_draft, monkeypatch):
    from parity import drafter_of
    from vllm import SamplingParams

    from vispec_vllm.factory import make_test_image
    from vispec_vllm.media import image_part

    convs = [[{"role": "user", "content": [image_part(make_test_image(1500 + i)),
                                           {"type": "text", "text": "What is in this image?"}]}] for i in range(3)]
    convs.append([{"role": "user", "content": "Tell me about the old house."}])
    params = [SamplingParams(temperature=0.0, max_tokens=12 + 8 * i, ignore_eos=True) for i in range(len(convs))]
    spec = {"method": "eagle", "model": str(trained_draft), "num_speculative_tokens": 3}
    audit = DecodePathAudit()
    with vllm_engine(model=str(tiny_target("qwen2_5_vl")), limit_mm_per_prompt={"image": 1},
                     speculative_config=spec, max_num_batched_tokens=64) as llm:
        install_audit(drafter_of(llm), audit, monkeypatch)
        llm.chat(convs, params, use_tqdm=False)
    print(f"calls by phase: {dict(audit.calls)}")
    print(f"prefill (allowed, reported): {dict(audit.events['prefill'])}")
    print(f"decode: {dict(audit.events['decode'])}")
    assert audit.calls[("decode", "propose")] >= 10
    assert audit.calls[("decode", "_build_tables")] >= 1  # requests finished while others decoded
    assert audit.calls[("prefill", "propose")] >= 2  # chunked prompts (64-token budget) ran through prefill
    assert audit.events["decode"] == Counter()


def test_the_audit_counts_what_would_sync_on_a_device():
    values, index = torch.arange(6.0), torch.tensor([0, 2])
    audit = DecodePathAudit()
    audit.phase = "decode"
    with audit:
        values[index] = 1.0  # integer indexing: no sync
        float(values.sum())
        values.nonzero()
        values[values > 2]
        torch.repeat_interleave(index, index)
        torch.repeat_interleave(index, index, output_size=2)
    assert audit.events["decode"] == Counter({"item/bool": 1, "nonzero": 1, "boolean-mask indexing": 1,
                                              "repeat_interleave without output_size": 1})
