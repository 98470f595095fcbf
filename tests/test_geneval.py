"""GenEval's official scoring rules, pinned at their boundaries."""

from __future__ import annotations

import json
import math
import random

import pytest

from unirl_lightning.evaluation import Detection, GenEvalResult, evaluate, relative_position
from unirl_lightning.worlds.vocab import GENEVAL_DATA_DIR


def det(
    label: str,
    score: float = 0.95,
    center: tuple[float, float] = (50, 50),
    size: float = 10,
    color: str | None = None,
) -> Detection:
    cx, cy = center
    return Detection(label, score, (cx - size / 2, cy - size / 2, cx + size / 2, cy + size / 2), color)


def single(name: str = "dog", count: int = 1, tag: str = "single_object", **extra) -> dict:
    return {"tag": tag, "include": [{"class": name, "count": count, **extra}], "prompt": f"a photo of {name}"}


POSITION = {
    "tag": "position",
    "include": [
        {"class": "teddy bear", "count": 1},
        {"class": "dog", "count": 1, "position": ["right of", 0]},
    ],
    "prompt": "a photo of a dog right of a teddy bear",
}


# ---- threshold, sorting, cap ---------------------------------------------------------


def test_threshold_is_strictly_greater():
    assert not evaluate(single(), [det("dog", 0.3)]).correct
    assert evaluate(single(), [det("dog", 0.3000001)]).correct


def test_counting_threshold_applies_only_to_counting():
    spec = single("clock", 2, tag="counting")
    assert not evaluate(spec, [det("clock", 0.9), det("clock", 0.95)]).correct
    assert evaluate(spec, [det("clock", 0.9000001), det("clock", 0.95)]).correct
    assert evaluate(single("clock", 2, tag="two_object"), [det("clock", 0.5), det("clock", 0.5)]).correct
    assert not evaluate(spec, [det("clock", 0.5)] * 2, counting_threshold=0.5).correct
    assert evaluate(spec, [det("clock", 0.5)] * 2, counting_threshold=0.49).correct


def test_at_most_16_per_class_highest_scores_first():
    dets = [det("dog", 0.5 + i / 100, color="blue") for i in range(16)] + [det("dog", 0.4, color="red")]
    random.Random(0).shuffle(dets)
    assert evaluate(single("dog", 16), dets).correct
    assert not evaluate(single("dog", 17), dets).correct  # the 17th is dropped by the cap
    assert evaluate(single("dog", 16, color="blue"), dets).correct  # the red one is the lowest, capped away
    assert evaluate(single("dog", 17), dets, max_objects=17).correct


def test_labels_group_independently_and_no_nms():
    # two identical boxes of one class both count: GenEval applies no NMS
    assert evaluate(single("cat", 2), [det("cat"), det("cat"), det("dog")]).correct
    assert not evaluate(single("cat", 2), [det("cat"), det("dog"), det("dog")]).correct


# ---- exclude, strict, colour -----------------------------------------------------------


def test_exclude_fails_at_count():
    spec = {
        "tag": "counting",
        "include": [{"class": "clock", "count": 2}],
        "exclude": [{"class": "clock", "count": 3}],
    }
    assert evaluate(spec, [det("clock")] * 2).correct
    result = evaluate(spec, [det("clock")] * 3)
    assert not result.correct and "clock<3" in result.reason
    # below-threshold extras do not trip the exclude clause
    assert evaluate(spec, [det("clock")] * 2 + [det("clock", 0.9)]).correct


def test_strict_needs_exact_counts():
    spec = single("apple", 2, tag="counting")  # no exclude clause: correct only needs >= 2
    three = evaluate(spec, [det("apple")] * 3)
    assert three.correct and not three.strict
    two = evaluate(spec, [det("apple")] * 2)
    assert two.correct and two.strict


def test_color_uses_the_top_count_detections():
    spec = single("car", 2, tag="colors", color="red")
    ok = [det("car", 0.9, color="red"), det("car", 0.8, color="red"), det("car", 0.7, color="blue")]
    assert evaluate(spec, ok).correct
    bad = [det("car", 0.9, color="red"), det("car", 0.8, color="blue"), det("car", 0.7, color="red")]
    result = evaluate(spec, bad)
    assert not result.correct and "found 1 red" in result.reason
    assert not evaluate(
        spec, [det("car", color="red"), det("car", color=None)]
    ).correct  # unclassified != red
    assert not evaluate(spec, ok).strict  # three cars for two


# ---- position --------------------------------------------------------------------------


def test_relative_position_margin_and_half_rule():
    b = (0.0, 0.0, 10.0, 10.0)  # both boxes 10 x 10: margin 0.1 * (10 + 10) = 2 per axis
    shifted = lambda dx, dy: (dx, dy, 10.0 + dx, 10.0 + dy)  # noqa: E731
    assert relative_position(shifted(2.0, 0), b) == set()  # revised offset 0: within the margin
    assert relative_position(shifted(4.0, 0), b) == set()  # (4 - 2) / 4 = 0.5, not > 0.5
    assert relative_position(shifted(4.01, 0), b) == {"right of"}
    assert relative_position(shifted(-4.01, 0), b) == {"left of"}
    assert relative_position(shifted(0, 4.01), b) == {"below"}  # y points down
    assert relative_position(shifted(0, -4.01), b) == {"above"}
    # zero-size boxes: no margin, the direction alone decides
    point = lambda x, y: (x, y, x, y)  # noqa: E731
    assert relative_position(point(4, 3), point(0, 0)) == {"right of", "below"}  # 0.8, 0.6
    assert relative_position(point(12, 5), point(0, 0)) == {"right of"}  # 0.92, 0.38
    assert relative_position(point(0, 0), point(0, 0)) == set()


def test_position_clause():
    bear = det("teddy bear", center=(50, 50))
    assert evaluate(POSITION, [bear, det("dog", center=(80, 50))]).correct
    result = evaluate(POSITION, [bear, det("dog", center=(20, 50))])
    assert not result.correct and "left of" in result.reason
    # at the boundary: offset 4.01 with 10-px boxes is right of, 4.0 is not
    assert evaluate(POSITION, [bear, det("dog", center=(54.01, 50))]).correct
    assert not evaluate(POSITION, [bear, det("dog", center=(54.0, 50))]).correct


def test_position_uses_top_count_objects_of_both_clauses():
    dets = [
        det("teddy bear", 0.9, center=(50, 50)),
        det("teddy bear", 0.5, center=(200, 50)),  # lower-scored extra bear: not a target
        det("dog", 0.9, center=(80, 50)),
        det("dog", 0.4, center=(0, 50)),  # lower-scored extra dog: not checked
    ]
    assert evaluate(POSITION, dets).correct
    dets[1] = det("teddy bear", 0.95, center=(200, 50))  # now the top bear is right of the dog
    assert not evaluate(POSITION, dets).correct


def test_position_with_missing_or_failed_target():
    result = evaluate(POSITION, [det("dog", center=(80, 50))])
    assert not result.correct and "no target for dog" in result.reason and "teddy bear>=1" in result.reason
    spec = json.loads(json.dumps(POSITION))
    spec["include"][0]["color"] = "red"  # the bear is found but fails its colour: no target either
    result = evaluate(spec, [det("teddy bear", color="blue"), det("dog", center=(80, 50))])
    assert not result.correct and "no target for dog" in result.reason


# ---- partial credit ----------------------------------------------------------------------


def test_partial_values():
    counting = {
        "tag": "counting",
        "include": [{"class": "clock", "count": 2}],
        "exclude": [{"class": "clock", "count": 3}],
    }
    assert evaluate(counting, [det("clock")] * 2).partial == 1.0
    assert evaluate(counting, [det("clock")] * 3).partial == pytest.approx(0.5)  # 1 - 1/2
    assert evaluate(counting, [det("clock")] * 5).partial == 0.0  # 1 - 3/2, floored
    colors = single("car", 2, tag="colors", color="red")
    assert evaluate(colors, [det("car", color="red"), det("car", color="blue")]).partial == pytest.approx(
        0.75
    )
    assert evaluate(POSITION, [det("teddy bear"), det("dog", center=(20, 50))]).partial == pytest.approx(
        2 / 3
    )
    assert evaluate(POSITION, []).partial == 0.0


def test_partial_in_unit_interval_on_random_detections():
    rng = random.Random(0)
    specs = [
        json.loads(line) for line in (GENEVAL_DATA_DIR / "evaluation_metadata.jsonl").read_text().splitlines()
    ]
    names = sorted({c["class"] for s in specs for c in s["include"]})
    for spec in rng.sample(specs, 60):
        dets = [
            det(
                rng.choice(names[:5] + [c["class"] for c in spec["include"]]),
                rng.random(),
                (rng.uniform(0, 100), rng.uniform(0, 100)),
                rng.uniform(0, 30),
                rng.choice(["red", "blue", None]),
            )
            for _ in range(rng.randrange(0, 25))
        ]
        r = evaluate(spec, dets)
        assert 0.0 <= r.partial <= 1.0
        assert not r.strict or r.correct  # strict implies correct


# ---- bad input ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("spec", "field"),
    [
        ({"include": [{"class": "dog", "count": 1}]}, "tag"),
        ({"tag": "single_object"}, "include"),
        ({"tag": "single_object", "include": []}, "include"),
        ({"tag": "x", "include": [{"count": 1}]}, "['class']"),
        ({"tag": "x", "include": [{"class": "dog", "count": 0}]}, "['count']"),
        ({"tag": "x", "include": [{"class": "dog", "count": "2"}]}, "['count']"),
        ({"tag": "x", "include": [{"class": "dog", "count": True}]}, "['count']"),
        ({"tag": "x", "include": [{"class": "dog", "count": 1, "color": "teal"}]}, "['color']"),
        ({"tag": "x", "include": [{"class": "dog", "count": 1, "position": ["near", 0]}]}, "['position'][0]"),
        (
            {
                "tag": "x",
                "include": [{"class": "a", "count": 1}, {"class": "b", "count": 1, "position": ["above", 1]}],
            },
            "['position'][1]",
        ),
        (
            {
                "tag": "x",
                "include": [{"class": "a", "count": 1}, {"class": "b", "count": 1, "position": ["above", 5]}],
            },
            "['position'][1]",
        ),
        (
            {
                "tag": "x",
                "include": [{"class": "a", "count": 1}, {"class": "b", "count": 1, "position": ["above"]}],
            },
            "['position']",
        ),
        (
            {"tag": "x", "include": [{"class": "a", "count": 1}], "exclude": [{"class": "a", "count": -1}]},
            "spec['exclude'][0]['count']",
        ),
        ("not a spec", "spec"),
    ],
)
def test_malformed_spec_names_the_field(spec, field):
    with pytest.raises(ValueError, match=field.replace("[", r"\[").replace("]", r"\]")):
        evaluate(spec, [])


def test_bad_detections():
    with pytest.raises(ValueError, match="x2 >= x1"):
        evaluate(single(), [Detection("dog", 0.9, (10, 0, 5, 5))])
    with pytest.raises(ValueError, match="finite"):
        evaluate(single(), [Detection("dog", 0.9, (0, 0, math.inf, 5))])
    with pytest.raises(ValueError, match="finite"):
        evaluate(single(), [{"label": "dog", "score": 0.9, "box": (0, math.nan, 5, 5)}])
    with pytest.raises(ValueError, match="lacks"):
        evaluate(single(), [{"label": "dog", "score": 0.9}])


def test_nan_score_is_below_threshold_and_mappings_work():
    result = evaluate(single(), [det("dog", math.nan)])
    assert (
        isinstance(result, GenEvalResult)
        and not result.correct
        and "no detection scored above" in result.reason
    )
    assert evaluate(single(), [{"label": "dog", "score": 0.5, "box": [0, 0, 4, 4]}]).correct


def test_empty_detections_are_a_defined_failure():
    result = evaluate(single(), [])
    assert result == GenEvalResult(correct=False, reason=result.reason, strict=False, partial=0.0)
    assert result.reason.startswith("no detections")


# ---- the official prompts -----------------------------------------------------------------

_OFFSETS = {"left of": (-100, 0), "right of": (100, 0), "above": (0, -100), "below": (0, 100)}


def _perfect_detections(spec: dict) -> list[Detection]:
    """Detections that satisfy a spec exactly: count objects per clause, coloured, placed by relation."""
    dets, centers = [], []
    for i, clause in enumerate(spec["include"]):
        if "position" in clause:
            relation, target = clause["position"]
            dx, dy = _OFFSETS[relation]
            center = (centers[target][0] + dx, centers[target][1] + dy)
        else:
            center = (500 + 300 * i, 500)
        centers.append(center)
        dets += [
            det(clause["class"], 0.95, (center[0] + k, center[1]), 20, clause.get("color"))
            for k in range(clause["count"])
        ]
    return dets


def test_official_prompts_parse_and_score():
    specs = [
        json.loads(line) for line in (GENEVAL_DATA_DIR / "evaluation_metadata.jsonl").read_text().splitlines()
    ]
    assert len(specs) == 553
    for spec in specs:
        empty = evaluate(spec, [])
        assert not empty.correct and not empty.strict and empty.partial == 0.0 and empty.reason
        perfect = evaluate(spec, _perfect_detections(spec))
        assert perfect.correct and perfect.strict and perfect.partial == 1.0, (spec, perfect)
