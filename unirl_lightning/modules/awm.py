"""Advantage Weighted Matching (AWM; Xue et al. 2025): the pretraining flow-matching loss on the
policy's own samples, weighted by their signed, clipped advantages `clip(A, -K, K) / K`.

Its gradient is the policy gradient with the flow-matching loss (an ELBO) in place of the sample's
log-likelihood. The released code's loss is the robust "ghuber" form `t ((m + d)^p - d^p) / p`
(p = 0.25; `objectives.awm_loss`), times are stratified over the sampler's grid, and besides the
velocity MSE to the frozen reference an EMA of the policy anchors each update (TRPO-like):
`ema_beta x mean (v - v_ema)^2`, the EMA moving as `ema <- d ema + (1 - d) live`,
`d = min(ema_rate x step, ema_max)`.
"""

from __future__ import annotations

import torch
from torch import Tensor

from unirl_lightning.models.flow.base import FlowPolicy, TextCondition
from unirl_lightning.modules.forward_rl import ForwardProcessRL
from unirl_lightning.objectives import awm_loss, awm_weights, velocity_mse


class AdvantageWeightedMatching(ForwardProcessRL):
    """AWM on a flow policy.

    Args:
        power: the ghuber power p (1: the t-weighted MSE; None: the plain, unweighted MSE).
        ema_beta: weight of the velocity MSE to the policy's EMA (0: no EMA anchor).
        ema_rate / ema_max: the EMA's schedule, `d = min(ema_rate x step, ema_max)`.
        Other arguments as in `ForwardProcessRL`; AWM's own defaults (set in `configs/awm.yaml`):
        6 times per sample stratified over grid indices [1, 0.9 T), velocity MSE to the reference 1e-3.
    """

    def __init__(
        self,
        policy: FlowPolicy,
        power: float | None = 0.25,
        ema_beta: float = 1.0,
        ema_rate: float = 0.001,
        ema_max: float = 0.3,
        **kwargs,
    ):
        super().__init__(policy, **kwargs)
        if power is not None and not 0 < power <= 1:
            raise ValueError(f"model.power must be in (0, 1] or null, got {power}")
        if ema_beta < 0 or not 0 <= ema_max < 1 or ema_rate < 0:
            raise ValueError("model.ema_beta and ema_rate must be >= 0 and ema_max in [0, 1)")
        self.ema_anchor: FlowPolicy | None = None

    def make_anchors(self) -> None:
        if self.hparams.ema_beta > 0 and self.ema_anchor is None:
            self.ema_anchor = self.frozen_copy()

    def anchor_models(self) -> list[torch.nn.Module]:
        return [self.ema_anchor] if self.ema_anchor is not None else []

    def sample_loss(
        self,
        velocity: Tensor,
        x_t: Tensor,
        target: Tensor,
        t: Tensor,
        advantages: Tensor,
        cond: TextCondition,
    ) -> tuple[Tensor, dict[str, Tensor]]:
        hp = self.hparams
        weights = awm_weights(advantages, hp.adv_clip)
        loss = awm_loss(velocity, target, t, weights, hp.power)
        stats = {"awm_loss": loss.detach().mean(), "weight_abs": weights.abs().mean()}
        if self.ema_anchor is not None:
            with torch.no_grad():
                anchor = self.ema_anchor.velocity(x_t, t, cond)
            penalty = velocity_mse(velocity, anchor)
            stats["velocity_mse_ema"] = penalty.detach().mean()
            loss = loss + hp.ema_beta * penalty
        return loss, stats

    def after_update(self) -> None:
        if self.ema_anchor is not None:
            hp = self.hparams
            self.soft_update(self.ema_anchor, self.policy, min(hp.ema_rate * self.global_step, hp.ema_max))
