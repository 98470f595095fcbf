"""Policies: one file per model family, all behind `UnifiedPolicy` (base.py)."""

from unirl_lightning.models.base import AnswerRollout, ImageRollout, UnifiedPolicy
from unirl_lightning.models.tiny import TinyConfig, TinyUnifiedModel

__all__ = ["AnswerRollout", "ImageRollout", "UnifiedPolicy", "TinyConfig", "TinyUnifiedModel", "JanusPolicy"]


def __getattr__(name: str):
    """Family adapters are imported on first use (they pull in transformers / diffusers)."""
    if name in ("JanusPolicy", "tiny_janus_components"):
        from unirl_lightning.models import janus

        return getattr(janus, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
