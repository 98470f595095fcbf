"""The synthetic world's vocabulary: shape classes, the RGB of GenEval's ten colours, the canvas;
GenEval's own vocabulary (colours, relations, tasks) is re-exported from `evaluation.vocab`."""

from __future__ import annotations

from unirl_lightning.evaluation.vocab import (  # noqa: F401  (the world speaks GenEval's vocabulary)
    BACKGROUND,
    COLORS,
    GENEVAL_DATA_DIR,
    NUMBERS,
    OPPOSITE_POSITION,
    POSITIONS,
    TASKS,
    load_geneval_constants,
)

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
assert tuple(PALETTE) == COLORS

DEFAULT_CANVAS = 32
