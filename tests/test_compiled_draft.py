"""The draft's compiled core (`ViSpecModel`, `support_torch_compile` like vLLM's EAGLE drafts).

1. Traced by dynamo with the real inputs of a live engine (an image prefill, then a decode step): one graph,
   no break, and the compiled function (aot_eager) gives the eager outputs.
2. vLLM's compiled CPU mode (no `enforce_eager`: dynamo traced once, inductor) stays lossless with accepted and
   rejected drafts, against the compiled target alone.
3. Batch padding as vLLM's CUDA-graph dispatcher does it on a GPU (the CPU dispatcher never pads): every forward
   padded to a larger size gives the same greedy output and the same number of accepted tokens.
"""

from __future__ import annotations

import pytest
import torch
from conftest import vllm_engine

pytestmark = pytest.mark.vllm

QUESTIONS = ("Describe the picture in detail.", "What is in this image?", "What is the scene?")


def conversations(count: int = 6) -> list[list[dict]]:
    from vispec_vllm.factory import make_test_image
    from vispec_vllm.media import image_part

    convs = [[{"role": "user", "content": [image_part(make_test_image(1300 + i)),
                                           {"type": "text", "text": QUESTIONS[i % 3]}]}] for i in range(count - 1)]
    return [*convs, [{"role": "user", "content": "Tell me about the old house."}]]


def generate(llm, convs) -> list[list[int]]:
    from vllm import SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
    return [list(o.outputs[0].token_ids) for o in llm.chat(convs, params, use_tqdm=False)]


def engine_args(target, draft=None, **extra) -> dict:
    args = dict(model=str(target), limit_mm_per_prompt={"image": 1}, disable_log_stats=False, **extra)
    if draft is not None:
        args["speculative_config"] = {"method": "eagle", "model": str(draft), "num_speculative_tokens": 3}
    return args


def test_core_is_one_graph_for_prefill_and_decode_and_compiles_to_the_eager_outputs(tiny_target, trained_draft):
    from parity import drafter_of

    checked: dict[str, tuple[int, int]] = {}  # phase -> (graphs, graph breaks)
    with vllm_engine(**engine_args(tiny_target("qwen2_5_vl"), trained_draft)) as llm:
        core = drafter_of(llm).model.model
        eager_forward = core.forward

        def checking_forward(**inputs):
            out = eager_forward(**inputs)
            phase = "prefill with an image" if bool(inputs["is_compressed"].any()) else (
                "decode" if not bool(inputs["is_dropped"].any()) else None)
            if phase is not None and phase not in checked:
                explained = torch._dynamo.explain(eager_forward)(**inputs)
                compiled = torch.compile(eager_forward, backend="aot_eager", fullgraph=True, dynamic=True)
                torch.testing.assert_close(compiled(**inputs), out, rtol=1e-6, atol=1e-6)
                torch._dynamo.reset()
                checked[phase] = (explained.graph_count, explained.graph_break_count)
            return out

        core.forward = checking_forward
        generate(llm, conversations(3))
    print(f"dynamo on the draft core: {checked}")
    assert checked == {"prefill with an image": (1, 0), "decode": (1, 0)}


def test_compiled_cpu_mode_is_lossless_with_accepted_drafts(tiny_target, trained_draft):
    from parity import drafter_of

    from vispec_vllm.engine.metrics import SpecDecodeCounters

    target, convs = tiny_target("qwen2_5_vl"), conversations()
    with vllm_engine(**engine_args(target, enforce_eager=False)) as llm:
        expected = generate(llm, convs)
    with vllm_engine(**engine_args(target, trained_draft, enforce_eager=False)) as llm:
        core = drafter_of(llm).model.model
        got = generate(llm, convs)
        counters = SpecDecodeCounters.from_metrics(llm.get_metrics())
    print(f"compiled: accepted {counters.accepted_tokens} of {counters.draft_tokens} draft tokens")
    assert not core.do_not_compile and core.compiled  # the draft really ran compiled
    assert got == expected
    assert 0 < counters.accepted_tokens < counters.draft_tokens


def test_forwards_padded_like_cuda_graphs_change_nothing(tiny_target, trained_draft, monkeypatch):
    from vllm.config import CUDAGraphMode

    from vispec_vllm.engine.metrics import SpecDecodeCounters
    from vispec_vllm.engine.proposer import ViSpecProposer

    target, convs = tiny_target("qwen2_5_vl"), conversations()
    padding, padded_sizes = 5, []

    def run() -> tuple[list[list[int]], SpecDecodeCounters]:
        with vllm_engine(**engine_args(target, trained_draft)) as llm:
            return generate(llm, convs), SpecDecodeCounters.from_metrics(llm.get_metrics())

    def padded(self, num_tokens, use_cudagraphs=True):
        padded_sizes.append((num_tokens, num_tokens + padding))
        return CUDAGraphMode.NONE, num_tokens + padding, None

    unpadded, plain = run()
    monkeypatch.setattr(ViSpecProposer, "_determine_batch_execution_and_padding", padded)
    padded_out, with_padding = run()
    print(f"padded forwards: {len(padded_sizes)}; accepted {with_padding.accepted_tokens} (unpadded "
          f"{plain.accepted_tokens}) of {with_padding.draft_tokens}")
    assert any(size <= 8 for size, _ in padded_sizes)  # chain steps were padded, not only prefills
    assert padded_out == unpadded
    assert with_padding.accepted_tokens == plain.accepted_tokens > 0
