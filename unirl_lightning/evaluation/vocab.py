"""GenEval's vocabulary: its ten colours, relations, numbers, six tasks, and the official constants
and prompt metadata shipped with the package (`data/geneval/`)."""

from __future__ import annotations

import json
from pathlib import Path

#: GenEval's ten colours, in GenEval's order.
COLORS: tuple[str, ...] = (
    "red",
    "orange",
    "yellow",
    "green",
    "blue",
    "purple",
    "pink",
    "brown",
    "black",
    "white",
)

#: GenEval's background grey (#999), what the colour classifier sees outside an object's mask.
BACKGROUND: tuple[int, int, int] = (153, 153, 153)

#: GenEval's relations, numbers and templates (the official constants, for the prompt generator).
POSITIONS: tuple[str, ...] = ("left of", "right of", "above", "below")
#: Each relation's mirror: "A left of B" says what "B right of A" says.
OPPOSITE_POSITION: dict[str, str] = {
    "left of": "right of",
    "right of": "left of",
    "above": "below",
    "below": "above",
}
NUMBERS: tuple[str, ...] = (
    "zero",
    "one",
    "two",
    "three",
    "four",
    "five",
    "six",
    "seven",
    "eight",
    "nine",
    "ten",
)

#: GenEval's six tasks.
TASKS: tuple[str, ...] = ("single_object", "two_object", "counting", "colors", "position", "color_attr")

#: The official GenEval prompt metadata (553 prompts) and constants, shipped with the package.
GENEVAL_DATA_DIR = Path(__file__).resolve().parent.parent / "data" / "geneval"


def load_geneval_constants(path: str | Path | None = None) -> dict:
    """GenEval's constants.json (COCO names, colours, templates, defaults)."""
    path = Path(path) if path is not None else GENEVAL_DATA_DIR / "constants.json"
    if not path.is_file():
        raise FileNotFoundError(f"GenEval constants not found at {path}; pass the path to constants.json")
    return json.loads(path.read_text())
