"""Pure tensor math for RL post-training: advantages, clipped policy loss, KL estimators,
flow SDE steps with log-probs, flow regularisers, forward-process (likelihood-free) flow losses,
straight-through Gumbel. No Lightning, no models.
"""

from unirl_lightning.objectives.advantages import (
    SCALES,
    group_advantages,
    zero_std_fraction,
)
from unirl_lightning.objectives.flow_sde import (
    REDUCTIONS,
    SDE_KINDS,
    noise_aware_step_weights,
    sde_sigma_t,
    sde_step,
    transition_std,
)
from unirl_lightning.objectives.forward_process import (
    adaptive_x0_loss,
    awm_loss,
    awm_weights,
    diffusion_nft_loss,
    ghuber_fm_loss,
    nft_optimality,
    noised,
)
from unirl_lightning.objectives.guidance import cfg_combine, guided_logits
from unirl_lightning.objectives.gumbel import gumbel_noise, straight_through_gumbel
from unirl_lightning.objectives.kl import kl_k1, kl_k2, kl_k3
from unirl_lightning.objectives.policy_loss import LOSS_TYPES, policy_loss
from unirl_lightning.objectives.regularizers import (
    exact_latent_kl,
    latent_kl,
    velocity_mse,
)

__all__ = [
    "LOSS_TYPES",
    "REDUCTIONS",
    "SCALES",
    "SDE_KINDS",
    "adaptive_x0_loss",
    "awm_loss",
    "awm_weights",
    "cfg_combine",
    "diffusion_nft_loss",
    "exact_latent_kl",
    "ghuber_fm_loss",
    "group_advantages",
    "guided_logits",
    "gumbel_noise",
    "kl_k1",
    "kl_k2",
    "kl_k3",
    "latent_kl",
    "nft_optimality",
    "noise_aware_step_weights",
    "noised",
    "policy_loss",
    "sde_sigma_t",
    "sde_step",
    "straight_through_gumbel",
    "transition_std",
    "velocity_mse",
    "zero_std_fraction",
]
