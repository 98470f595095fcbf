"""Render GenEval specs as synthetic scenes, with their ground-truth detections.

A scene is a #999 grey canvas with coloured shapes placed on a pixel grid. Every include clause
of the spec is realised with exactly `count` objects of its class (in its colour, or random
palette colours), placed without overlap, a gap of free grid cells between any two objects, and
position clauses satisfied under GenEval's own `relative_position` rule (evaluation.geneval).
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import torch

from unirl_lightning.evaluation.detection import Detection
from unirl_lightning.evaluation.geneval import relative_position
from unirl_lightning.worlds.shapes import shape_mask
from unirl_lightning.worlds.vocab import (
    BACKGROUND,
    COLORS,
    DEFAULT_CANVAS,
    PALETTE,
    POSITIONS,
    SHAPES,
)

Seed = int | torch.Generator | None


@dataclass(frozen=True)
class WorldConfig:
    """Geometry of the synthetic world.

    canvas: image side in px; sizes: allowed shape sides in px (multiples of `grid`, so the patch
    tokenizer is exact); grid: placement grid in px; max_objects: most objects in one scene;
    gap: free grid cells kept between any two objects (>= 1 keeps connected components apart);
    max_tries: placement restarts before a spec is declared unplaceable.
    """

    canvas: int = DEFAULT_CANVAS
    sizes: tuple[int, ...] = (8,)
    grid: int = 4
    max_objects: int = 4
    gap: int = 1
    max_tries: int = 200

    def __post_init__(self) -> None:
        object.__setattr__(self, "sizes", tuple(int(s) for s in self.sizes))
        if self.grid < 1 or self.canvas < 1 or self.canvas % self.grid:
            raise ValueError(f"canvas ({self.canvas}) must be a positive multiple of grid ({self.grid})")
        if not self.sizes:
            raise ValueError("sizes must name at least one shape side length")
        bad = [s for s in self.sizes if s < self.grid or s % self.grid or s > self.canvas]
        if bad:
            raise ValueError(
                f"sizes {bad} invalid: each must be a multiple of grid ({self.grid}) between {self.grid} "
                f"and canvas ({self.canvas})"
            )
        if self.max_objects < 1 or self.gap < 0 or self.max_tries < 1:
            raise ValueError("max_objects and max_tries must be >= 1 and gap >= 0")

    @property
    def capacity(self) -> int:
        """Objects of the smallest size that surely fit (a regular grid arrangement with gaps)."""
        cells, side = self.canvas // self.grid, min(self.sizes) // self.grid
        per_axis = (cells + self.gap) // (side + self.gap)
        return per_axis * per_axis


@dataclass(frozen=True)
class _Clause:
    cls: str
    count: int
    color: str | None
    position: tuple[str, int] | None


@dataclass(frozen=True)
class _Object:
    clause: int
    shape: str
    color: str
    x: int
    y: int
    size: int

    @property
    def box(self) -> tuple[float, float, float, float]:
        return (float(self.x), float(self.y), float(self.x + self.size), float(self.y + self.size))


def _parse_spec(spec: Mapping[str, Any], config: WorldConfig) -> list[_Clause]:
    """Checks a GenEval spec against the world's vocabulary; returns its include clauses."""
    if not isinstance(spec, Mapping) or not isinstance(spec.get("include"), Sequence) or not spec["include"]:
        raise ValueError(f"spec must be a mapping with a non-empty 'include' list, got {spec!r}")
    include = spec["include"]
    clauses: list[_Clause] = []
    for i, c in enumerate(include):
        where = f"include[{i}]"
        if not isinstance(c, Mapping):
            raise ValueError(f"{where} must be a mapping, got {c!r}")
        if c.get("class") not in SHAPES:
            raise ValueError(f"{where}.class = {c.get('class')!r} is not a world class; allowed: {SHAPES}")
        count = c.get("count", 1)
        if not isinstance(count, numbers.Integral) or isinstance(count, bool) or count < 1:
            raise ValueError(f"{where}.count = {count!r} must be a positive int (<= {config.max_objects})")
        color = c.get("color")
        if color is not None and color not in PALETTE:
            raise ValueError(f"{where}.color = {color!r} is not a world colour; allowed: {COLORS}")
        pos = c.get("position")
        if pos is not None:
            ok = (
                isinstance(pos, Sequence) and len(pos) == 2 and pos[0] in POSITIONS
                and isinstance(pos[1], numbers.Integral) and 0 <= pos[1] < len(include) and pos[1] != i
            )
            if not ok:
                raise ValueError(
                    f"{where}.position = {pos!r} must be [relation, index] with relation in {POSITIONS} "
                    f"and index another clause in 0..{len(include) - 1}"
                )
            pos = (pos[0], int(pos[1]))
        clauses.append(_Clause(c["class"], int(count), color, pos))
    total = sum(c.count for c in clauses)
    limit = min(config.max_objects, config.capacity)
    if total > limit:
        raise ValueError(
            f"include counts sum to {total} objects, more than this world holds: max_objects="
            f"{config.max_objects}, canvas capacity={config.capacity} (canvas {config.canvas}, "
            f"sizes {config.sizes}, grid {config.grid}, gap {config.gap})"
        )
    for j, e in enumerate(spec.get("exclude", []) or []):
        if not isinstance(e, Mapping) or e.get("class") not in SHAPES:
            got = e.get("class") if isinstance(e, Mapping) else e
            raise ValueError(f"exclude[{j}].class = {got!r} is not a world class; allowed: {SHAPES}")
        n = sum(c.count for c in clauses if c.cls == e["class"])
        if not isinstance(e.get("count"), numbers.Integral) or n >= e["count"]:
            raise ValueError(
                f"exclude[{j}] = {dict(e)!r} contradicts the include clauses ({n} {e['class']}(s)); "
                f"exclude.count must be an int > {n}"
            )
    return clauses


def _generator(seed: Seed) -> torch.Generator | None:
    if seed is None or isinstance(seed, torch.Generator):
        return seed  # None: torch's global RNG, so seed_everything makes it reproducible
    return torch.Generator().manual_seed(int(seed))


def _randint(n: int, gen: torch.Generator | None) -> int:
    return int(torch.randint(n, (1,), generator=gen).item())


def _relations(box_a: tuple[float, ...], box_b: tuple[float, ...]) -> set[str]:
    # Imported late: evaluation.geneval imports worlds.vocab, whose package imports this module.
    return relative_position(box_a, box_b)


def _compatible(cand: _Object, placed: list[_Object], clauses: list[_Clause], gap_px: int) -> bool:
    """No overlap (with a gap) against every placed object, and every position clause between them holds."""
    for p in placed:
        apart = (
            cand.x + cand.size + gap_px <= p.x or p.x + p.size + gap_px <= cand.x
            or cand.y + cand.size + gap_px <= p.y or p.y + p.size + gap_px <= cand.y
        )
        if not apart:
            return False
        pos = clauses[cand.clause].position
        if pos is not None and pos[1] == p.clause and pos[0] not in _relations(cand.box, p.box):
            return False
        pos = clauses[p.clause].position
        if pos is not None and pos[1] == cand.clause and pos[0] not in _relations(p.box, cand.box):
            return False
    return True


def _place(clauses: list[_Clause], config: WorldConfig, gen: torch.Generator | None) -> list[_Object]:
    """Sequential placement, each object uniform over the positions still valid; restarts on dead ends."""
    gap_px = config.gap * config.grid
    for _ in range(config.max_tries):
        placed: list[_Object] = []
        for ci, clause in enumerate(clauses):
            for _ in range(clause.count):
                size = config.sizes[_randint(len(config.sizes), gen)]
                color = clause.color or COLORS[_randint(len(COLORS), gen)]
                steps = range(0, config.canvas - size + 1, config.grid)
                cands = [
                    o for y in steps for x in steps
                    if _compatible(o := _Object(ci, clause.cls, color, x, y, size), placed, clauses, gap_px)
                ]
                if not cands:
                    break
                placed.append(cands[_randint(len(cands), gen)])
            else:
                continue
            break  # dead end: restart
        else:
            return placed
    raise ValueError(
        f"could not place {[(c.cls, c.count, c.position) for c in clauses]} on a {config.canvas}px canvas "
        f"(sizes {config.sizes}, grid {config.grid}, gap {config.gap}) in {config.max_tries} tries"
    )


def _paint(objects: list[_Object], canvas: int) -> tuple[torch.Tensor, list[Detection]]:
    image = torch.tensor(BACKGROUND, dtype=torch.uint8).view(3, 1, 1).repeat(1, canvas, canvas)
    dets = []
    for o in objects:
        m = shape_mask(o.shape, o.size)
        region = image[:, o.y : o.y + o.size, o.x : o.x + o.size]  # a view: writes land in `image`
        region[:, m] = torch.tensor(PALETTE[o.color], dtype=torch.uint8).view(3, 1)
        full = torch.zeros(canvas, canvas, dtype=torch.bool)
        full[o.y : o.y + o.size, o.x : o.x + o.size] = m
        dets.append(Detection(label=o.shape, score=1.0, box=o.box, color=o.color, mask=full))
    return image, dets


def render(
    spec: Mapping[str, Any], seed: Seed = None, config: WorldConfig | None = None
) -> tuple[torch.Tensor, list[Detection]]:
    """Renders one scene satisfying `spec`.

    seed: an int, a torch.Generator (advanced in place), or None for torch's global RNG.
    Returns the image, uint8 `[3, canvas, canvas]`, and its ground-truth detections (score 1.0,
    box (x1, y1, x2, y2) with exclusive x2/y2, colour name, bool mask `[canvas, canvas]`).
    Raises ValueError for a spec outside the world's vocabulary or one that cannot be placed.
    """
    config = config or WorldConfig()
    clauses = _parse_spec(spec, config)
    return _paint(_place(clauses, config, _generator(seed)), config.canvas)


def render_batch(
    specs: Sequence[Mapping[str, Any]],
    seeds: Sequence[int] | int | torch.Generator | None = None,
    config: WorldConfig | None = None,
) -> tuple[torch.Tensor, list[list[Detection]]]:
    """Renders one scene per spec: uint8 `[N, 3, canvas, canvas]` and N lists of detections.

    seeds: one int per spec; or one int / Generator drawn from for the whole batch; or None
    (torch's global RNG).
    """
    config = config or WorldConfig()
    if isinstance(seeds, Sequence):
        if len(seeds) != len(specs):
            raise ValueError(f"got {len(seeds)} seeds for {len(specs)} specs; expected one seed per spec")
        gens = [_generator(s) for s in seeds]
    else:
        gen = _generator(seeds)
        gens = [gen] * len(specs)
    if not specs:
        return torch.zeros(0, 3, config.canvas, config.canvas, dtype=torch.uint8), []
    images, dets = zip(*(render(s, g, config) for s, g in zip(specs, gens)))
    return torch.stack(images), list(dets)
