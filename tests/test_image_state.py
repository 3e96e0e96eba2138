"""Per-request image state and per-token image inputs of the ViSpec proposer (no engine needed)."""

import logging
from types import SimpleNamespace

import pytest
import torch

from vispec_vllm.engine import image_state
from vispec_vllm.engine.image_encoder import MissingImagePixels, TargetImageEncoder, carries_pixels
from vispec_vllm.engine.image_state import (
    AdaptorOutputCache,
    ImageStateStore,
    UnsupportedImageInput,
    adaptor_cache_bytes,
    spans_from_mm_features,
)
from vispec_vllm.engine.step_inputs import chain_global_term, token_image_inputs

H, NUM_Q = 4, 3
ENTRY_BYTES = NUM_Q * H * 4  # one float32 adaptor output


def feature(identifier, offset, length, modality="image", is_embed=None):
    position = SimpleNamespace(offset=offset, length=length, is_embed=is_embed)
    return SimpleNamespace(identifier=identifier, modality=modality, mm_position=position)


def request(*features, computed=0):
    return SimpleNamespace(mm_features=list(features), num_computed_tokens=computed)


def adapt(embedding):  # [N, H] -> [num_q, H]: row k = mean + k, easy to recognise
    return embedding.mean(0, keepdim=True) + torch.arange(NUM_Q, dtype=embedding.dtype)[:, None]


def no_reencoding(feature):
    raise AssertionError(f"{feature.identifier} re-encoded")


def make_store(adapt=adapt, reencode=no_reencoding, cache_bytes=1 << 20):
    return ImageStateStore(num_q=NUM_Q, hidden_size=H, adapt=adapt, reencode=reencode, device=torch.device("cpu"),
                           dtype=torch.float32, cache_bytes=cache_bytes)


@pytest.fixture
def warnings():
    """WARNING lines of the image-state logger (vLLM's logger does not propagate to the root)."""
    lines: list[str] = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = lambda record: lines.append(record.getMessage())
    image_state.logger.addHandler(handler)
    yield lines
    image_state.logger.removeHandler(handler)


def test_spans_use_the_eagle_slot_shift_and_prompt_order():
    state = spans_from_mm_features("r", [feature("b", 40, 10), feature("a", 5, 8), feature("x", 60, 3, "audio")])
    assert [(s.identifier, s.first_slot, s.last_slot, s.feature_index) for s in state.spans] == [
        ("a", 4, 11, 1), ("b", 39, 48, 0)
    ]


def test_non_embedding_placeholders_and_video_are_unsupported():
    with pytest.raises(UnsupportedImageInput, match="is_embed"):
        spans_from_mm_features("r", [feature("a", 5, 4, is_embed=torch.tensor([True, False, True, True]))])
    with pytest.raises(UnsupportedImageInput, match="video"):
        spans_from_mm_features("r", [feature("a", 5, 4), feature("v", 20, 8, "video")])


@pytest.mark.parametrize("bad", [feature("odd", 2, 4, is_embed=torch.tensor([True, False, True, True])),
                                 feature("clip", 2, 4, "video")], ids=["is_embed", "video"])
def test_an_unsupported_request_is_drafted_text_only_and_the_others_are_not(bad, warnings):
    store = make_store()
    live = {"bad": request(feature("fine", 10, 6), bad), "good": request(feature("fine", 1, 6))}
    outputs = {"fine": torch.ones(6, H), bad.identifier: torch.ones(4, H)}
    for _ in range(3):  # logged and counted once, however many steps it stays in the batch
        store.update(["bad", "good"], live, outputs)
    assert store.requests["bad"].spans == [] and "UnsupportedImageInput" in store.requests["bad"].text_only_reason
    assert store.requests["good"].text_only_reason is None
    assert torch.equal(store.requests["good"].spans[0].adaptor_output, adapt(torch.ones(6, H)))
    assert store.text_only_requests == 1
    assert len(warnings) == 1 and "request bad is drafted without its images" in warnings[0]
    tables = store.tables(["bad", "good"])
    assert tables.last_image_slot.tolist() == [-1, 5]  # the text-only row: no image slot, nothing dropped
    after = tables.after_images(num_blocks=4, block_size=2)
    assert after.global_term[0].tolist() == [0.0] * H and after.global_term[1].tolist() == [3.0] * H  # g: mean 1 + 2


def test_an_adaptor_error_on_one_image_makes_only_its_requests_text_only(warnings):
    def adapt_or_fail(embedding):
        if embedding[0, 0] == 7.0:
            raise RuntimeError("injected adaptor failure")
        return adapt(embedding)

    store = make_store(adapt=adapt_or_fail)
    live = {"a": request(feature("seven", 1, 4)), "b": request(feature("one", 1, 4), feature("seven", 9, 4)),
            "c": request(feature("one", 3, 4))}
    store.update(["a", "b", "c"], live, {"seven": torch.full((4, H), 7.0), "one": torch.ones(4, H)})
    assert {r for r, s in store.requests.items() if s.text_only_reason} == {"a", "b"}
    assert "injected adaptor failure" in store.requests["a"].text_only_reason
    assert torch.equal(store.requests["c"].spans[0].adaptor_output, adapt(torch.ones(4, H)))
    assert store.text_only_requests == 2 and len(warnings) == 2
    live["d"] = request(feature("one", 5, 4))  # a later request is served as usual
    store.update(["c", "d"], live, {})
    assert store.requests["d"].spans[0].adaptor_output is store.requests["c"].spans[0].adaptor_output


def test_an_adaptor_output_of_the_wrong_shape_makes_the_request_text_only():
    store = make_store(adapt=lambda embedding: torch.zeros(NUM_Q + 1, H))
    store.update(["a"], {"a": request(feature("i", 1, 4))}, {"i": torch.ones(4, H)})
    assert "shape (4, 4)" in store.requests["a"].text_only_reason


def test_the_adaptor_cache_is_bounded_in_bytes():
    cache = AdaptorOutputCache(max_bytes=2 * ENTRY_BYTES)
    for name in "abc":
        cache.put(name, torch.zeros(NUM_Q, H))
    assert len(cache) == 2 and cache.num_bytes == 2 * ENTRY_BYTES and cache.get("a") is None
    cache.get("b")  # used: "c" is now the least recently used
    cache.put("d", torch.zeros(NUM_Q, H))
    assert cache.get("c") is None and cache.get("b") is not None
    cache.put("b", torch.ones(NUM_Q, H))  # replacing an entry counts it once
    assert cache.num_bytes == 2 * ENTRY_BYTES
    cache.put("huge", torch.zeros(3 * NUM_Q, H))  # larger than the budget: not kept, and evicts everything
    assert len(cache) == 0 and cache.num_bytes == 0


def test_the_cache_budget_comes_from_the_environment():
    assert adaptor_cache_bytes({}) == 64 << 20
    assert adaptor_cache_bytes({"VISPEC_ADAPTOR_CACHE_BYTES": " 4096 "}) == 4096
    assert adaptor_cache_bytes({"VISPEC_ADAPTOR_CACHE_BYTES": "0"}) == 0
    with pytest.raises(ValueError, match="VISPEC_ADAPTOR_CACHE_BYTES='64MiB'"):
        adaptor_cache_bytes({"VISPEC_ADAPTOR_CACHE_BYTES": "64MiB"})


def test_an_evicted_image_inside_a_prefix_hit_is_reencoded_and_live_requests_keep_theirs():
    reencoded = []

    def reencode(feature):
        reencoded.append(feature.identifier)
        return torch.full((6, H), 5.0)

    store = make_store(reencode=reencode, cache_bytes=ENTRY_BYTES)  # room for one image
    live = {"first": request(feature("img", 2, 6))}
    store.update(["first"], live, {"img": torch.full((6, H), 5.0)})
    kept = store.requests["first"].spans[0].adaptor_output
    live["other"] = request(feature("other", 2, 6))
    store.update(["first", "other"], live, {"other": torch.zeros(6, H)})  # evicts "img" from the shared cache
    assert store.adaptor_cache.get("img") is None
    assert store.requests["first"].spans[0].adaptor_output is kept  # a live request keeps its own
    # a new request whose first 8 tokens (the image, at [2, 8)) came from the prefix cache: re-encoded
    live["repeat"] = request(feature("img", 2, 6), computed=8)
    # and one whose image vLLM has still to compute (and encode) waits for vLLM's encoder output
    live["ahead"] = request(feature("later", 20, 6), computed=16)
    store.update(["repeat", "ahead"], live, {})
    assert reencoded == ["img"] and store.reencoded_images == 1
    assert torch.equal(store.requests["repeat"].spans[0].adaptor_output, kept)
    assert store.requests["ahead"].spans[0].adaptor_output is None
    store.update(["repeat", "ahead"], live, {"later": torch.ones(6, H)})
    assert reencoded == ["img"] and store.requests["ahead"].spans[0].adaptor_output is not None


def test_an_image_that_cannot_be_reencoded_makes_the_request_text_only(warnings):
    def reencode(feature):
        raise MissingImagePixels(f"image {feature.identifier}: no pixels")

    store = make_store(reencode=reencode, cache_bytes=0)
    store.update(["a"], {"a": request(feature("img", 2, 6), computed=8)}, {})
    assert "MissingImagePixels: image img: no pixels" in store.requests["a"].text_only_reason
    assert store.reencoded_images == 0 and store.text_only_requests == 1 and len(warnings) == 1


def test_the_target_encoder_reruns_on_the_pixels_vllm_kept():
    from vllm.multimodal.inputs import MultiModalBatchedField, MultiModalFieldElem, MultiModalKwargsItem

    def elem(data, keep_on_cpu=False):
        return MultiModalFieldElem(data=data, field=MultiModalBatchedField(keep_on_cpu=keep_on_cpu))

    grid = elem(torch.tensor([1, 2, 2]), keep_on_cpu=True)
    whole = SimpleNamespace(identifier="i", modality="image",
                            data=MultiModalKwargsItem({"pixel_values": elem(torch.ones(4, 6)), "image_grid_thw": grid}))
    stripped = SimpleNamespace(identifier="i", modality="image", data=MultiModalKwargsItem({"image_grid_thw": grid}))
    assert carries_pixels(whole) and not carries_pixels(stripped)
    assert not carries_pixels(SimpleNamespace(identifier="i", data=None))

    class Target(torch.nn.Module):
        def embed_multimodal(self, pixel_values, image_grid_thw):  # [1, 4, 6], [1, 3] -> one [4, 6] per image
            assert image_grid_thw.tolist() == [[1, 2, 2]]
            return tuple(pixel_values * 2)

    encoder = TargetImageEncoder(Target(), torch.device("cpu"))
    assert torch.equal(encoder(whole), torch.full((4, 6), 2.0))
    with pytest.raises(MissingImagePixels, match="image i lies inside a prefix-cache hit"):
        encoder(stripped)


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
