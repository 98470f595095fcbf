"""The recipes: LightningModules that orchestrate rollout -> reward -> loss -> log.

Bases: `RecipeModule` (base.py: policy, warm start, optimiser, FSDP2, saving), `PolicyModule`
(unified.py: unified models' validation), `FlowPolicyModule` (flow_base.py: flow models') and
`ForwardProcessRL` (forward_rl.py: the likelihood-free flow recipes DiffusionNFT and AWM).
"""

from unirl_lightning.modules.awm import AdvantageWeightedMatching
from unirl_lightning.modules.base import RecipeModule
from unirl_lightning.modules.diffusion_nft import DiffusionNFT
from unirl_lightning.modules.flow_base import FlowPolicyModule
from unirl_lightning.modules.flow_grpo import FlowGRPO
from unirl_lightning.modules.flow_pretrain import FlowWarmStart
from unirl_lightning.modules.forward_rl import ForwardProcessRL
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
    "ForwardProcessRL",
    "DiffusionNFT",
    "AdvantageWeightedMatching",
    "UniGRPO",
]
