"""The recipes: LightningModules that orchestrate rollout -> reward -> loss -> log."""

from unirl_lightning.modules.recipe import RecipeModule
from unirl_lightning.modules.common import PolicyModule
from unirl_lightning.modules.grpo import DiscreteGRPO
from unirl_lightning.modules.pretrain import WarmStartPretrain
from unirl_lightning.modules.sft import UniRLSFT

__all__ = ["RecipeModule", "PolicyModule", "DiscreteGRPO", "WarmStartPretrain", "UniRLSFT"]
