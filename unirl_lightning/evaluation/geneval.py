"""GenEval scoring rules (official), plus Flow-GRPO-style strict and partial credit.

The position rule follows GenEval's evaluation script: box centres, a margin of
`margin * (dim_a + dim_b)` per axis, then the normalised offset's sign beyond 0.5.
"""

from __future__ import annotations

import math

from unirl_lightning.evaluation.detection import Box


def relative_position(box_a: Box, box_b: Box, margin: float = 0.1) -> set[str]:
    """Relations of `box_a` with respect to `box_b`: a subset of {"left of", "right of", "above", "below"}.

    Boxes are (x1, y1, x2, y2) in pixels, y down. Empty when the centres are within the margin.
    """
    ca = ((box_a[0] + box_a[2]) / 2, (box_a[1] + box_a[3]) / 2)
    cb = ((box_b[0] + box_b[2]) / 2, (box_b[1] + box_b[3]) / 2)
    dims_a = (box_a[2] - box_a[0], box_a[3] - box_a[1])
    dims_b = (box_b[2] - box_b[0], box_b[3] - box_b[1])
    offset = (ca[0] - cb[0], ca[1] - cb[1])
    revised = [
        max(abs(o) - margin * (da + db), 0.0) * math.copysign(1.0, o) if o != 0 else 0.0
        for o, da, db in zip(offset, dims_a, dims_b)
    ]
    if all(abs(r) < 1e-3 for r in revised):
        return set()
    norm = math.hypot(*offset)  # GenEval divides the revised offset by the raw offset's norm
    dx, dy = revised[0] / norm, revised[1] / norm
    rels: set[str] = set()
    if dx < -0.5:
        rels.add("left of")
    if dx > 0.5:
        rels.add("right of")
    if dy < -0.5:
        rels.add("above")
    if dy > 0.5:
        rels.add("below")
    return rels
