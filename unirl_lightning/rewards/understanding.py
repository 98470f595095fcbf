"""UniRL's self-understanding reward: the policy answers a question about its own image and the
answer is graded per attribute (object, count, colour, relation), so the reward is graded."""

from __future__ import annotations

import torch

from unirl_lightning.data.qa import grade_answer
from unirl_lightning.rewards.base import RewardFunction, RolloutContext
from unirl_lightning.rewards.geneval import GenEvalReward


class SelfUnderstandingReward(RewardFunction):
    """Fraction of the question's attributes the policy's own answer gets right, in [0, 1]."""

    needs_answers = True

    def __init__(self, weight: float = 1.0, name: str | None = "self_understanding"):
        super().__init__(weight, name)

    def __call__(self, ctx: RolloutContext) -> torch.Tensor:
        if ctx.answers is None:
            raise ValueError(
                "SelfUnderstandingReward needs the policy's answers; the recipe must sample them"
            )
        return torch.tensor([grade_answer(s, a).score for s, a in zip(ctx.specs, ctx.answers.texts)])


def corl_rewards(
    generation_weight: float = 1.0, understanding_weight: float = 0.8, mode: str = "binary"
) -> list[RewardFunction]:
    """CoRL-style combination: generation reward + 0.8 x understanding reward."""
    return [
        GenEvalReward(mode=mode, weight=generation_weight),
        SelfUnderstandingReward(weight=understanding_weight),
    ]
