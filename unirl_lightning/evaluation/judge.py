"""A GenEval judge: a detector plus the official scoring rules, over batches of images."""

from __future__ import annotations

from typing import Sequence

import torch

from unirl_lightning.evaluation.detection import Detector
from unirl_lightning.evaluation.geneval import GenEvalResult, evaluate


class GenEvalJudge:
    """Scores images against GenEval specs. Default detector: the synthetic world's exact one."""

    def __init__(self, detector: Detector | None = None):
        if detector is None:
            from unirl_lightning.worlds.detector import WorldDetector

            detector = WorldDetector()
        self.detector = detector

    def __call__(self, images: torch.Tensor, specs: Sequence[dict]) -> list[GenEvalResult]:
        """images uint8 `[N, 3, H, W]`, one spec each -> one result each."""
        if images.shape[0] != len(specs):
            raise ValueError(f"{images.shape[0]} images but {len(specs)} specs; give one spec per image")
        classes = sorted({c["class"] for s in specs for c in s.get("include", []) + s.get("exclude", [])})
        detections = self.detector(images.cpu(), classes)
        return [evaluate(spec, dets) for spec, dets in zip(specs, detections)]

    def correct(self, images: torch.Tensor, specs: Sequence[dict]) -> torch.Tensor:
        """bool `[N]`: the official GenEval verdict per image."""
        return torch.tensor([r.correct for r in self(images, specs)], dtype=torch.bool)
