"""GenEval detector rewards: binary (official verdict), strict (exact counts), partial credit."""

from __future__ import annotations

from typing import Literal

import torch

from unirl_lightning.evaluation.detection import Detector
from unirl_lightning.evaluation.judge import GenEvalJudge
from unirl_lightning.rewards.base import RewardFunction, RolloutContext
from unirl_lightning.worlds.detector import WorldDetector


class GenEvalReward(RewardFunction):
    """Reward from a GenEval judge (the world's exact detector by default, or a real one).

    mode: "binary" = official correctness, "strict" = exact counts, "partial" = Flow-GRPO's
    partial credit per clause (gives early groups a signal when nothing is fully right).
    detector: None judges with the recipe's detector (`model.detector`; the synthetic world's
    exact detector outside a recipe).
    """

    def __init__(
        self,
        mode: Literal["binary", "strict", "partial"] = "binary",
        detector: Detector | None = None,
        weight: float = 1.0,
        name: str | None = None,
    ):
        if mode not in ("binary", "strict", "partial"):
            raise ValueError(f"GenEvalReward.mode must be binary, strict or partial, got {mode!r}")
        super().__init__(weight, name or f"geneval_{mode}")
        self.mode = mode
        self.uses_recipe_detector = detector is None  # the recipe hands it its judge at setup
        self.judge = GenEvalJudge(detector or WorldDetector())

    def results(self, ctx: RolloutContext):
        if "geneval" not in ctx.cache:  # one detector pass per step, shared by every GenEval term
            ctx.cache["geneval"] = self.judge(ctx.images, ctx.specs)
        return ctx.cache["geneval"]

    def __call__(self, ctx: RolloutContext) -> torch.Tensor:
        res = self.results(ctx)
        if self.mode == "binary":
            return torch.tensor([float(r.correct) for r in res])
        if self.mode == "strict":
            return torch.tensor([float(r.strict) for r in res])
        return torch.tensor([float(r.partial) for r in res])
