"""The detection record shared by every detector and by GenEval scoring."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping, Protocol, Sequence, runtime_checkable

import torch

Box = tuple[float, float, float, float]


@dataclass
class Detection:
    """One detected object, GenEval style.

    `box` is (x1, y1, x2, y2) in pixels, y pointing down; `mask` an optional bool `[H, W]`;
    `color` the detector's colour verdict (one of GenEval's ten) or None when not classified.
    """

    label: str
    score: float
    box: Box
    color: str | None = None
    mask: torch.Tensor | None = field(default=None, repr=False)

    @classmethod
    def from_any(cls, d: "Detection | Mapping[str, Any]") -> "Detection":
        """Accepts a Detection or a mapping with the same keys (label, score, box, color?, mask?)."""
        if isinstance(d, Detection):
            return d
        if not isinstance(d, Mapping):
            raise TypeError(f"a detection must be a Detection or a mapping, got {type(d).__name__}")
        missing = [k for k in ("label", "score", "box") if k not in d]
        if missing:
            raise ValueError(f"detection {dict(d)!r} lacks field(s) {missing}; expected label, score, box")
        return cls(
            label=d["label"], score=d["score"], box=tuple(d["box"]), color=d.get("color"), mask=d.get("mask")
        )


@runtime_checkable
class Detector(Protocol):
    """Maps images to GenEval-style detections.

    images: uint8 `[N, 3, H, W]`; `classes`: the labels to look for (open-vocabulary detectors
    need them, closed ones may ignore them). Returns one list of detections per image.
    """

    def __call__(
        self, images: torch.Tensor, classes: Sequence[str] | None = None
    ) -> list[list[Detection]]: ...
