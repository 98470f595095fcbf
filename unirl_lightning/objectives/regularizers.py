"""Penalties keeping a flow image policy near its reference, one value per sample [B].

- :func:`latent_kl`: Flow-GRPO's code form, ``mean_d (mean - ref_mean)^2 / (2 std^2)``.
  Flow-GRPO passes ``sigma_t`` as std (``std_from_sde_step / sqrt(-dt)``), which is the true
  per-dim KL times |dt|; passing ``sde_step``'s transition std gives the true per-dim KL.
- :func:`exact_latent_kl`: the true KL between the two step Gaussians (kind "sde"), summed over
  dims, via its closed form in the velocities. Its weight explodes at both ends of a schedule.
- :func:`velocity_mse`: UniGRPO's ``mean_d (v - v_ref)^2``, equal weight at every step.

References (``ref_mean``, ``ref_velocity``) are detached: only the policy gets gradients.
"""

from __future__ import annotations

from torch import Tensor

from unirl_lightning.objectives.flow_sde import (
    _compute_dtype,
    _per_sample,
    _reduce,
    sde_sigma_t,
)


def _check_pair(a: Tensor, b: Tensor, names: str) -> None:
    if a.shape != b.shape:
        first, second = names.split(",")
        raise ValueError(f"{first} shape {tuple(a.shape)} must equal {second} shape {tuple(b.shape)}")
    if a.ndim < 1:
        raise ValueError(f"{names.split(',')[0]} must be [B, ...], got a 0-d tensor")


def latent_kl(mean: Tensor, ref_mean: Tensor, std: float | Tensor) -> Tensor:
    """``mean_d (mean - ref_mean)^2 / (2 std^2)`` -> [B] (float32).

    Args:
        mean, ref_mean: [B, ...] step means of the policy and the reference (``sde_step``).
        std: a float, a [B] tensor, or a tensor broadcasting over ``mean`` ([B, 1, ..., 1]).
    """
    _check_pair(mean, ref_mean, "mean,ref_mean")
    cd = _compute_dtype(mean, ref_mean)
    diff2 = (mean.to(cd) - ref_mean.detach().to(cd)).square()
    if isinstance(std, Tensor) and std.ndim == 1 and mean.ndim > 1:
        std = _per_sample(std, mean, cd, "std")
    elif isinstance(std, Tensor):
        std = std.to(cd)
    return _reduce(diff2 / (2 * std**2), "mean")


def exact_latent_kl(
    velocity: Tensor,
    ref_velocity: Tensor,
    sigma: float | Tensor,
    sigma_next: float | Tensor,
    noise_level: float,
) -> Tensor:
    """KL between the "sde"-kind step Gaussians of policy and reference, summed over dims -> [B].

    ``sum_d (mean - ref_mean)^2 / (2 std^2) = (|dt|/2) (1/sigma_t + sigma_t (1-s)/(2s))^2
    ||v - v_ref||^2`` with the same ``sigma_t`` (and ``s == 1`` guard) as ``sde_step``.

    Args:
        velocity, ref_velocity: [B, ...] velocities at the same state x_s.
        sigma, sigma_next: floats or [B] tensors, as in ``sde_step``.
        noise_level: ``a`` > 0 (the KL is infinite for a deterministic step).
    """
    _check_pair(velocity, ref_velocity, "velocity,ref_velocity")
    if noise_level <= 0:
        raise ValueError(f"noise_level must be > 0 for a finite KL, got {noise_level}")
    cd = _compute_dtype(velocity, ref_velocity)
    s = _per_sample(sigma, velocity, cd, "sigma")
    s_next = _per_sample(sigma_next, velocity, cd, "sigma_next")
    sigma_t = sde_sigma_t(s, s_next, noise_level)
    weight = (s - s_next).abs() / 2 * (1 / sigma_t + sigma_t * (1 - s) / (2 * s)).square()
    sq = (velocity.to(cd) - ref_velocity.detach().to(cd)).square()
    return weight.reshape(-1) * _reduce(sq, "sum")


def velocity_mse(velocity: Tensor, ref_velocity: Tensor) -> Tensor:
    """``mean_d (v - v_ref)^2`` -> [B] (float32); UniGRPO's penalty, no CFG, every step."""
    _check_pair(velocity, ref_velocity, "velocity,ref_velocity")
    cd = _compute_dtype(velocity, ref_velocity)
    return _reduce((velocity.to(cd) - ref_velocity.detach().to(cd)).square(), "mean")
