"""GenEval prompt specs (``evaluation_metadata.jsonl``): load, validate, save.

A spec is one JSON object per line::

    {"tag": "position",
     "include": [{"class": "kite", "count": 1},
                 {"class": "cup", "count": 1, "position": ["above", 0]}],
     "exclude": [{"class": "cup", "count": 2}],          # optional
     "prompt": "a photo of a cup above a kite"}

Every problem is a :class:`SpecError` naming the file, the 1-based line, the field and the fix.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from unirl_lightning.evaluation.vocab import load_geneval_constants
from unirl_lightning.worlds.vocab import COLORS, GENEVAL_DATA_DIR, POSITIONS, TASKS

__all__ = [
    "SpecError",
    "OFFICIAL_METADATA",
    "validate_spec",
    "load_specs",
    "save_specs",
    "load_official_specs",
]

#: The official GenEval prompt file (553 prompts over COCO's 80 classes).
OFFICIAL_METADATA = GENEVAL_DATA_DIR / "evaluation_metadata.jsonl"

_INCLUDE_KEYS = ("class", "count", "color", "position")
_EXCLUDE_KEYS = ("class", "count")
_EXAMPLE = '{"class": "dog", "count": 1}'


class SpecError(ValueError):
    """A malformed GenEval spec; the message says where, which field, and what to do."""


def _is_int(value: Any) -> bool:
    # bool is an int subclass; `true` is never a valid count or index.
    return isinstance(value, int) and not isinstance(value, bool)


def _check_clause(
    clause: Any,
    field: str,
    allowed: Sequence[str],
    vocabulary: frozenset[str] | None,
    fail,
) -> None:
    if not isinstance(clause, dict):
        fail(f"{field} must be an object like {_EXAMPLE}, got {clause!r}")
    unknown = [k for k in clause if k not in allowed]
    if unknown:
        fail(f"{field} has unknown key(s) {unknown}; allowed keys are {list(allowed)}")
    if "class" not in clause:
        fail(f"{field} is missing \"class\"; add the object name, e.g. \"class\": \"dog\"")
    name = clause["class"]
    if not isinstance(name, str) or not name.strip():
        fail(f"{field}.class must be a non-empty string, got {name!r}")
    if vocabulary is not None and name not in vocabulary:
        examples = ", ".join(sorted(vocabulary)[:6])
        fail(
            f"{field}.class {name!r} is not in the vocabulary ({len(vocabulary)} names, e.g. {examples}); "
            "fix the name or pass the vocabulary this file was written for"
        )
    if "count" not in clause:
        fail(f"{field} is missing \"count\"; add a positive int, e.g. \"count\": 1")
    count = clause["count"]
    if not _is_int(count) or count < 1:
        fail(f"{field}.count must be a positive int, got {count!r}")


def validate_spec(spec: Any, vocabulary: Iterable[str] | None = None, where: str = "") -> None:
    """Raise :class:`SpecError` unless ``spec`` is a well-formed GenEval spec.

    ``vocabulary``: allowed class names (None: any non-empty string). ``where``: message prefix,
    e.g. ``"prompts.jsonl:12"``.
    """
    vocab = None if vocabulary is None else frozenset(vocabulary)
    prefix = f"{where}: " if where else ""

    def fail(message: str) -> None:
        raise SpecError(prefix + message)

    if not isinstance(spec, dict):
        fail(f"a spec must be a JSON object with tag, include and prompt, got {type(spec).__name__}")
    tag = spec.get("tag")
    if tag not in TASKS:
        fail(f"tag must be one of {list(TASKS)}, got {tag!r}")

    include = spec.get("include")
    if not isinstance(include, list) or not include:
        fail(f"include must be a non-empty list of clauses like [{_EXAMPLE}], got {include!r}")
    for i, clause in enumerate(include):
        field = f"include[{i}]"
        _check_clause(clause, field, _INCLUDE_KEYS, vocab, fail)
        if "color" in clause and clause["color"] not in COLORS:
            fail(f"{field}.color must be one of GenEval's colours {list(COLORS)}, got {clause['color']!r}")
        if "position" in clause:
            pos = clause["position"]
            if not isinstance(pos, (list, tuple)) or len(pos) != 2:
                fail(f"{field}.position must be [relation, index], e.g. [\"left of\", 0], got {pos!r}")
            relation, index = pos
            if relation not in POSITIONS:
                fail(f"{field}.position[0] must be one of {list(POSITIONS)}, got {relation!r}")
            if not _is_int(index) or not 0 <= index < len(include) or index == i:
                fail(
                    f"{field}.position[1] must index another include clause (0..{len(include) - 1}, "
                    f"not {i} itself), got {index!r}"
                )

    if "exclude" in spec:
        exclude = spec["exclude"]
        if not isinstance(exclude, list):
            fail(f"exclude must be a list of clauses like [{_EXAMPLE}], got {exclude!r}")
        for i, clause in enumerate(exclude):
            _check_clause(clause, f"exclude[{i}]", _EXCLUDE_KEYS, vocab, fail)

    prompt = spec.get("prompt")
    if not isinstance(prompt, str) or not prompt.strip():
        fail(f"prompt must be a non-empty string (the text given to the generator), got {prompt!r}")


def load_specs(path: str | os.PathLike, vocabulary: Iterable[str] | None = None) -> list[dict]:
    """Read and validate a GenEval metadata file (one JSON object per line; blank lines skipped)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"GenEval spec file not found: {path}")
    vocab = frozenset(vocabulary) if vocabulary is not None else None
    specs: list[dict] = []
    with path.open(encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                spec = json.loads(line)
            except json.JSONDecodeError as err:
                raise SpecError(
                    f"{where}: invalid JSON ({err.msg} at column {err.colno}); "
                    "each non-blank line must be one complete JSON object"
                ) from None
            validate_spec(spec, vocab, where=where)
            specs.append(spec)
    if not specs:
        raise SpecError(f"{path}: no specs found; the file must hold one JSON spec per line")
    return specs


def save_specs(specs: Iterable[dict], path: str | os.PathLike, overwrite: bool = False) -> Path:
    """Validate and write ``specs`` as JSON lines; refuses to replace a file unless ``overwrite``."""
    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(
            f"{path} already exists; pass overwrite=True to replace it or choose another path"
        )
    specs = list(specs)
    for i, spec in enumerate(specs):
        validate_spec(spec, where=f"specs[{i}] (line {i + 1} of {path})")
    path.parent.mkdir(parents=True, exist_ok=True)
    # Write beside the target and rename, so a crash never leaves a half-written spec file.
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(json.dumps(spec) + "\n" for spec in specs), encoding="utf-8")
    os.replace(tmp, path)
    return path


def load_official_specs() -> list[dict]:
    """The official GenEval prompts (553), validated against GenEval's COCO vocabulary."""
    names = load_geneval_constants()["geneval_object_names"]
    return load_specs(OFFICIAL_METADATA, vocabulary=names)
