"""The prompt generator: GenEval's templates, determinism, task mix, disjoint splits."""

from collections import Counter

import pytest

from unirl_lightning.data.prompts import (
    GENEVAL_TASK_COUNTS,
    english_plural,
    generate_specs,
    geneval_plural,
    geneval_vocabulary,
    make_spec,
    prompt_for,
    split_specs,
    task_capacity,
    with_article,
    world_vocabulary,
)
from unirl_lightning.data.specs import load_official_specs, validate_spec
from unirl_lightning.worlds.vocab import SHAPES, TASKS

OFFICIAL = load_official_specs()


def _rebuild(spec: dict) -> dict:
    """The spec our builder makes from the official spec's own fields."""
    inc = spec["include"]
    tag = spec["tag"]
    if tag == "position":
        subject = next(c for c in inc if "position" in c)
        relation, index = subject["position"]
        return make_spec(tag, (subject["class"], inc[index]["class"]), relation=relation)
    objects = tuple(c["class"] for c in inc)
    colors = tuple(c["color"] for c in inc if "color" in c)
    return make_spec(tag, objects, count=inc[0]["count"], colors=colors)


def test_official_prompts_reproduced():
    for spec in OFFICIAL:
        assert prompt_for(spec) == spec["prompt"]
        assert _rebuild(spec) == spec  # the whole spec, exclude clause and layout included


def test_geneval_grammar():
    assert with_article("orange") == "an orange" and with_article("skis") == "a skis"
    names = ("bench", "bus", "person", "sheep")
    assert [geneval_plural(n) for n in names] == ["benchs", "buses", "persons", "sheeps"]
    assert english_plural("person") == "people" and english_plural("computer mouse") == "computer mice"
    assert english_plural("knife") == "knives" and english_plural("bus") == "buses"
    assert english_plural("sheep") == "sheep" and english_plural("skis") == "skis"
    assert english_plural("bench") == "benches" and english_plural("wine glass") == "wine glasses"
    assert [english_plural(s) for s in SHAPES] == [geneval_plural(s) for s in SHAPES]
    spec = make_spec("counting", ("person",), count=3, grammar="english")
    assert spec["prompt"] == "a photo of three people"
    assert prompt_for(make_spec("counting", ("person",), count=3)) == "a photo of three persons"


def test_task_counts_match_official_file():
    assert dict(Counter(s["tag"] for s in OFFICIAL)) == GENEVAL_TASK_COUNTS
    assert sum(GENEVAL_TASK_COUNTS.values()) == 553


@pytest.mark.parametrize("vocab", [world_vocabulary(), geneval_vocabulary()], ids=["shapes", "coco"])
def test_generated_specs_valid_and_deterministic(vocab):
    a = generate_specs(300, vocab, seed=7)
    assert a == generate_specs(300, vocab, seed=7)
    assert a != generate_specs(300, vocab, seed=8)
    assert len({s["prompt"] for s in a}) == 300
    for spec in a:
        validate_spec(spec, vocab)
        assert prompt_for(spec) == spec["prompt"]
        assert spec == _rebuild(spec)


def test_generated_layout_per_task():
    for spec in generate_specs(2000, geneval_vocabulary(), seed=0):
        inc = spec["include"]
        if spec["tag"] == "counting":
            assert 2 <= inc[0]["count"] <= 4
            assert spec["exclude"] == [{"class": inc[0]["class"], "count": inc[0]["count"] + 1}]
        if spec["tag"] in ("two_object", "position", "color_attr"):
            assert inc[0]["class"] != inc[1]["class"]
        if spec["tag"] == "position":
            assert "position" not in inc[0] and inc[1]["position"][1] == 0
        if spec["tag"] == "color_attr":
            assert inc[0]["color"] != inc[1]["color"]
        if spec["tag"] in ("colors", "color_attr"):
            assert all(c["class"] != "person" for c in inc)  # GenEval asks for no coloured person


def test_task_mix_follows_geneval_counts():
    specs = generate_specs(553, geneval_vocabulary(), seed=1)
    assert dict(Counter(s["tag"] for s in specs)) == GENEVAL_TASK_COUNTS
    tasks = ("counting", "position")
    specs = generate_specs(10, geneval_vocabulary(), seed=1, tasks=tasks, task_weights=[1, 4])
    assert Counter(s["tag"] for s in specs) == {"counting": 2, "position": 8}
    specs = generate_specs(9, geneval_vocabulary(), seed=1, task_weights={"colors": 1.0})
    assert {s["tag"] for s in specs} == {"colors"}


def test_small_vocabulary_overflow_and_repeats():
    shapes = world_vocabulary()
    assert task_capacity("single_object", shapes) == 4 and task_capacity("counting", shapes) == 12
    specs = generate_specs(553, shapes, seed=0)
    counts = Counter(s["tag"] for s in specs)
    assert counts["single_object"] == 4 and counts["two_object"] == 12 and sum(counts.values()) == 553
    total = sum(task_capacity(t, shapes) for t in TASKS)
    with pytest.raises(ValueError, match=f"only {total}"):
        generate_specs(total + 1, shapes, seed=0)
    rep = generate_specs(553, shapes, seed=0, allow_repeats=True)
    assert dict(Counter(s["tag"] for s in rep)) == GENEVAL_TASK_COUNTS
    singles = Counter(s["prompt"] for s in rep if s["tag"] == "single_object")
    assert sorted(singles.values()) == [20, 20, 20, 20]  # whole passes: repeats are even


def test_exclude_prompts():
    first = generate_specs(100, world_vocabulary(), seed=0)
    taken = {s["prompt"] for s in first}
    second = generate_specs(100, world_vocabulary(), seed=0, exclude_prompts=taken)
    assert not taken & {s["prompt"] for s in second}


@pytest.mark.parametrize("vocab,allow_repeats", [(world_vocabulary(), False), (world_vocabulary(), True),
                                                 (geneval_vocabulary(), False)])
def test_split_disjoint(vocab, allow_repeats):
    train, test = split_specs(vocab, 400, 100, seed=3, allow_repeats=allow_repeats)
    assert len(train) == 400 and len(test) == 100
    assert not {s["prompt"] for s in train} & {s["prompt"] for s in test}
    # Every task keeps prompts on both sides.
    assert {s["tag"] for s in train} == set(TASKS) == {s["tag"] for s in test}
    assert (train, test) == split_specs(vocab, 400, 100, seed=3, allow_repeats=allow_repeats)
    assert test != split_specs(vocab, 400, 100, seed=4, allow_repeats=allow_repeats)[1]


def test_bad_arguments():
    with pytest.raises(ValueError, match="max_count"):
        generate_specs(5, SHAPES, seed=0, max_count=1)
    with pytest.raises(ValueError, match="tasks"):
        generate_specs(5, SHAPES, seed=0, tasks=("nope",))
    with pytest.raises(ValueError, match="grammar"):
        generate_specs(5, SHAPES, seed=0, grammar="french")
    with pytest.raises(ValueError, match="vocabulary"):
        generate_specs(5, [], seed=0)
