"""Policies: one file per model family, all behind `UnifiedPolicy` (base.py)."""

from unirl_lightning.models.base import AnswerRollout, ImageRollout, UnifiedPolicy
from unirl_lightning.models.tiny import TinyConfig, TinyUnifiedModel

__all__ = ["AnswerRollout", "ImageRollout", "UnifiedPolicy", "TinyConfig", "TinyUnifiedModel"]
