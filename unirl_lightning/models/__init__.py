"""Policies: one interface per kind (unified: base.py, flow: flow/base.py, text: text/policies.py)
and one file per model family behind it."""

from unirl_lightning.models.base import AnswerRollout, ImageRollout, UnifiedPolicy
from unirl_lightning.models.flow import (
    DiffusersFlowPolicy,
    DiffusersFluxPolicy,
    FlowPolicy,
    FlowRollout,
    TinyFlowConfig,
    TinyFlowModel,
)
from unirl_lightning.models.text import (
    HFTextPolicy,
    TextPolicy,
    TextRollout,
    TinyTextConfig,
    TinyTextPolicy,
)
from unirl_lightning.models.tiny import TinyConfig, TinyUnifiedModel

__all__ = [
    "AnswerRollout",
    "ImageRollout",
    "UnifiedPolicy",
    "TinyConfig",
    "TinyUnifiedModel",
    "JanusPolicy",
    "FlowPolicy",
    "FlowRollout",
    "TinyFlowConfig",
    "TinyFlowModel",
    "DiffusersFlowPolicy",
    "DiffusersFluxPolicy",
    "TextPolicy",
    "TextRollout",
    "TinyTextConfig",
    "TinyTextPolicy",
    "HFTextPolicy",
]


def __getattr__(name: str):
    """Janus is imported on first use (it pulls in transformers' Janus classes)."""
    if name == "JanusPolicy":
        from unirl_lightning.models.janus import JanusPolicy

        return JanusPolicy
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
