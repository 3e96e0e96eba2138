"""Slot layout of the ViSpec draft: image runs, compressed/dropped slots, which g each text slot uses."""

from __future__ import annotations

import pytest
import torch

from vispec_vllm.draft.image_spans import (
    COMPRESSED,
    DROPPED,
    PADDING,
    TEXT,
    build_slot_layout,
    compressed_slots,
    find_image_runs,
)


def mask(bits: str) -> torch.Tensor:
    return torch.tensor([c == "1" for c in bits])


def test_find_image_runs():
    assert find_image_runs(mask("01101001")) == [(1, 2), (4, 4), (7, 7)]
    assert find_image_runs(mask("1110")) == [(0, 2)]
    assert find_image_runs(mask("0000")) == []
    # two images with no text slot between them are one run (official behaviour)
    assert find_image_runs(mask("0111111")) == [(1, 6)]


def test_compressed_slots_are_the_last_num_q_minus_1():
    assert compressed_slots((3, 9), 2) == range(9, 10)
    assert compressed_slots((3, 9), 4) == range(7, 10)
    assert compressed_slots((5, 7), 4) == range(5, 8)  # exactly num_q-1 slots: nothing dropped
    with pytest.raises(ValueError, match=r"\[5, 6\].*num_q-1 = 3"):
        compressed_slots((5, 6), 4)


def loop_layout(image_row: torch.Tensor, valid_row: torch.Tensor, num_q: int):
    """Per-slot expectations built slot by slot from the runs."""
    length = len(image_row)
    kind = [TEXT] * length
    query = [-1] * length
    image_index = [-1] * length
    runs = find_image_runs(image_row & valid_row)
    for index, run in enumerate(runs):
        for slot in range(run[0], run[1] + 1):
            kind[slot] = DROPPED
            image_index[slot] = index
        for q, slot in enumerate(compressed_slots(run, num_q)):
            kind[slot] = COMPRESSED
            query[slot] = q
    global_image = [sum(1 for r in runs if r[1] < t) - 1 for t in range(length)]
    for t in range(length):
        if not valid_row[t]:
            kind[t] = PADDING
    return kind, query, image_index, global_image, runs


@pytest.mark.parametrize("num_q", [2, 4])
def test_layout_matches_slot_by_slot_expectation(num_q):
    rows = ["0011110000111000", "1111000111100000", "0000000000000000", "0001111100000111"]
    lengths = [16, 13, 9, 16]
    image = torch.stack([mask(r) for r in rows])
    valid = torch.arange(16)[None, :] < torch.tensor(lengths)[:, None]
    layout = build_slot_layout(image, valid, num_q)
    flat_runs = []
    for b in range(4):
        kind, query, image_index, global_image, runs = loop_layout(image[b], valid[b], num_q)
        assert layout.kind[b].tolist() == kind
        assert layout.query_index[b].tolist() == query
        assert layout.image_index[b].tolist() == image_index
        text = [t for t in range(16) if kind[t] == TEXT]
        assert [layout.global_image[b, t].item() for t in text] == [global_image[t] for t in text]
        assert layout.images_per_row[b].item() == len(runs)
        flat_runs += [(b, first, last) for first, last in runs]
    assert layout.image_runs == tuple(flat_runs)
    assert torch.equal(layout.key_visible, (layout.kind == TEXT) | (layout.kind == COMPRESSED))
    assert layout.image_offset.tolist() == [0, 2, 4, 4]
    # row 1 padding starts at 13: the image bits at 7..10 count, nothing past 12 does
    assert layout.kind[1, 13:].tolist() == [PADDING] * 3


def test_layout_random_masks_agree_with_loop():
    generator = torch.Generator().manual_seed(0)
    for _ in range(20):
        image = torch.rand(3, 24, generator=generator) < 0.6
        lengths = torch.randint(1, 25, (3,), generator=generator)
        valid = torch.arange(24)[None, :] < lengths[:, None]
        layout = build_slot_layout(image, valid, 2)
        for b in range(3):
            kind, query, *_ = loop_layout(image[b], valid[b], 2)
            assert layout.kind[b].tolist() == kind
            assert layout.query_index[b].tolist() == query


def test_layout_without_images_is_all_text():
    valid = torch.tensor([[True, True, True], [True, False, False]])
    layout = build_slot_layout(None, valid, 2)
    assert layout.kind.tolist() == [[TEXT] * 3, [TEXT, PADDING, PADDING]]
    assert layout.image_runs == ()
    assert (layout.global_image == -1).all()
    # stage-1 draft (num_q None): image slots are text
    layout = build_slot_layout(torch.ones(1, 4, dtype=torch.bool), None, None)
    assert layout.kind.tolist() == [[TEXT] * 4]


def test_short_image_run_raises():
    image = torch.stack([mask("0000000"), mask("0011000")])
    with pytest.raises(ValueError, match=r"row 1: image run at slots \[2, 3\] has 2 slots, fewer than num_q-1 = 3"):
        build_slot_layout(image, None, 4)


def test_num_q_below_two_rejected():
    with pytest.raises(ValueError, match="num_q must be >= 2"):
        build_slot_layout(mask("0110")[None], None, 1)
