"""GenEval scoring rules, detectors and torchmetrics metrics (GenEval accuracy, imbalance).

`TransformersDetector` is imported on first access, so `import unirl_lightning.evaluation`
does not pay for transformers.
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
    "evaluate",
    "relative_position",
    "validate_spec",
]


def __getattr__(name: str) -> Any:
    if name in ("TransformersDetector", "PretrainedDetector"):  # transformers on first use
        from unirl_lightning.evaluation import detectors

        return getattr(detectors, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
