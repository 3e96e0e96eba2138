"""Per-request image state and per-token image inputs of the ViSpec proposer (no engine needed)."""

from types import SimpleNamespace

import pytest
import torch

from vispec_vllm.engine.image_state import ImageStateStore, spans_from_mm_features
from vispec_vllm.engine.step_inputs import chain_global_term, token_image_inputs

H, NUM_Q = 4, 3


def feature(identifier, offset, length, modality="image", is_embed=None):
    position = SimpleNamespace(offset=offset, length=length, is_embed=is_embed)
    return SimpleNamespace(identifier=identifier, modality=modality, mm_position=position)


def request(*features):
    return SimpleNamespace(mm_features=list(features))


def adapt(embedding):  # [N, H] -> [num_q, H]: row k = mean + k, easy to recognise
    return embedding.mean(0, keepdim=True) + torch.arange(NUM_Q, dtype=embedding.dtype)[:, None]


def make_store():
    return ImageStateStore(num_q=NUM_Q, hidden_size=H, adapt=adapt, device=torch.device("cpu"), dtype=torch.float32)


def test_spans_use_the_eagle_slot_shift_and_prompt_order():
    state = spans_from_mm_features("r", [feature("b", 40, 10), feature("a", 5, 8), feature("x", 60, 3, "audio")])
    assert [(s.identifier, s.first_slot, s.last_slot) for s in state.spans] == [("a", 4, 11), ("b", 39, 48)]


def test_non_embedding_placeholders_are_refused():
    with pytest.raises(NotImplementedError, match="is_embed"):
        spans_from_mm_features("r", [feature("a", 5, 4, is_embed=torch.tensor([True, False, True, True]))])


def test_images_adapt_once_are_cached_by_identifier_and_freed_with_the_request():
    store = make_store()
    live = {"r1": request(feature("img", 2, 6)), "r2": request(feature("img", 10, 6))}
    store.update(["r1"], live, encoder_outputs={})
    assert store.requests["r1"].spans[0].adaptor_output is None  # not encoded yet
    store.update(["r1"], live, encoder_outputs={"img": torch.ones(6, H)})
    first = store.requests["r1"].spans[0].adaptor_output
    assert torch.equal(first, adapt(torch.ones(6, H)))
    # r2 shows the same image inside a prefix-cache hit: never encoded, still adapted (from the cache)
    store.update(["r1", "r2"], live, encoder_outputs={})
    assert store.requests["r2"].spans[0].adaptor_output is first
    del live["r1"]
    store.update(["r2"], live, encoder_outputs={})
    assert set(store.requests) == {"r2"}


def test_token_inputs_place_compressed_tokens_and_global_features():
    store = make_store()
    live = {"a": request(feature("i1", 3, 5), feature("i2", 12, 4)), "b": request()}
    outputs = {"i1": torch.full((5, H), 10.0), "i2": torch.full((4, H), 20.0)}
    store.update(["a", "b"], live, outputs)
    tables = store.tables(["a", "b"])
    # image 1 owns slots [2, 6]: dropped [2, 4], compressed 5 (query 0) and 6 (query 1); g from slot 7 on
    # image 2 owns slots [11, 14]: dropped [11, 12], compressed 13, 14; its g from slot 15 on
    positions = torch.tensor([0, 4, 5, 6, 7, 10, 13, 14, 15, 3])
    rows = torch.tensor([0] * 9 + [1])
    inputs = token_image_inputs(tables, rows, positions)
    assert inputs.is_compressed.tolist() == [False, False, True, True, False, False, True, True, False, False]
    compressed = inputs.compressed_token[:, 0].tolist()
    assert compressed[2:4] == [10.0, 11.0] and compressed[6:8] == [20.0, 21.0]
    g = inputs.global_term[:, 0].tolist()
    assert g == [0.0, 0.0, 0.0, 0.0, 12.0, 12.0, 12.0, 12.0, 22.0, 0.0]
    assert inputs.is_dropped.tolist() == [False, True, False, False, False, False, False, False, False, False]
    every_slot = torch.arange(17)
    dropped = token_image_inputs(tables, torch.zeros(17, dtype=torch.int64), every_slot).is_dropped
    assert every_slot[dropped].tolist() == [2, 3, 4, 11, 12]
    assert tables.dropped_ranges[0].tolist() == [[2, 5], [11, 13]]


def test_chain_inputs_carry_the_latest_global_feature():
    store = make_store()
    live = {"a": request(feature("i1", 3, 5), feature("i2", 12, 4)), "b": request()}
    store.update(["a", "b"], live, {"i1": torch.full((5, H), 10.0), "i2": torch.full((4, H), 20.0)})
    tables = store.tables(["a", "b"])
    for positions, expected in (([7, 3], [12.0, 0.0]), ([15, 40], [22.0, 0.0]), ([6, 0], [0.0, 0.0])):
        assert chain_global_term(tables, torch.tensor(positions))[:, 0].tolist() == expected
    after = tables.after_images(num_blocks=8, block_size=2)  # decode: every query after every image
    assert after.global_term[:, 0].tolist() == [22.0, 0.0]
    assert after.skipped_keys.tolist() == [2, 0]  # of dropped [2, 5) and [11, 13) only block [2, 4) is whole


def test_tables_are_rebuilt_only_when_the_batch_or_state_changes():
    store = make_store()
    live = {"a": request(feature("i", 1, 4))}
    store.update(["a"], live, {})
    first = store.tables(["a"])
    assert store.tables(["a"]) is first
    store.update(["a"], live, {"i": torch.zeros(4, H)})
    assert store.tables(["a"]) is not first


def test_an_image_at_token_zero_drops_no_slot_before_the_sequence():
    store = make_store()
    store.update(["a"], {"a": request(feature("i", 0, 6))}, {})
    inputs = token_image_inputs(store.tables(["a"]), torch.zeros(6, dtype=torch.int64), torch.arange(6))
    assert inputs.is_dropped.tolist() == [True, True, True, False, False, False]  # slots 0..4: 3, 4 kept
