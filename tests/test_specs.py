"""GenEval spec files: the official file loads; malformed lines name file, line and field."""

import json

import pytest

from unirl_lightning.data.specs import (
    OFFICIAL_METADATA,
    SpecError,
    load_official_specs,
    load_specs,
    save_specs,
    validate_spec,
)
from unirl_lightning.worlds.vocab import SHAPES, load_geneval_constants

GOOD = {"tag": "single_object", "include": [{"class": "circle", "count": 1}], "prompt": "a photo of a circle"}


def test_official_file_loads_with_coco_vocabulary():
    names = load_geneval_constants()["geneval_object_names"]
    specs = load_specs(OFFICIAL_METADATA, vocabulary=names)
    assert len(specs) == 553
    assert specs == load_official_specs()


def test_official_file_fails_with_shapes_vocabulary():
    pattern = r"evaluation_metadata\.jsonl:1: include\[0\]\.class 'bench' is not in"
    with pytest.raises(SpecError, match=pattern):
        load_specs(OFFICIAL_METADATA, vocabulary=SHAPES)


def _write(tmp_path, bad_line: str, name: str = "prompts.jsonl"):
    # Good line, blank line (skipped but counted), good line, then the bad one on line 4.
    path = tmp_path / name
    path.write_text(json.dumps(GOOD) + "\n\n" + json.dumps(GOOD) + "\n" + bad_line + "\n")
    return path


def _spec(**changes) -> str:
    spec = json.loads(json.dumps(GOOD))
    spec.update(changes)
    return json.dumps(spec)


C = {"class": "circle", "count": 1}  # a good clause
P = r"prompts\.jsonl:4: "  # every message starts with file and line

BAD_LINES = [
    ('{"tag": "single_object", "include": [', P + "invalid JSON"),
    ("[1, 2]", P + "a spec must be a JSON object"),
    (_spec(tag="counts"), P + r"tag must be one of \['single_object'"),
    (_spec(include=[]), P + "include must be a non-empty list"),
    (_spec(include=[{"count": 1}]), P + r"include\[0\] is missing \"class\""),
    (_spec(include=[C, {**C, "count": 0}]), P + r"include\[1\]\.count must be a positive int, got 0"),
    (_spec(include=[{**C, "count": True}]), P + r"include\[0\]\.count must be a positive int, got True"),
    (_spec(include=[{**C, "color": "gray"}]), P + r"include\[0\]\.color must be one of GenEval's colours"),
    (_spec(include=[{**C, "colour": "red"}]), P + r"include\[0\] has unknown key\(s\) \['colour'\]"),
    (_spec(include=[C, {**C, "position": ["near", 0]}]), P + r"include\[1\]\.position\[0\] must be one of"),
    (_spec(include=[C, {**C, "position": ["above", 1]}]), P + r"include\[1\]\.position\[1\] must index"),
    (_spec(include=[{**C, "position": ["above", 3]}]), P + r"include\[0\]\.position\[1\] must index another"),
    (_spec(include=[{**C, "position": "above"}]), P + r"include\[0\]\.position must be \[relation, index\]"),
    (_spec(exclude={"class": "circle", "count": 2}), P + "exclude must be a list"),
    (_spec(exclude=[{"class": "circle", "count": -1}]), P + r"exclude\[0\]\.count must be a positive int"),
    (_spec(exclude=[{**C, "color": "red"}]), P + r"exclude\[0\] has unknown key"),
    (_spec(prompt=""), P + "prompt must be a non-empty string"),
    (_spec(prompt=None), P + "prompt must be a non-empty string"),
    (_spec(include=[{**C, "class": "hexagon"}]), P + r"include\[0\]\.class 'hexagon' is not in the"),
]


@pytest.mark.parametrize("line,pattern", BAD_LINES)
def test_malformed_lines_name_line_and_field(tmp_path, line, pattern):
    path = _write(tmp_path, line)
    with pytest.raises(SpecError, match=pattern):
        load_specs(path, vocabulary=SHAPES)


def test_spec_error_is_value_error_and_blank_lines_skipped(tmp_path):
    assert issubclass(SpecError, ValueError)
    path = tmp_path / "p.jsonl"
    path.write_text("\n" + json.dumps(GOOD) + "\n   \n" + json.dumps(GOOD) + "\n\n")
    assert load_specs(path) == [GOOD, GOOD]


def test_any_class_without_vocabulary(tmp_path):
    path = _write(tmp_path, _spec(include=[{"class": "hexagon", "count": 1}]))
    assert len(load_specs(path)) == 3


def test_empty_and_missing_files(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n\n")
    with pytest.raises(SpecError, match="no specs found"):
        load_specs(empty)
    with pytest.raises(FileNotFoundError, match="missing.jsonl"):
        load_specs(tmp_path / "missing.jsonl")


def test_validate_spec_prefix():
    validate_spec(GOOD, SHAPES)
    with pytest.raises(SpecError, match=r"^here: include\[0\]\.count"):
        validate_spec({**GOOD, "include": [{"class": "circle", "count": "1"}]}, where="here")


def test_save_load_round_trip(tmp_path):
    specs = load_official_specs()
    path = save_specs(specs, tmp_path / "sub" / "copy.jsonl")
    assert load_specs(path) == specs
    # Same line format as the official file.
    assert path.read_text() == OFFICIAL_METADATA.read_text()


def test_save_refuses_overwrite(tmp_path):
    path = save_specs([GOOD], tmp_path / "p.jsonl")
    with pytest.raises(FileExistsError, match="overwrite=True"):
        save_specs([GOOD, GOOD], path)
    assert len(load_specs(path)) == 1
    save_specs([GOOD, GOOD], path, overwrite=True)
    assert len(load_specs(path)) == 2


def test_save_validates(tmp_path):
    with pytest.raises(SpecError, match=r"specs\[1\].*include\[0\]\.count"):
        save_specs([GOOD, {**GOOD, "include": [{"class": "circle", "count": 0}]}], tmp_path / "p.jsonl")
    assert not (tmp_path / "p.jsonl").exists()
