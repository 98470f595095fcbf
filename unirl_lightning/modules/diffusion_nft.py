"""DiffusionNFT (Zheng et al. 2025, "Online Diffusion Reinforcement with Forward Process").

An old policy draws the rollouts (any sampler; the ODE by default) and anchors the loss: the
implicit positive policy `beta v + (1 - beta) v_old` fits each sample in proportion to its
optimality probability `r = 1/2 + 1/2 clip(A / K, -1, 1)`, the implicit negative policy
`(1 + beta) v_old - beta v` in proportion to `1 - r` (`objectives.diffusion_nft_loss`). After each
optimiser step the old policy moves toward the live one, `old <- eta old + (1 - eta) live` with
`eta = min(eta_rate x step, eta_max)`: on-policy at first, slower later.
"""

from __future__ import annotations

import torch
from torch import Tensor

from unirl_lightning.models.flow.base import FlowPolicy, TextCondition
from unirl_lightning.modules.forward_rl import ForwardProcessRL
from unirl_lightning.objectives import diffusion_nft_loss, nft_optimality


class DiffusionNFT(ForwardProcessRL):
    """DiffusionNFT on a flow policy.

    Args:
        nft_beta: the mixing coefficient beta of the implicit policies (the paper's GenEval runs: 1).
        eta_rate / eta_max: the old policy's soft-update schedule, `eta = min(eta_rate x step, eta_max)`.
        Other arguments as in `ForwardProcessRL` (defaults: ODE rollouts, 9 of the sampler's 10
        grid times per sample, K = 5, velocity MSE to the reference at 1e-4).
    """

    def __init__(
        self,
        policy: FlowPolicy,
        nft_beta: float = 1.0,
        eta_rate: float = 0.001,
        eta_max: float = 0.5,
        **kwargs,
    ):
        super().__init__(policy, **kwargs)
        if nft_beta <= 0:
            raise ValueError(f"model.nft_beta must be > 0, got {nft_beta}")
        if not 0 <= eta_max < 1 or eta_rate < 0:
            raise ValueError(f"model.eta_max must be in [0, 1) and eta_rate >= 0, got {eta_max}, {eta_rate}")
        self.old_policy: FlowPolicy | None = None

    def make_anchors(self) -> None:
        if self.old_policy is None:
            self.old_policy = self.frozen_copy()

    def anchor_models(self) -> list[torch.nn.Module]:
        return [self.old_policy] if self.old_policy is not None else []

    def sampling_policy(self) -> FlowPolicy:
        return self.old_policy if self.old_policy is not None else self.policy

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
        with torch.no_grad():
            old = self.old_policy.velocity(x_t, t, cond)
        r = nft_optimality(advantages, hp.adv_clip)
        loss = hp.adv_clip * diffusion_nft_loss(velocity, old, target, t, r, hp.nft_beta)
        drift = (velocity.detach() - old).flatten(1).square().mean()
        return loss, {"nft_loss": loss.detach().mean(), "optimality": r.mean(), "velocity_mse_old": drift}

    def after_update(self) -> None:
        hp = self.hparams
        eta = min(hp.eta_rate * self.global_step, hp.eta_max)
        self.soft_update(self.old_policy, self.policy, eta)
