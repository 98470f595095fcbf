"""Composable rewards: each returns per-sample tensors; recipes sum them with config weights."""

from unirl_lightning.rewards.base import RewardFunction, RolloutContext, combine_rewards
from unirl_lightning.rewards.geneval import GenEvalReward
from unirl_lightning.rewards.models import (
    AestheticReward,
    CLIPScoreReward,
    ModelReward,
    OCRReward,
    PickScoreReward,
    VLMJudgeReward,
)
from unirl_lightning.rewards.understanding import SelfUnderstandingReward, corl_rewards

__all__ = [
    "RewardFunction",
    "RolloutContext",
    "combine_rewards",
    "GenEvalReward",
    "ModelReward",
    "CLIPScoreReward",
    "PickScoreReward",
    "AestheticReward",
    "OCRReward",
    "VLMJudgeReward",
    "SelfUnderstandingReward",
    "corl_rewards",
]
