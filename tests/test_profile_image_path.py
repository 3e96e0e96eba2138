"""vLLM's start-up memory profile includes the draft's image path.

vLLM profiles the drafter through `dummy_run` with token ids only; `ViSpecProposer.dummy_run` first runs the
adaptor over the largest image the multimodal budget allows and builds the per-token image inputs of every
profiled slot (`profile_inputs.largest_image_inputs`). Checked here: vLLM's own `profile_run` calls it, and the
peak of live tensor memory during a dummy run (tracked op by op) covers the image path's own peak, which holds
at least the image embedding and the two [T, H] per-token tensors (compressed tokens, global terms) at once:
the profiled peak is the adaptor-output cache's byte budget (held through the dummy run: the cache fills later,
outside vLLM's own tensors) plus the larger of the image path's and the forwards' peaks (at 16 tokens the image
path's, so a profile without it would be short by the difference; at 512 the forwards').
"""

from __future__ import annotations

import weakref

import pytest
import torch
from conftest import vllm_engine
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

pytestmark = pytest.mark.vllm

CACHE_BUDGET = 1 << 20  # bytes of adaptor-output cache, held through the profile


class PeakTensorMemory(TorchDispatchMode):
    """Peak bytes of the storages allocated by ops inside the mode that were alive at the same time (a storage
    counts while any tensor made inside the mode refers to it; views and in-place results of older tensors are
    not new memory)."""

    def __init__(self) -> None:
        super().__init__()
        self.live: dict[int, list[int]] = {}  # storage pointer -> [bytes, tensors referring to it]
        self.current = self.peak = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        tensors = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
        inputs = {t.untyped_storage().data_ptr() for t in tensors}
        for tensor in tree_flatten(out)[0]:
            if isinstance(tensor, torch.Tensor):
                self._track(tensor, inputs)
        return out

    def _track(self, tensor: torch.Tensor, inputs: set[int]) -> None:
        storage = tensor.untyped_storage()
        pointer = storage.data_ptr()
        if pointer in inputs and pointer not in self.live or storage.nbytes() == 0:
            return  # a view or in-place result of memory that was there before
        entry = self.live.setdefault(pointer, [storage.nbytes(), 0])
        if entry[1] == 0:
            self.current += entry[0]
            self.peak = max(self.peak, self.current)
        entry[1] += 1
        weakref.finalize(tensor, self._release, pointer)

    def _release(self, pointer: int) -> None:
        entry = self.live[pointer]
        entry[1] -= 1
        if entry[1] == 0:
            self.current -= entry[0]
            del self.live[pointer]


def peak_of_dummy_run(drafter, num_tokens: int) -> int:
    with PeakTensorMemory() as tracker:
        drafter.dummy_run(num_tokens)
    return tracker.peak


def test_the_tracker_sees_temporaries_alive_together():
    with PeakTensorMemory() as tracker:
        a = torch.ones(1000)  # 4,000 B
        b = a * 2  # 8,000 B alive
        del a, b
        c = torch.ones(500)  # 2,000 B
        del c
    assert tracker.peak == 8000 and tracker.current == 0


def test_profile_runs_the_image_path_and_its_peak_is_counted(tiny_target, tiny_draft, monkeypatch):
    from parity import drafter_of

    import vispec_vllm.engine.proposer as proposer_module

    target = tiny_target("qwen2_5_vl")
    calls: list[int] = []
    largest = proposer_module.largest_image_inputs

    def counted(draft, runner, num_tokens):
        calls.append(num_tokens)
        return largest(draft, runner, num_tokens)

    monkeypatch.setattr(proposer_module, "largest_image_inputs", counted)
    monkeypatch.setenv("VISPEC_ADAPTOR_CACHE_BYTES", str(CACHE_BUDGET))
    spec = {"method": "eagle", "model": str(tiny_draft("qwen2_5_vl")), "num_speculative_tokens": 3}
    with vllm_engine(model=str(target), limit_mm_per_prompt={"image": 2}, speculative_config=spec,
                     max_num_batched_tokens=512) as llm:
        drafter = drafter_of(llm)
        drafter.runner.profile_run()  # what a GPU worker runs at start-up to size the KV cache (CPU: compiled only)
        assert calls and max(calls) == 512  # it ran the image path at the full token budget
        image_tokens = max(drafter.runner.mm_budget.mm_max_toks_per_item.values())
        element = torch.tensor([], dtype=drafter.dtype).element_size()
        peaks = {}
        for num_tokens in (16, 512):
            with PeakTensorMemory() as image_path:
                largest(drafter.model, drafter.runner, num_tokens)
            with_images = peak_of_dummy_run(drafter, num_tokens)
            with monkeypatch.context() as patch:
                patch.setattr(proposer_module, "largest_image_inputs", lambda *args: None)
                patch.setattr(drafter.image_states.adaptor_cache, "max_bytes", 0)
                without_images = peak_of_dummy_run(drafter, num_tokens)
            # the image embedding, compressed tokens and global terms are alive together
            held_at_once = (image_tokens + 2 * num_tokens) * drafter.hidden_size * element
            peaks[num_tokens] = (with_images, without_images, image_path.peak, held_at_once)
    for num_tokens, (with_images, without_images, image_path_peak, held_at_once) in peaks.items():
        print(f"dummy run of {num_tokens} tokens: peak {with_images:,} B with the image path, {without_images:,} B "
              f"without, the image path alone {image_path_peak:,} B (holding at least {held_at_once:,} B at once; "
              f"image of {image_tokens} tokens)")
        assert image_path_peak >= held_at_once
        # the cache budget plus the larger of the two phases: nothing of the image path stays alive in the forwards
        assert with_images == CACHE_BUDGET + max(without_images, image_path_peak)
    with_images, without_images, image_path_peak, _ = peaks[16]
    assert with_images - without_images - CACHE_BUDGET == image_path_peak - without_images > 0  # the image path
