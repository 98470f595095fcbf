"""UniRL questions, answers and the per-attribute grader."""

import pytest

from unirl_lightning.data.prompts import generate_specs, make_spec, world_vocabulary
from unirl_lightning.data.qa import (
    QUESTIONS,
    Grade,
    all_answer_words,
    answer_for,
    grade_answer,
    question_for,
    split_words,
)
from unirl_lightning.data.specs import load_official_specs
from unirl_lightning.worlds.vocab import SHAPES

OFFICIAL = load_official_specs()
SINGLE = make_spec("single_object", ("circle",))
TWO = make_spec("two_object", ("cross", "circle"))
COUNT = make_spec("counting", ("cross",), count=3)
COLOR = make_spec("colors", ("square",), colors=("red",))
POS = make_spec("position", ("circle", "square"), relation="left of")
ATTR = make_spec("color_attr", ("cross", "circle"), colors=("red", "blue"))


def test_questions_and_answers():
    assert question_for(SINGLE) == "What is the main item in this image?" and answer_for(SINGLE) == "circle"
    assert question_for(TWO) == "What are two items in this image?"
    assert answer_for(TWO) == "There is a cross and a circle"
    assert question_for(COUNT) == "How many items in this image?" and answer_for(COUNT) == "three crosses"
    assert question_for(COLOR) == "What is the color of the object?" and answer_for(COLOR) == "red"
    assert question_for(POS) == "Where is the circle relative to the square?"
    # The prompt reads "a photo of a circle left of a square".
    assert answer_for(POS) == "The circle is left of the square"
    assert question_for(ATTR) == "What are the colors of the cross and the circle?"
    assert answer_for(ATTR) == "The cross is red and the circle is blue"
    assert answer_for(make_spec("two_object", ("apple", "oven"))) == "There is an apple and an oven"
    assert answer_for(make_spec("counting", ("person",), count=2)) == "two people"


def test_ground_truth_scores_one():
    for spec in OFFICIAL + generate_specs(500, world_vocabulary(), seed=0):
        grade = grade_answer(spec, answer_for(spec))
        assert grade.correct and grade.score == 1.0, (spec, answer_for(spec), grade)


def test_applicable_attributes():
    assert grade_answer(SINGLE, "circle").applicable == {"object": True}
    assert set(grade_answer(COUNT, "x").applicable) == {"object", "count"}
    assert set(grade_answer(COLOR, "x").applicable) == {"color"}
    assert set(grade_answer(POS, "x").applicable) == {"object", "relation"}
    assert set(grade_answer(ATTR, "x").applicable) == {"object", "color"}
    assert Grade().score == 0.0 and not Grade().correct


@pytest.mark.parametrize("spec,answer,expected", [
    (COUNT, "four crosses", Grade(object=True, count=False)),
    (COUNT, "three squares", Grade(object=False, count=True)),
    (COUNT, "two squares", Grade(object=False, count=False)),
    (POS, "The circle is right of the square", Grade(object=True, relation=False)),
    (POS, "The square is left of the circle", Grade(object=True, relation=False)),
    (POS, "The triangle is above the square", Grade(object=False, relation=False)),
    (ATTR, "The cross is blue and the circle is red", Grade(object=True, color=False)),
    (ATTR, "The cross is red and the circle is green", Grade(object=True, color=False)),
    (ATTR, "The cross is red and the square is blue", Grade(object=False, color=False)),
    (ATTR, "red and blue", Grade(object=False, color=True)),
])
def test_each_wrong_attribute_lowers_score(spec, answer, expected):
    grade = grade_answer(spec, answer)
    assert grade == expected
    assert grade.score == pytest.approx(sum(expected.applicable.values()) / len(expected.applicable))
    assert grade.score < 1 and not grade.correct


@pytest.mark.parametrize("spec,answer", [
    (SINGLE, "A Circle."),
    (SINGLE, "I think the main item is a circle!"),
    (SINGLE, "circles"),
    (TWO, "There is a circle and a cross"),  # order-insensitive
    (TWO, "CROSS, circle"),
    (TWO, "crosses and circles"),
    (COUNT, "3 crosses"),
    (COUNT, "There are 3 crosses."),
    (COUNT, "Three cross"),
    (COLOR, "Red."),
    (COLOR, "It is red."),
    (COLOR, "a red-colored square"),
    (POS, "the square is right of the circle"),  # same relation, said the other way
    (POS, "The circle is to the left of the square."),
    (POS, "On the left of the square is the circle"),
    (ATTR, "a blue circle and a red cross"),
    (ATTR, "The circle is blue; the cross is red"),
    (ATTR, "cross: red, circle: blue"),
])
def test_tolerance(spec, answer):
    assert grade_answer(spec, answer).correct, grade_answer(spec, answer)


@pytest.mark.parametrize("spec,answer,attr", [
    (COLOR, "blue", "color"),
    (COLOR, "red and blue", "color"),
    (COLOR, "bored", "color"),  # no substring match inside other words
    (COLOR, "reddish", "color"),
    (COLOR, "", "color"),
    (SINGLE, "square", "object"),
    (SINGLE, "a circle and a square", "object"),
    (SINGLE, "circular", "object"),
    (TWO, "a cross", "object"),
    (TWO, "a cross, a circle and a triangle", "object"),
    (COUNT, "3 crosses and 1 square", "count"),
    (COUNT, "crosses", "count"),
    (POS, "left of, right of", "relation"),
    (ATTR, "The cross is bored and the circle is blue", "color"),
])
def test_wrong_mentions_fail(spec, answer, attr):
    assert getattr(grade_answer(spec, answer), attr) is False


def test_coco_names_plurals_and_the_orange_problem():
    people = make_spec("counting", ("person",), count=3)
    for answer in ("three people", "3 persons", "three person"):
        assert grade_answer(people, answer).correct
    remote = make_spec("single_object", ("tv remote",))
    assert grade_answer(remote, "a remote").correct and grade_answer(remote, "TV remotes").correct
    assert not grade_answer(remote, "a tv").correct
    # "orange" is a COCO class and a GenEval colour.
    oo = make_spec("colors", ("orange",), colors=("orange",))
    assert grade_answer(oo, "orange").correct and grade_answer(oo, "an orange orange").correct
    ro = make_spec("colors", ("orange",), colors=("red",))
    assert grade_answer(ro, "a red orange").correct and not grade_answer(ro, "orange").correct
    attr = make_spec("color_attr", ("orange", "broccoli"), colors=("red", "purple"))
    assert grade_answer(attr, "The orange is red and the broccoli is purple").correct
    assert not grade_answer(attr, "The orange is orange and the broccoli is purple").correct
    two = make_spec("two_object", ("orange", "cow"))
    assert grade_answer(two, "There is an orange and a cow").correct
    assert not grade_answer(make_spec("colors", ("cow",), colors=("red",)), "an orange cow").correct


def test_explicit_vocabulary():
    # A word outside the vocabulary is just an extra word.
    assert grade_answer(SINGLE, "a circle next to a hexagon", vocabulary=SHAPES).correct
    assert not grade_answer(SINGLE, "a circle next to a hexagon", vocabulary=[*SHAPES, "hexagon"]).correct


def test_all_answer_words_cover_shapes_world():
    words = set(all_answer_words(SHAPES, max_count=4))
    specs = generate_specs(1196, SHAPES, seed=0)  # every distinct shapes prompt
    for spec in specs:
        for text in (spec["prompt"], question_for(spec), answer_for(spec)):
            assert set(split_words(text)) <= words, text
    assert set(split_words(" ".join(QUESTIONS.values()))) - {"a", "b"} <= words
    assert words >= {"zero", "one", "two", "three", "four"} and "five" not in words
