"""Reward functions: each maps a scored rollout to one float per sample and logs its own mean."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any

import torch

from unirl_lightning.models.base import AnswerRollout, ImageRollout


@dataclass
class RolloutContext:
    """Everything a reward may read about one step's samples.

    images: uint8 `[N, 3, H, W]`; answers: the policy's answers about its own images (when any
    reward or loss stream needs them); cache: shared per-step results (e.g. the judge's verdicts)
    so composite rewards detect once.
    """

    specs: list[dict]
    rollout: ImageRollout
    images: torch.Tensor
    answers: AnswerRollout | None = None
    cache: dict[str, Any] = field(default_factory=dict)


class RewardFunction(ABC):
    """A weighted reward term. Subclasses return `[N]` float rewards from a `RolloutContext`.

    `needs_answers` asks the recipe to sample the policy's answers to its own images first.
    """

    needs_answers: bool = False

    def __init__(self, weight: float = 1.0, name: str | None = None):
        self.weight = weight
        self.name = name or type(self).__name__.removesuffix("Reward").lower()

    @abstractmethod
    def __call__(self, ctx: RolloutContext) -> torch.Tensor: ...


def combine_rewards(
    rewards: list[RewardFunction], ctx: RolloutContext
) -> tuple[torch.Tensor, dict[str, float]]:
    """Weighted sum `[N]` of the terms, each term's mean for logging (`reward/<name>`), and the sum's
    mean per GenEval task (`reward_by_task/<tag>`, for specs that carry a tag): the overall mean hides
    which tasks learn. Each weighted term is also kept in `ctx.cache["reward_terms"]`."""
    if not rewards:
        raise ValueError("no reward functions configured: give model.rewards at least one entry")
    total = torch.zeros(len(ctx.specs))
    logs: dict[str, float] = {}
    for fn in rewards:
        r = fn(ctx).float().cpu()
        if r.shape != total.shape:
            raise ValueError(
                f"reward {fn.name} returned shape {tuple(r.shape)}, expected ({len(ctx.specs)},)"
            )
        total += fn.weight * r
        ctx.cache.setdefault("reward_terms", {})[fn.name] = fn.weight * r  # weighted, for per-stream credit
        logs[f"reward/{fn.name}"] = r.mean().item()
    tags = [s.get("tag") for s in ctx.specs]
    for tag in sorted({t for t in tags if t}):
        logs[f"reward_by_task/{tag}"] = total[torch.tensor([t == tag for t in tags])].mean().item()
    return total, logs
