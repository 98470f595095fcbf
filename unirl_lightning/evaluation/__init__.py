"""GenEval scoring rules, detectors and torchmetrics metrics (GenEval accuracy, imbalance).

The transformers detectors (`Mask2FormerDetector`: GenEval's official Mask2Former + CLIP pipeline;
`TransformersDetector`: open-vocabulary OWLv2 + CLIP) are imported on first access, so
`import unirl_lightning.evaluation` does not pay for transformers.
"""

from __future__ import annotations

from typing import Any

from unirl_lightning.evaluation.detection import Detection, Detector
from unirl_lightning.evaluation.geneval import GenEvalResult, evaluate, relative_position, validate_spec
from unirl_lightning.evaluation.metrics import GenEvalScore, ImbalanceScore

__all__ = [
    "Detection",
    "Detector",
    "GenEvalResult",
    "GenEvalScore",
    "ImbalanceScore",
    "TransformersDetector",
    "PretrainedDetector",
    "Mask2FormerDetector",
    "PretrainedMask2FormerDetector",
    "evaluate",
    "relative_position",
    "validate_spec",
]


def __getattr__(name: str) -> Any:
    if name in ("TransformersDetector", "PretrainedDetector"):  # transformers on first use
        from unirl_lightning.evaluation import detectors

        return getattr(detectors, name)
    if name in ("Mask2FormerDetector", "PretrainedMask2FormerDetector"):
        from unirl_lightning.evaluation import mask2former

        return getattr(mask2former, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
