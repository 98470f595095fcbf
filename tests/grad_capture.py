"""Capture the gradient that each `manual_backward` call of a Lightning module adds to one parameter,
and a flow reward that separates the images of a group, for gradient checks of the flow recipes;
record a recipe's rollouts with their advantages, to check which way an update moved their log-probs."""

from __future__ import annotations

from dataclasses import dataclass
from types import ModuleType
from typing import Any

import pytest
import torch

from unirl_lightning.rewards.base import RewardFunction


class LatentMeanReward(RewardFunction):
    """The mean of each rollout's final latent: differs inside a group, the same for the same rollout."""

    def __call__(self, ctx):
        return ctx.rollout.latents[:, -1].flatten(1).mean(1)


class PoisonedLatentMean(LatentMeanReward):
    """LatentMeanReward with NaN on row 1 and inf on row 4 (`poison`), or NaN everywhere (`everywhere`)."""

    def __init__(self, poison: bool = True, everywhere: bool = False):
        super().__init__(name="poisoned")
        self.poison, self.everywhere = poison, everywhere

    def __call__(self, ctx):
        reward = super().__call__(ctx).clone()
        if self.everywhere:
            return torch.full_like(reward, float("nan"))
        if self.poison:
            reward[1], reward[4] = float("nan"), float("inf")
        return reward


def capture_backward_grads(module, parameter: torch.nn.Parameter) -> list[torch.Tensor]:
    """Wrap `module.manual_backward`; returns the list it fills with each call's gradient on `parameter`."""
    grads: list[torch.Tensor] = []
    backward = module.manual_backward

    def recording(loss, *args, **kwargs):
        before = torch.zeros_like(parameter) if parameter.grad is None else parameter.grad.detach().clone()
        backward(loss, *args, **kwargs)
        after = torch.zeros_like(parameter) if parameter.grad is None else parameter.grad.detach()
        grads.append(after - before)

    module.manual_backward = recording
    return grads


@dataclass
class Recorded:
    """One training rollout: its prompts' specs, what `make_rollouts` returned (a `RolloutContext`,
    or the rollout itself) and the advantages it was trained with (None without advantages)."""

    specs: list[dict]
    made: Any
    advantages: torch.Tensor | None = None

    @property
    def rollout(self) -> Any:
        return getattr(self.made, "rollout", self.made)


def record_rollouts(module: torch.nn.Module, monkeypatch: pytest.MonkeyPatch,
                    recipe: ModuleType | None = None) -> list[Recorded]:
    """Keep each training rollout of `module`, with the advantages it was trained with when
    `recipe`, the module's Python module (`unirl_lightning.modules.grpo` or `.flow_grpo`), is given:
    its `rank_advantages` is wrapped and the first advantages of each step kept (those of the image
    stream, and of the answer stream when it shares them)."""
    seen: list[Recorded] = []
    make, rank = module.make_rollouts, getattr(recipe, "rank_advantages", None)

    def making(batch):
        made = make(batch)
        seen.append(Recorded(list(batch.specs), made))
        return made

    def ranking(*args, **kwargs):
        adv, zero = rank(*args, **kwargs)
        if seen and seen[-1].advantages is None:
            seen[-1].advantages = adv.detach().clone()
        return adv, zero

    monkeypatch.setattr(module, "make_rollouts", making)
    if recipe is not None:
        monkeypatch.setattr(recipe, "rank_advantages", ranking)
    return seen


@torch.no_grad()
def flow_log_prob_change(policy: torch.nn.Module, rollout) -> torch.Tensor:
    """`[B]`: each row's trained transitions re-scored under `policy` less their rollout log-probs, summed."""
    rows = rollout.row_mask if rollout.row_mask is not None else rollout.train_mask.expand(len(rollout), -1)
    change = torch.zeros(len(rollout))
    for step in rollout.trained_steps:
        new = policy.step_log_prob(rollout, step).log_prob
        change += torch.where(rows[:, step], new - rollout.log_probs[:, step], 0.0)
    return change


def assert_follows_advantages(change: torch.Tensor, adv: torch.Tensor) -> None:
    """The update raised the log-prob of every positive-advantage sample and lowered every negative one."""
    moved = adv != 0
    assert moved.any(), "no sample had an advantage: nothing to check"
    assert torch.equal(torch.sign(change[moved]), torch.sign(adv[moved])), (adv.tolist(), change.tolist())
