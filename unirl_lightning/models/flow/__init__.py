"""Flow-matching image policies: the interface (base.py), diffusers transformers and pipelines
(transformer.py; SD3 / SD3.5 in sd3.py, FLUX in flux.py) and the built-in model (tiny.py)."""

from unirl_lightning.models.flow.base import (
    FlowPolicy,
    FlowRollout,
    Prompt,
    StepOutput,
    TextCondition,
)
from unirl_lightning.models.flow.flux import DiffusersFluxPolicy, FluxFlowPolicy
from unirl_lightning.models.flow.sd3 import DiffusersFlowPolicy, SD3FlowPolicy
from unirl_lightning.models.flow.tiny import (
    CellCodec,
    TinyFlowConfig,
    TinyFlowModel,
    WordTextEncoder,
)
from unirl_lightning.models.flow.transformer import (
    PipelineFlowPolicy,
    TransformerFlowPolicy,
)

__all__ = [
    "FlowPolicy", "FlowRollout", "Prompt", "StepOutput", "TextCondition", "TransformerFlowPolicy",
    "PipelineFlowPolicy", "SD3FlowPolicy", "DiffusersFlowPolicy", "FluxFlowPolicy", "DiffusersFluxPolicy",
    "TinyFlowConfig", "TinyFlowModel", "WordTextEncoder", "CellCodec",
]
