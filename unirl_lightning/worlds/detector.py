"""An exact, programmatic GenEval detector for the synthetic world.

Pixels are snapped to the nearest palette colour or the background (too far from all: unknown),
same-colour pixels are grouped into 4-connected components, and each component is classified by
IoU with every shape's template drawn at the component's box size. The score multiplies that IoU
by a purity term (clean pixels around the object) and an aspect term (world shapes are square),
so rendered objects score exactly 1.0 while merged, blurred or noisy blobs score low.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from unirl_lightning.evaluation.detection import Detection
from unirl_lightning.worlds.render import WorldConfig
from unirl_lightning.worlds.shapes import shape_templates
from unirl_lightning.worlds.vocab import BACKGROUND, COLORS, PALETTE, SHAPES

UNKNOWN, BG = -1, 0  # pixel classes; palette colours are 1..len(COLORS) in COLORS order


def classify_pixels(images: torch.Tensor, threshold: float) -> torch.Tensor:
    """uint8 `[N, 3, H, W]` -> long `[N, H, W]`: -1 unknown, 0 background, 1 + index into COLORS.

    A pixel farther than `threshold` (RGB L2) from every reference colour is unknown.
    """
    refs = [BACKGROUND] + [PALETTE[c] for c in COLORS]
    refs = torch.tensor(refs, dtype=torch.float32, device=images.device)
    x = images.float()
    dist2 = (x.unsqueeze(1) - refs.view(1, -1, 3, 1, 1)).pow(2).sum(2)  # [N, 1+C, H, W]
    best, cls = dist2.min(1)
    return torch.where(best <= threshold * threshold, cls, torch.full_like(cls, UNKNOWN))


def connected_components(cls: torch.Tensor) -> torch.Tensor:
    """4-connected components of equal positive class: long `[N, H, W]`, 0 off-foreground.

    Each component gets the largest (1-based) flat pixel index among its pixels. Max-label
    propagation to neighbours plus pointer jumping (a label names a pixel of the same component,
    whose label is at least as large), iterated to a fixed point.
    """
    n, h, w = cls.shape
    fg = cls > 0
    lab = torch.where(fg, torch.arange(1, h * w + 1, device=cls.device).view(1, h, w), 0)
    same_x = fg[:, :, 1:] & (cls[:, :, 1:] == cls[:, :, :-1])  # pixel (y, x+1) joins (y, x)
    same_y = fg[:, 1:, :] & (cls[:, 1:, :] == cls[:, :-1, :])  # pixel (y+1, x) joins (y, x)
    for _ in range(h * w):
        new = lab.clone()
        new[:, :, 1:] = torch.maximum(new[:, :, 1:], torch.where(same_x, lab[:, :, :-1], 0))
        new[:, :, :-1] = torch.maximum(new[:, :, :-1], torch.where(same_x, lab[:, :, 1:], 0))
        new[:, 1:, :] = torch.maximum(new[:, 1:, :], torch.where(same_y, lab[:, :-1, :], 0))
        new[:, :-1, :] = torch.maximum(new[:, :-1, :], torch.where(same_y, lab[:, 1:, :], 0))
        flat = new.view(n, h * w)
        jumped = flat.gather(1, (flat - 1).clamp(min=0)).view(n, h, w)
        new = torch.where(fg, torch.maximum(new, jumped), 0)
        if torch.equal(new, lab):
            break
        lab = new
    return lab


class WorldDetector:
    """GenEval-style detector for rendered scenes (implements the `Detector` protocol).

    color_threshold: RGB distance beyond which a pixel is unknown (palette colours are >= ~100
    apart); min_area / min_side: components smaller than this (pixels / box side) are specks and
    dropped; max_side: components with a longer box side are not objects of this world (a canvas
    flooded with one colour must not count as a big square); defaults: min_side = max(3, half the
    smallest shape size), max_side = twice the largest.

    Score = IoU(component, best template) * purity * aspect, in [0, 1]: purity is the share of
    pixels in the box grown by one pixel that are the component or background (blur halos, noise
    and neighbours lower it); aspect = (short side / long side)^2 (merged blobs are elongated).
    """

    def __init__(
        self,
        config: WorldConfig | None = None,
        color_threshold: float = 60.0,
        min_area: int = 8,
        min_side: int | None = None,
        max_side: int | None = None,
    ) -> None:
        self.config = config or WorldConfig()
        self.color_threshold = float(color_threshold)
        self.min_area = int(min_area)
        self.min_side = int(min_side) if min_side is not None else max(3, min(self.config.sizes) // 2)
        self.max_side = int(max_side) if max_side is not None else 2 * max(self.config.sizes)
        self._templates: dict[tuple[int, int], np.ndarray] = {}

    def _template(self, h: int, w: int) -> np.ndarray:
        """Every shape's mask at box size (h, w): bool `[len(SHAPES), h, w]`, cached."""
        if (h, w) not in self._templates:
            self._templates[(h, w)] = shape_templates((h, w)).numpy()
        return self._templates[(h, w)]

    @staticmethod
    def _check(images: torch.Tensor) -> None:
        if not isinstance(images, torch.Tensor) or images.dtype != torch.uint8 or images.dim() != 4 \
                or images.shape[1] != 3 or images.shape[2] < 1 or images.shape[3] < 1:
            got = (images.dtype, tuple(images.shape)) if isinstance(images, torch.Tensor) else type(images)
            raise ValueError(f"images must be a uint8 tensor [N, 3, H, W] (RGB, 0-255), got {got}")

    @torch.no_grad()
    def __call__(self, images: torch.Tensor, classes: Sequence[str] | None = None) -> list[list[Detection]]:
        """images uint8 `[N, 3, H, W]` -> per image, detections sorted by score (highest first)."""
        self._check(images)
        images = images.cpu()
        n, _, h, w = images.shape
        if n == 0:
            return []
        cls = classify_pixels(images, self.color_threshold)
        lab = connected_components(cls)
        keep_labels = set(classes) if classes is not None else None

        # Per-component area, box and colour, vectorised over the batch via image-offset labels.
        stride = h * w + 1
        fgm = lab.flatten() > 0
        g = (lab + torch.arange(n).view(n, 1, 1) * stride).flatten()[fgm]
        ys = torch.arange(h).view(1, h, 1).expand(n, h, w).flatten()[fgm]
        xs = torch.arange(w).view(1, 1, w).expand(n, h, w).flatten()[fgm]
        size = n * stride
        area = torch.bincount(g, minlength=size)
        y1 = torch.full((size,), h).scatter_reduce(0, g, ys, "amin")
        x1 = torch.full((size,), w).scatter_reduce(0, g, xs, "amin")
        y2 = torch.full((size,), -1).scatter_reduce(0, g, ys, "amax") + 1
        x2 = torch.full((size,), -1).scatter_reduce(0, g, xs, "amax") + 1
        # Any pixel's class gives the component's colour: components are single-colour by construction.
        color = torch.zeros(size, dtype=torch.long).scatter_(0, g, cls.flatten()[fgm])
        side_lo, side_hi = torch.minimum(y2 - y1, x2 - x1), torch.maximum(y2 - y1, x2 - x1)
        ok = (area >= self.min_area) & (side_lo >= self.min_side) & (side_hi <= self.max_side)
        keep = ok.nonzero().flatten()
        boxes = torch.stack([t[keep] for t in (y1, x1, y2, x2, color)], 1).tolist()

        # Per-component shape scoring in numpy: tiny arrays, where numpy's per-call cost is far lower.
        lab_np, cls_np = lab.numpy(), cls.numpy()
        out: list[list[Detection]] = [[] for _ in range(n)]
        for gl, (by1, bx1, by2, bx2, ci) in zip(keep.tolist(), boxes):
            i, label = divmod(gl, stride)
            bh, bw = by2 - by1, bx2 - bx1
            comp = lab_np[i, by1:by2, bx1:bx2] == label
            tmpl = self._template(bh, bw)
            iou = (tmpl & comp).sum((1, 2)) / (tmpl | comp).sum((1, 2))
            best = int(iou.argmax())
            shape = SHAPES[best]
            if keep_labels is not None and shape not in keep_labels:
                continue
            # Purity: pixels in the box grown by one must be this component or background.
            gy1, gx1, gy2, gx2 = max(by1 - 1, 0), max(bx1 - 1, 0), min(by2 + 1, h), min(bx2 + 1, w)
            clean = ((lab_np[i, gy1:gy2, gx1:gx2] == label) | (cls_np[i, gy1:gy2, gx1:gx2] == BG)).mean()
            aspect = (min(bh, bw) / max(bh, bw)) ** 2
            score = float(iou[best] * clean * aspect)
            mask = torch.from_numpy(lab_np[i] == label)
            box = (float(bx1), float(by1), float(bx2), float(by2))
            out[i].append(Detection(shape, score, box, COLORS[ci - 1], mask))
        for dets in out:
            dets.sort(key=lambda d: -d.score)
        return out
