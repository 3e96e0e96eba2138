"""Grade a free-text description of a scene: which stated facts about its objects are true.

A *mention* is "<count>? <size>? <colour> <shape>" ("a red circle", "three big blue squares", "green triangles").
Each mention states a colour-shape fact (true if the scene has a group of that colour and shape), plus a count fact
if a number is given ("a"/"an"/"one" = 1, "no" = none; a bare plural states no count), a size fact if a size word is
given, and a position fact if a row phrase ("top row", "the second row", ...) belongs to it. Count, size
and position are graded against the matching group (the best-agreeing one when several share colour and shape);
a mention whose colour-shape is false states nothing further. Colour words outside a mention ("the background is
white") are not facts. Colours and shapes outside the scene vocabulary ("a pink star") are recognised so that
hallucinated objects count as false colour-shape facts.

Positions: a sentence is cut into clauses at , ; : and at "and" / "but" / "while" / "whereas". A mention takes the
nearest row phrase in its own clause. A clause with a row phrase but no mention ("In the top row, ...")
passes it on to the following mentions of the sentence that have none of their own, or else back to the previous
clause's mentions that have none ("a red circle, in the top row"). A clause calling a row empty passes nothing.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field

from vispec_vllm.world.scenes import COLOURS, SHAPES, Group, Scene

FACT_KINDS = ("colour-shape", "count", "size", "position")

_COLOUR_WORDS = {colour: colour for colour in COLOURS} | {"violet": "purple"}
_OTHER_COLOURS = ("pink", "black", "white", "brown", "grey", "gray", "cyan", "magenta", "turquoise")
_SHAPE_WORDS = {shape: shape for shape in SHAPES} | {f"{shape}s": shape for shape in SHAPES}
_SHAPE_WORDS |= {"rhombus": "diamond", "rhombuses": "diamond", "rhombi": "diamond"}
_OTHER_SHAPES = ("rectangle", "oval", "star", "hexagon", "pentagon", "heart", "ellipse", "cross")
_COUNT_WORDS = {"a": 1, "an": 1, "one": 1, "single": 1, "a single": 1, "a pair of": 2, "no": 0, "zero": 0}
_NUMBER_WORDS = ("two", "three", "four", "five", "six", "seven", "eight", "nine", "ten")
_COUNT_WORDS |= {word: n for n, word in enumerate(_NUMBER_WORDS, start=2)}
_SIZE_WORDS = {"small": "small", "tiny": "small", "little": "small", "large": "large", "big": "large", "huge": "large"}
_SHADES = ("bright", "dark", "light", "pale", "solid", "filled")


def _alternatives(words: Iterable[str]) -> str:
    return "|".join(sorted(words, key=len, reverse=True))  # longest first: "a single" before "a"


_MENTION = re.compile(
    rf"\b(?:(?P<count>{_alternatives(_COUNT_WORDS)}|\d+)\s+)?"
    rf"(?:(?P<size>{_alternatives(_SIZE_WORDS)})\s+)?"
    rf"(?:(?:{_alternatives(_SHADES)})\s+)?"
    rf"(?P<colour>{_alternatives([*_COLOUR_WORDS, *_OTHER_COLOURS])})\s+"
    rf"(?P<shape>{_alternatives([*_SHAPE_WORDS, *_OTHER_SHAPES, *(f'{s}s' for s in _OTHER_SHAPES)])})\b"
)
_POSITION = re.compile(r"\b(?P<ordinal>top|first|1st|second|2nd|third|3rd|fourth|4th|bottom|last)[\s-]+row\b")
_ROW_OF_ORDINAL = {"top": "top row", "first": "top row", "1st": "top row", "second": "second row",
                   "2nd": "second row", "third": "third row", "3rd": "third row", "fourth": "bottom row",
                   "4th": "bottom row", "bottom": "bottom row", "last": "bottom row"}
_EMPTY = re.compile(r"\b(?:empty|nothing|blank|vacant)\b")
_SENTENCE_END = re.compile(r"[.!?\n]+")
_CLAUSE_BREAK = re.compile(r"[,;:]|\s(?:and|but|while|whereas)\s")


@dataclass(frozen=True)
class Fact:
    kind: str  # one of FACT_KINDS
    text: str  # the words of the answer that state it
    ok: bool


@dataclass
class Grade:
    correct: int
    stated: int
    facts: list[Fact]


@dataclass
class _Mention:
    text: str
    start: int
    end: int
    colour: str
    shape: str
    count: tuple[str, int] | None  # (words, number)
    size: tuple[str, str] | None  # (word, vocabulary size)
    position: tuple[str, str] | None = None  # (words, row)


@dataclass
class _Clause:
    mentions: list[_Mention]
    positions: list[tuple[int, int, str, str]] = field(default_factory=list)  # (start, end, words, row)
    calls_empty: bool = False


def grade(answer: str, scene: Scene) -> Grade:
    facts = [fact for mention in _mentions(answer) for fact in _grade_mention(mention, scene)]
    return Grade(correct=sum(fact.ok for fact in facts), stated=len(facts), facts=facts)


def grade_many(pairs: Iterable[tuple[str, Scene]]) -> tuple[int, int, dict[str, float]]:
    """(correct, stated, accuracy by fact kind); kinds never stated are left out of the dict."""
    correct_by_kind = dict.fromkeys(FACT_KINDS, 0)
    stated_by_kind = dict.fromkeys(FACT_KINDS, 0)
    for answer, scene in pairs:
        for fact in grade(answer, scene).facts:
            stated_by_kind[fact.kind] += 1
            correct_by_kind[fact.kind] += fact.ok
    accuracy = {kind: correct_by_kind[kind] / stated_by_kind[kind] for kind in FACT_KINDS if stated_by_kind[kind]}
    return sum(correct_by_kind.values()), sum(stated_by_kind.values()), accuracy


def _mentions(answer: str) -> list[_Mention]:
    mentions = []
    for sentence in _SENTENCE_END.split(answer.lower()):
        clauses = [_parse_clause(text) for text in _CLAUSE_BREAK.split(sentence)]
        _assign_positions(clauses)
        mentions.extend(mention for clause in clauses for mention in clause.mentions)
    return mentions


def _parse_clause(text: str) -> _Clause:
    mentions = []
    for match in _MENTION.finditer(text):
        count_words, size_word = match["count"], match["size"]
        count = None
        if count_words is not None:
            count = (count_words, int(count_words) if count_words.isdigit() else _COUNT_WORDS[count_words])
        mentions.append(
            _Mention(
                text=match[0],
                start=match.start(),
                end=match.end(),
                colour=_COLOUR_WORDS.get(match["colour"], match["colour"]),
                shape=_SHAPE_WORDS.get(match["shape"], match["shape"]),
                count=count,
                size=(size_word, _SIZE_WORDS[size_word]) if size_word else None,
            )
        )
    positions = [
        (match.start(), match.end(), match[0], _ROW_OF_ORDINAL[match["ordinal"]])
        for match in _POSITION.finditer(text)
    ]
    return _Clause(mentions, positions, calls_empty=bool(_EMPTY.search(text)))


def _assign_positions(clauses: list[_Clause]) -> None:
    carried: tuple[str, str] | None = None
    for index, clause in enumerate(clauses):
        if clause.mentions:
            for mention in clause.mentions:
                nearest = min(clause.positions, key=lambda p: _gap(p[0], p[1], mention), default=None)
                mention.position = (nearest[2], nearest[3]) if nearest else carried
        elif clause.positions and not clause.calls_empty:
            position = (clause.positions[-1][2], clause.positions[-1][3])
            following = next((later for later in clauses[index + 1 :] if later.mentions), None)
            if following is not None and not following.positions:
                carried = position
                continue
            previous = next((earlier for earlier in reversed(clauses[:index]) if earlier.mentions), None)
            for mention in previous.mentions if previous else []:
                if mention.position is None:
                    mention.position = position


def _gap(start: int, end: int, mention: _Mention) -> int:
    return max(start - mention.end, mention.start - end, 0)


def _grade_mention(mention: _Mention, scene: Scene) -> list[Fact]:
    candidates = [g for g in scene.groups if (g.colour, g.shape) == (mention.colour, mention.shape)]
    if mention.count is not None and mention.count[1] == 0:  # "no red circles": a claim of absence
        return [Fact("colour-shape", mention.text, not candidates)]
    if not candidates:
        return [Fact("colour-shape", mention.text, False)]
    group = max(candidates, key=lambda g: sum(ok for _, _, ok in _attribute_checks(mention, g)))
    return [Fact("colour-shape", mention.text, True)] + [
        Fact(kind, text, ok) for kind, text, ok in _attribute_checks(mention, group)
    ]


def _attribute_checks(mention: _Mention, group: Group) -> list[tuple[str, str, bool]]:
    checks = []
    if mention.count is not None:
        checks.append(("count", mention.count[0], mention.count[1] == group.count))
    if mention.size is not None:
        checks.append(("size", mention.size[0], mention.size[1] == group.size))
    if mention.position is not None:
        checks.append(("position", mention.position[0], mention.position[1] == group.row))
    return checks
