"""Binary masks of the world's shape classes, at any box size.

All tests are done in exact integer arithmetic on pixel centres, so a shape drawn by the renderer
and the detector's template at the same box size are bit-identical.
"""

from __future__ import annotations

from functools import lru_cache

import torch

from unirl_lightning.worlds.vocab import SHAPES


def cross_arm_width(side: int) -> int:
    """Arm width of the cross for a box side: about a third, with the side's parity so it is centred."""
    width = round(side / 3)
    if (width - side) % 2:  # move to the nearer integer of the right parity
        width = width + 1 if side / 3 > width else width - 1
    return max(1 if side % 2 else 2, min(width, side))


@lru_cache(maxsize=256)
def _mask(shape: str, h: int, w: int) -> torch.Tensor:
    y = torch.arange(h).view(h, 1)
    x = torch.arange(w).view(1, w)
    # Doubled, centred pixel-centre coordinates: dx in (-w, w), dy in (-h, h), all integers.
    dx = 2 * x + 1 - w
    dy = 2 * y + 1 - h
    if shape == "square":
        m = torch.ones(h, w, dtype=torch.bool)
    elif shape == "circle":
        # (dx/w)^2 + (dy/h)^2 <= 1: an inscribed disc (an ellipse in non-square boxes).
        m = dx.pow(2) * h * h + dy.pow(2) * w * w <= w * w * h * h
    elif shape == "triangle":
        # Apex up: the half-width at row y grows to the full width at the bottom row.
        m = dx.abs() * h <= (y + 1) * w
    elif shape == "cross":
        m = (dx.abs() <= cross_arm_width(w)) | (dy.abs() <= cross_arm_width(h))
    else:
        raise ValueError(f"unknown shape {shape!r}; expected one of {SHAPES}")
    return m.expand(h, w).contiguous()


def shape_mask(shape: str, size: int | tuple[int, int]) -> torch.Tensor:
    """Mask of `shape` filling a box of `size` (side, or (height, width)): bool `[h, w]`.

    square: filled; circle: inscribed disc; triangle: apex up, base on the bottom row;
    cross: a centred plus with arms about a third of the side wide. Returns a fresh tensor.
    """
    h, w = (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))
    if h < 1 or w < 1:
        raise ValueError(f"shape size must be positive, got {size!r}")
    return _mask(shape, h, w).clone()


def shape_templates(size: int | tuple[int, int]) -> torch.Tensor:
    """All shapes' masks at one box size, in SHAPES order: bool `[len(SHAPES), h, w]`."""
    return torch.stack([shape_mask(s, size) for s in SHAPES])
