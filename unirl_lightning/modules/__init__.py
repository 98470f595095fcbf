"""The recipes: LightningModules that orchestrate rollout -> reward -> loss -> log.

Bases: `RecipeModule` (base.py: policy, warm start, optimiser, FSDP2, saving), `PolicyModule`
(unified.py: unified models' validation) and `FlowPolicyModule` (flow_base.py: flow models').
"""

from unirl_lightning.modules.base import RecipeModule
from unirl_lightning.modules.flow_base import FlowPolicyModule
from unirl_lightning.modules.flow_grpo import FlowGRPO
from unirl_lightning.modules.flow_pretrain import FlowWarmStart
from unirl_lightning.modules.grpo import DiscreteGRPO
from unirl_lightning.modules.pretrain import WarmStartPretrain
from unirl_lightning.modules.sft import UniRLSFT
from unirl_lightning.modules.unified import PolicyModule
from unirl_lightning.modules.unigrpo import UniGRPO

__all__ = [
    "RecipeModule",
    "PolicyModule",
    "FlowPolicyModule",
    "WarmStartPretrain",
    "FlowWarmStart",
    "UniRLSFT",
    "DiscreteGRPO",
    "FlowGRPO",
    "UniGRPO",
]
