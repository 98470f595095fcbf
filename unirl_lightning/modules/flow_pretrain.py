"""Warm start of a flow policy by flow matching (rectified flow) on rendered scenes.

Per step: clean latents x0 of rendered scenes, noise n, a noise level s (logit-normal, SD3's
default, or uniform), x_s = s*n + (1-s)*x0, and the loss mean((v(x_s, s, prompt) - (n - x0))^2).
A share `cfg_dropout` of prompts is dropped (unconditional rows) so CFG works afterwards.
"""

from __future__ import annotations

from typing import Literal

import torch

from unirl_lightning.models.flow import FlowPolicy
from unirl_lightning.modules.training import warmup_cosine
from unirl_lightning.modules.flow_base import FlowPolicyModule


def sample_sigmas(n: int, how: str, generator: torch.Generator | None = None, device=None) -> torch.Tensor:
    """`[n]` training noise levels in (0, 1): "logit_normal" (sigmoid of N(0, 1)) or "uniform"."""
    if how == "logit_normal":
        return torch.sigmoid(torch.randn(n, generator=generator)).to(device)
    if how == "uniform":
        return torch.rand(n, generator=generator).to(device)
    raise ValueError(f"t_sampling must be 'logit_normal' or 'uniform', got {how!r}")


class FlowWarmStart(FlowPolicyModule):
    """Flow-matching pretraining of a `FlowPolicy` that has `encode_images`.

    Args:
        cfg_dropout: probability of dropping a prompt (teaches the unconditional velocity for CFG).
        t_sampling: "logit_normal" (SD3) or "uniform" noise levels.
        warmup_steps / max_steps: linear warm-up then cosine decay to 10% of `lr`.
        Other arguments as in `FlowPolicyModule` (warm_start defaults to None here).
    """

    def __init__(
        self,
        policy: FlowPolicy,
        cfg_dropout: float = 0.1,
        t_sampling: Literal["logit_normal", "uniform"] = "logit_normal",
        warm_start: str | None = None,
        lr: float = 1e-3,
        weight_decay: float = 0.01,
        warmup_steps: int = 100,
        max_steps: int = 3000,
        **kwargs,
    ):
        super().__init__(policy, warm_start=warm_start, lr=lr, weight_decay=weight_decay, **kwargs)

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        policy = self.policy
        x0 = policy.encode_images(batch["images"])
        n = x0.shape[0]
        noise = torch.randn_like(x0)
        s = sample_sigmas(n, self.hparams.t_sampling, device=x0.device)
        x_s = s.view(n, 1, 1, 1) * noise + (1 - s.view(n, 1, 1, 1)) * x0
        drop = torch.rand(n) < self.hparams.cfg_dropout
        prompts = [None if d else p for d, p in zip(drop.tolist(), batch["prompts"])]
        v = policy.velocity(x_s, s, policy.encode_text(prompts))
        loss = (v.float() - (noise - x0)).square().mean()
        self.log("train/flow_loss", loss, prog_bar=True, batch_size=n)
        return loss

    def configure_optimizers(self):
        opt = super().configure_optimizers()
        return {
            "optimizer": opt,
            "lr_scheduler": warmup_cosine(opt, self.hparams.warmup_steps, self.hparams.max_steps),
        }
