"""Capture the gradient that each `manual_backward` call of a Lightning module adds to one parameter,
and a flow reward that separates the images of a group, for gradient checks of the flow recipes."""

from __future__ import annotations

import torch

from unirl_lightning.rewards.base import RewardFunction


class LatentMeanReward(RewardFunction):
    """The mean of each rollout's final latent: differs inside a group, the same for the same rollout."""

    def __call__(self, ctx):
        return ctx.rollout.latents[:, -1].flatten(1).mean(1)


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
