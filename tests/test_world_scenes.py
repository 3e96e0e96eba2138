"""The synthetic scene world: scenes, rendering, captions, question and scene splits, and answer grading."""

from __future__ import annotations

import itertools
import random
import re

import numpy as np
import pytest

from vispec_vllm.world.grading import grade, grade_many
from vispec_vllm.world.questions import HELDOUT_QUESTIONS, TRAIN_QUESTIONS, normalised_words, word_edit_distance
from vispec_vllm.world.scenes import (
    COLOUR_RGB,
    COLOURS,
    COUNTS,
    ROWS,
    SHAPES,
    SIZES,
    Group,
    Scene,
    caption_phrases,
    describe,
    make_scene,
    place_group,
    place_objects,
    render,
    scene_key,
)
from vispec_vllm.world.splits import SEEDS_PER_SPLIT, SPLITS, content_split, split_samples

SCENES = [make_scene(seed) for seed in range(500)]
ROW_HEIGHT = 1.0 / len(ROWS)  # rows are equal horizontal strips of the picture, top to bottom


# --- scenes -----------------------------------------------------------------------------------------------------


def test_same_seed_same_scene_and_identical_pixels():
    assert make_scene(7) == make_scene(7)
    assert place_objects(make_scene(7)) == place_objects(make_scene(7))
    assert render(make_scene(7)).tobytes() == render(make_scene(7)).tobytes()


def test_different_seeds_differ():
    assert len({scene_key(scene) for scene in SCENES[:50]}) >= 45
    images = {render(scene).tobytes() for scene in SCENES[:20]}
    assert len(images) == 20


def test_every_attribute_value_appears_and_scenes_have_two_to_four_groups():
    groups = [group for scene in SCENES for group in scene.groups]
    assert {g.colour for g in groups} == set(COLOURS)
    assert {g.shape for g in groups} == set(SHAPES)
    assert {g.size for g in groups} == set(SIZES)
    assert {g.count for g in groups} == set(COUNTS)
    assert {g.row for g in groups} == set(ROWS)
    assert {len(scene.groups) for scene in SCENES} == {2, 3, 4}


CLEARANCE = 0.02  # of the image side (2 px at 112): free space at row borders, picture sides and between objects


def _assert_valid_layout(objects, groups):
    assert len(objects) == sum(group.count for group in groups)
    for obj in objects:
        top = ROWS.index(obj.group.row) * ROW_HEIGHT
        assert obj.x - obj.radius >= CLEARANCE and obj.x + obj.radius <= 1.0 - CLEARANCE, obj
        assert top + CLEARANCE <= obj.y - obj.radius and obj.y + obj.radius <= top + ROW_HEIGHT - CLEARANCE, obj
    for a, b in itertools.combinations(objects, 2):
        assert max(abs(a.x - b.x), abs(a.y - b.y)) >= a.radius + b.radius + CLEARANCE  # footprints stay apart


def test_objects_lie_inside_their_row_and_do_not_overlap():
    for scene in SCENES[:200]:
        _assert_valid_layout(place_objects(scene), scene.groups)


def test_fallback_layout_puts_one_object_per_third_for_every_size_count_and_row():
    for size, count, row, seed in itertools.product(SIZES, COUNTS, ROWS, range(50)):
        group = Group("red", "circle", size, count, row)
        objects = place_group(group, random.Random(f"{size}:{count}:{row}:{seed}"), tries=0)
        _assert_valid_layout(objects, [group])
        assert len({int(obj.x * 3) for obj in objects}) == count  # distinct thirds of the row's width


def test_rendered_objects_have_their_exact_colour_and_stay_in_their_row_band():
    for scene in SCENES[:30]:
        pixels = np.asarray(render(scene, size=112)).astype(int)
        assert pixels.shape == (112, 112, 3)
        for obj in place_objects(scene):
            x, y = int(obj.x * 112), int(obj.y * 112)
            assert tuple(pixels[y, x]) == COLOUR_RGB[obj.group.colour], obj
        band_rows = 112 // len(ROWS)
        for index, row in enumerate(ROWS):
            band = pixels[index * band_rows : (index + 1) * band_rows].reshape(-1, 3)
            drawn = {tuple(p) for p in band[band.min(axis=1) < 200]}  # every scene colour has a channel < 200
            group = scene.group_at(row)
            assert drawn == ({COLOUR_RGB[group.colour]} if group else set()), (scene, row)
        assert (pixels[0, 0] > 200).all()  # margins keep the corners background
    assert render(SCENES[0], size=224).size == (224, 224)


def test_invalid_groups_and_scenes_are_rejected():
    with pytest.raises(ValueError):
        Group("pink", "circle", "small", 1, "top row")
    with pytest.raises(ValueError):
        Group("red", "circle", "small", 4, "top row")
    with pytest.raises(ValueError):
        Group("red", "circle", "small", 1, "top left")  # the former quadrant layout
    top, bottom = Group("red", "circle", "small", 1, "top row"), Group("red", "square", "large", 2, "bottom row")
    with pytest.raises(ValueError):
        Scene((bottom, top), seed=0)  # not in reading order
    with pytest.raises(ValueError):
        Scene((top, top), seed=0)


_PHRASE = re.compile(
    rf"^(?P<row>{'|'.join(ROWS)}): (?:empty|(?P<count>one|two|three) (?:{'|'.join(SIZES)}) "
    rf"(?:{'|'.join(COLOURS)}) (?:{'|'.join(SHAPES)})(?P<plural>s?))\.$"
)


def test_caption_phrases_have_one_short_phrase_per_row_in_reading_order():
    for scene in SCENES[:200]:
        phrases = caption_phrases(scene)
        assert len(phrases) == 4
        for row, phrase in zip(ROWS, phrases, strict=True):
            match = _PHRASE.match(phrase)
            assert match, phrase
            assert match["row"] == row
            assert len(phrase.split()) <= 10
            assert (match["count"] is None) == (scene.group_at(row) is None)
            assert (match["plural"] == "s") == (match["count"] in ("two", "three"))


def test_caption_phrase_examples():
    scene = Scene(
        (Group("red", "circle", "small", 2, "top row"), Group("blue", "square", "large", 1, "bottom row")), seed=3
    )
    assert caption_phrases(scene) == (
        "top row: two small red circles.",
        "second row: empty.",
        "third row: empty.",
        "bottom row: one large blue square.",
    )
    assert describe(scene) == (
        "The image shows two small red circles in the top row and a large blue square in the bottom row."
    )


# --- questions and splits ---------------------------------------------------------------------------------------


def test_question_lists_are_large_and_held_out_phrasings_are_not_near_duplicates():
    assert len(TRAIN_QUESTIONS) >= 36 and len(HELDOUT_QUESTIONS) >= 12
    words = [normalised_words(q) for q in TRAIN_QUESTIONS + HELDOUT_QUESTIONS]
    assert len(set(words)) == len(words)
    for held in HELDOUT_QUESTIONS:
        for train in TRAIN_QUESTIONS:
            assert word_edit_distance(normalised_words(held), normalised_words(train)) >= 2, (held, train)


def test_questions_do_not_name_a_layout_other_than_rows():
    for question in TRAIN_QUESTIONS + HELDOUT_QUESTIONS:
        words = set(normalised_words(question))
        assert not words & {"quadrant", "quadrants", "corner", "corners", "left", "right", "upper", "lower"}, question


def test_word_edit_distance_counts_whole_words():
    describe_image = normalised_words("Describe the image.")
    assert word_edit_distance(describe_image, normalised_words("Describe this image!")) == 1
    assert word_edit_distance(describe_image, normalised_words("describe the image")) == 0
    assert word_edit_distance(describe_image, normalised_words("Describe the image in detail.")) == 2


def test_splits_use_disjoint_seed_ranges_and_disjoint_scene_content():
    samples = {
        "train": split_samples("train", 3000),
        "heldout_images": split_samples("heldout_images", 300),
        "heldout_questions": split_samples("heldout_questions", 300),
    }
    keys = {}
    for split, split_list in samples.items():
        first = SPLITS[split].first_seed
        assert all(first <= s.scene_seed < first + SEEDS_PER_SPLIT for s in split_list)
        assert [s.index for s in split_list] == list(range(len(split_list)))
        scenes = [make_scene(s.scene_seed) for s in split_list]
        assert {content_split(scene) for scene in scenes} == {split}
        keys[split] = {scene_key(scene) for scene in scenes}
    for a, b in itertools.combinations(keys, 2):
        assert not keys[a] & keys[b], (a, b)


def test_split_questions_and_determinism():
    for split, questions in (
        ("train", TRAIN_QUESTIONS),
        ("heldout_images", TRAIN_QUESTIONS),
        ("heldout_questions", HELDOUT_QUESTIONS),
    ):
        samples = split_samples(split, 2 * len(questions))
        assert {s.question for s in samples} == set(questions)
        assert samples == split_samples(split, 2 * len(questions))
        assert samples[:5] == split_samples(split, 5)
        reseeded = split_samples(split, 2 * len(questions), seed=1)
        assert [s.scene_seed for s in reseeded] == [s.scene_seed for s in samples]
        assert [s.question for s in reseeded] != [s.question for s in samples]
    with pytest.raises(ValueError):
        split_samples("validation", 1)


# --- grading ----------------------------------------------------------------------------------------------------

SCENE = Scene(
    (
        Group("red", "circle", "small", 2, "top row"),
        Group("blue", "square", "large", 1, "second row"),
        Group("green", "diamond", "small", 3, "bottom row"),
    ),
    seed=0,
)  # the third row is empty


@pytest.mark.parametrize(
    ("answer", "correct", "stated"),
    [
        ("There is a red circle.", 1, 2),  # "a" states a count of one: wrong
        ("I see red circles and blue squares.", 2, 2),  # bare plurals state no count
        ("The background is white and there is a yellow triangle.", 0, 1),  # colour without shape: no fact
        ("The green triangle is in the top row.", 0, 1),  # false object: its position is not graded
        ("In the second row there are two big blue squares.", 3, 4),
        ("In the top row, there are two tiny red circles, and in the last row, three green diamonds.", 7, 7),
        ("A large blue square sits in the third row.", 3, 4),  # the empty row
        ("The second row has a big blue square.", 4, 4),
        ("In the bottom row, a small red circle.", 2, 4),  # carried forward: wrong count and row
        ("There are no yellow circles, and there are no red circles.", 1, 2),
        ("There is a blue square, in the second row.", 3, 3),  # position after the mention, own clause
        ("The second row is empty, and there is a blue square.", 2, 2),  # an empty row is not passed on
        ("The top row is empty; two red circles are in the second row.", 2, 3),
        ("Top row: empty. Second row: a blue square.", 3, 3),  # caption style; each sentence on its own
        ("A pink star is next to 2 red circles.", 2, 3),
        ("A pink star is in the top row, and a brown hexagon in the third row.", 0, 2),  # out of the vocabulary
        ("Two red circles are in the top row and a blue square is in the 2nd row.", 6, 6),
        ("The 1st row has two red circles above the blue square of the second row.", 5, 5),  # nearest row phrase
        ("There are two red circles. They are in the bottom row.", 2, 2),  # positions stay in their sentence
        ("Three green diamonds are lined up in a row.", 2, 2),  # "in a row" names no row
        ("The picture contains red, blue and green shapes.", 0, 0),
        ("Four little green rhombuses fill the fourth row.", 3, 4),
    ],
)
def test_grade_hand_written_answers(answer, correct, stated):
    result = grade(answer, SCENE)
    assert (result.correct, result.stated) == (correct, stated), result.facts


NAMES_OF_ROW = {
    "top row": ("top row", "first row", "1st row", "top-row"),
    "second row": ("second row", "2nd row"),
    "third row": ("third row", "3rd row"),
    "bottom row": ("bottom row", "last row", "fourth row", "4th row"),
}


@pytest.mark.parametrize("row", ROWS)
def test_grade_recognises_every_name_of_a_row(row):
    scene = Scene((Group("red", "circle", "small", 1, row),), seed=0)
    for named_row, names in NAMES_OF_ROW.items():
        for name in names:
            facts = grade(f"A small red circle is in the {name}.", scene).facts
            assert [(f.kind, f.text, f.ok) for f in facts][-1] == ("position", name, named_row == row), name


def test_grade_reports_fact_kinds_and_spans():
    facts = grade("On the 2nd row there is one big blue square.", SCENE).facts
    assert [(f.kind, f.text, f.ok) for f in facts] == [
        ("colour-shape", "one big blue square", True),
        ("count", "one", True),
        ("size", "big", True),
        ("position", "2nd row", True),
    ]


def test_grade_picks_the_best_agreeing_group_when_colour_and_shape_repeat():
    scene = Scene(
        (Group("red", "circle", "small", 1, "top row"), Group("red", "circle", "large", 3, "bottom row")), seed=0
    )
    assert grade("Three large red circles are in the bottom row.", scene).correct == 4
    assert grade("A small red circle is in the top row.", scene).correct == 4
    result = grade("There are three small red circles in the top row.", scene)
    assert (result.correct, result.stated) == (3, 4)  # the top-row group; only the count is wrong


def test_own_descriptions_and_captions_grade_fully_correct_and_other_scenes_do_not():
    for scene, other in zip(SCENES[:100], SCENES[100:200], strict=True):
        stated = 4 * len(scene.groups)
        assert (grade(describe(scene), scene).correct, grade(describe(scene), scene).stated) == (stated, stated)
        caption = grade(" ".join(caption_phrases(scene)), scene)
        assert (caption.correct, caption.stated) == (stated, stated)
        if scene_key(scene) != scene_key(other):
            assert grade(describe(other), scene).correct < grade(describe(other), scene).stated


def test_grade_many_sums_and_reports_accuracy_by_kind():
    correct, stated, accuracy = grade_many(
        [("In the second row there are two big blue squares.", SCENE), ("There is a red circle.", SCENE)]
    )
    assert (correct, stated) == (4, 6)
    assert accuracy == {"colour-shape": 1.0, "count": 0.0, "size": 1.0, "position": 1.0}
