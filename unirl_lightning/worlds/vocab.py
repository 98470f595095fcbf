"""The synthetic world's vocabulary: shape classes, GenEval's ten colours, the canvas."""

from __future__ import annotations

import json
from pathlib import Path

#: Shape classes of the synthetic world (its "object names", like COCO's 80 for real models).
SHAPES: tuple[str, ...] = ("square", "circle", "triangle", "cross")

#: GenEval's ten colours, in GenEval's order, with the RGB the renderer paints them in.
#: Chosen to be far apart from each other and from the #999 background.
PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (220, 20, 20),
    "orange": (255, 140, 0),
    "yellow": (250, 230, 30),
    "green": (20, 170, 40),
    "blue": (30, 60, 230),
    "purple": (130, 30, 170),
    "pink": (255, 120, 200),
    "brown": (110, 60, 20),
    "black": (10, 10, 10),
    "white": (250, 250, 250),
}
COLORS: tuple[str, ...] = tuple(PALETTE)

#: GenEval's background grey (#999).
BACKGROUND: tuple[int, int, int] = (153, 153, 153)

#: GenEval's relations, numbers and templates (the official constants, for the prompt generator).
POSITIONS: tuple[str, ...] = ("left of", "right of", "above", "below")
#: Each relation's mirror: "A left of B" says what "B right of A" says.
OPPOSITE_POSITION: dict[str, str] = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}
NUMBERS: tuple[str, ...] = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten")

#: GenEval's six tasks.
TASKS: tuple[str, ...] = ("single_object", "two_object", "counting", "colors", "position", "color_attr")

DEFAULT_CANVAS = 32


#: The official GenEval prompt metadata (553 prompts) and constants, shipped with the package.
GENEVAL_DATA_DIR = Path(__file__).resolve().parent.parent / "data" / "geneval"


def load_geneval_constants(path: str | Path | None = None) -> dict:
    """GenEval's constants.json (COCO names, colours, templates, defaults)."""
    path = Path(path) if path is not None else GENEVAL_DATA_DIR / "constants.json"
    if not path.is_file():
        raise FileNotFoundError(f"GenEval constants not found at {path}; pass the path to constants.json")
    return json.loads(path.read_text())
