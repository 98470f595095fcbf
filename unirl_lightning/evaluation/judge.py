"""A GenEval judge: a detector plus the official scoring rules, over batches of images."""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import torch

from unirl_lightning.evaluation.detection import Detector
from unirl_lightning.evaluation.geneval import GenEvalResult, evaluate


def spec_classes(specs: Sequence[Mapping[str, Any]]) -> list[str]:
    """The class names the specs mention (include and exclude), first-seen order: what an
    open-vocabulary detector must look for."""
    names = [c["class"] for s in specs for c in [*s.get("include", []), *s.get("exclude", [])]]
    return list(dict.fromkeys(names))


def score_images(
    images: torch.Tensor, specs: Sequence[Mapping[str, Any]], detector: Detector, **eval_kwargs: Any
) -> list[GenEvalResult]:
    """Detect and score: images uint8 `[N, 3, H, W]`, one spec per image -> N GenEval verdicts.
    `eval_kwargs` go to `evaluate` (threshold, counting_threshold, max_objects)."""
    if len(images) != len(specs):
        raise ValueError(f"got {len(images)} images for {len(specs)} specs; pass one spec per image")
    if len(specs) == 0:
        return []
    detections = detector(images.cpu(), classes=spec_classes(specs))
    return [evaluate(s, d, **eval_kwargs) for s, d in zip(specs, detections)]


class GenEvalJudge:
    """Scores images against GenEval specs with `detector` (e.g. `worlds.WorldDetector`, the synthetic
    world's exact one, or `evaluation.PretrainedDetector`)."""

    def __init__(self, detector: Detector):
        self.detector = detector

    def __call__(self, images: torch.Tensor, specs: Sequence[Mapping[str, Any]]) -> list[GenEvalResult]:
        """images uint8 `[N, 3, H, W]`, one spec each -> one result each."""
        return score_images(images, specs, self.detector)

    def correct(self, images: torch.Tensor, specs: Sequence[Mapping[str, Any]]) -> torch.Tensor:
        """bool `[N]`: the official GenEval verdict per image."""
        return torch.tensor([r.correct for r in self(images, specs)], dtype=torch.bool)
