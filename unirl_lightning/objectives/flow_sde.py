"""One stochastic denoising step of a flow-matching model, with its Gaussian log-prob.

Convention (diffusers' ``FlowMatchEulerDiscreteScheduler``): ``x_s = s*noise + (1-s)*x0``, the
model predicts ``v ~ noise - x0``, ``s`` runs from 1 (noise) to 0, ``dt = s_next - s < 0``, and
the deterministic Euler step is ``x + v*dt``. Each step is a Gaussian policy
``N(mean, std^2 I)`` whose mean depends on the model, so its log-prob can be trained with the
clipped GRPO loss (Flow-GRPO; DanceGRPO; CPS).

Kinds (``a`` = ``noise_level``):
- "sde" (Flow-GRPO): ``sigma_t = a*sqrt(s/(1-s))``,
  ``mean = x + (v + sigma_t^2/(2s) * (x + (1-s)*v)) * dt``, ``std = sigma_t*sqrt(-dt)``. The SDE
  with the same marginals as the ODE. At ``s == 1`` the ``1-s`` in ``sigma_t`` is replaced by
  ``1 - s_next``; Flow-GRPO replaces it by ``1 - sigmas[1]``, the schedule's second value,
  which is ``s_next`` whenever ``s == 1`` (only the first step of a schedule can sit at 1).
- "dance" (DanceGRPO): constant ``sigma_t = a``, the same mean and std forms.
- "cps" (coefficients-preserving sampling): ``std = s_next*sin(a*pi/2)``,
  ``mean = x0_hat*(1-s_next) + x1_hat*sqrt(s_next^2 - std^2)`` with ``x0_hat = x - s*v`` and
  ``x1_hat = x + (1-s)*v``.

Log-prob: the exact Gaussian log-density for every kind, averaged ("mean", Flow-GRPO's
convention, which its 1e-4-scale clip ranges assume) or summed ("sum") over non-batch dims.
Flow-GRPO's CPS code instead uses ``-(x' - mean)^2`` averaged, dropping ``1/(2 std^2)`` and the
constants; since std does not depend on the model this changes log-ratios by the factor
``2*std^2`` only. To reproduce it: ``2*std^2 * (log_prob + log(std) + 0.5*log(2*pi))`` (mean).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

#: Valid values of ``kind`` and ``reduce`` in :func:`sde_step`.
SDE_KINDS: tuple[str, ...] = ("sde", "dance", "cps")
REDUCTIONS: tuple[str, ...] = ("mean", "sum")

_HALF_LOG_2PI = 0.5 * math.log(2 * math.pi)


def _compute_dtype(*tensors: Tensor) -> torch.dtype:
    """float32, or float64 when an input is float64 (half precision overflows in these sums)."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def _per_sample(value: float | Tensor, like: Tensor, dtype: torch.dtype, name: str) -> Tensor:
    """A float, 0-d or [B] schedule value as a [B, 1, ..., 1] tensor broadcasting over ``like``."""
    t = torch.as_tensor(value, device=like.device).to(dtype)
    batch = like.shape[0]
    if t.ndim == 0:
        t = t.expand(batch)
    elif t.shape != (batch,):
        raise ValueError(f"{name} must be a float or a [B] = ({batch},) tensor, got shape {tuple(t.shape)}")
    return t.reshape(batch, *([1] * (like.ndim - 1)))


def _reduce(x: Tensor, reduce: str) -> Tensor:
    """[B, ...] -> [B], mean or sum over the non-batch dims."""
    flat = x.reshape(x.shape[0], -1)
    return flat.mean(1) if reduce == "mean" else flat.sum(1)


def sde_sigma_t(sigma: Tensor, sigma_next: Tensor, noise_level: float) -> Tensor:
    """Flow-GRPO's diffusion coefficient ``a*sqrt(s/(1-s))``, with ``s == 1`` guarded by ``s_next``."""
    denom = 1 - torch.where(sigma == 1, sigma_next, sigma)
    return noise_level * (sigma / denom).sqrt()


def _diffusion_coefficient(sigma: Tensor, sigma_next: Tensor, noise_level: float, kind: str) -> Tensor:
    """sigma_t of the "sde" (Flow-GRPO) and "dance" (constant) kinds."""
    return (
        sde_sigma_t(sigma, sigma_next, noise_level) if kind == "sde" else torch.full_like(sigma, noise_level)
    )


def transition_std(sigma: Tensor, sigma_next: Tensor, noise_level: float, kind: str = "sde") -> Tensor:
    """The std of one step's Gaussian transition (any broadcastable shape of sigmas)."""
    if kind == "cps":
        return sigma_next * math.sin(noise_level * math.pi / 2)
    return _diffusion_coefficient(sigma, sigma_next, noise_level, kind) * (sigma - sigma_next).sqrt()


def noise_aware_step_weights(
    sigmas: Tensor,
    noise_levels: Tensor,
    steps: list[int],
    kind: str = "sde",
    power: float = 1.0,
    normalize_over: list[int] | None = None,
) -> Tensor:
    """`[len(steps)]` per-step loss weights proportional to each step's transition std ** power, mean 1
    over `steps`, or over `normalize_over` (e.g. every step a random window can cover, so that
    a window's weights keep their size relative to the other windows'; `noise_levels` must then
    give those steps' levels too).

    The policy gradient of one step's mean log-prob w.r.t. the velocity is ``eps * |dmean/dv| / std``,
    and for "sde" ``|dmean/dv| / std`` grows as ``sqrt((1-s)/s)``: with uniform weights the last
    (detail) steps' gradients are ~8x the first (layout) steps' on a 10-step schedule. Weighting by
    the std evens them out (TempFlow-GRPO's noise-aware weighting prioritises the early steps);
    power 2 (the variance) also divides out each step's Fisher information ``(dmean/dv / std)^2``,
    a per-step natural gradient, which favours the early steps further.
    """
    if not steps:
        raise ValueError("noise_aware_step_weights needs at least one step")

    def weights(of: list[int]) -> Tensor:
        s, s_next = sigmas.float()[of], sigmas.float()[[j + 1 for j in of]]
        std = torch.stack(
            [transition_std(s[i], s_next[i], float(noise_levels[j]), kind) for i, j in enumerate(of)]
        )
        if not bool((std > 0).all()):
            raise ValueError(f"noise_aware_step_weights: steps {of} include a deterministic step (std 0)")
        return std**power

    weight = weights(list(steps))
    return weight / (weight.mean() if normalize_over is None else weights(list(normalize_over)).mean())


def sde_step(
    velocity: Tensor,
    sample: Tensor,
    sigma: float | Tensor,
    sigma_next: float | Tensor,
    *,
    noise_level: float = 0.7,
    kind: str = "sde",
    prev_sample: Tensor | None = None,
    generator: torch.Generator | None = None,
    reduce: str = "mean",
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """One stochastic step from ``sample`` at ``sigma`` to ``sigma_next``, with its log-prob.

    Args:
        velocity: [B, ...] the model output (already CFG-combined if the rollout used CFG).
        sample: [B, ...] the current state x_s.
        sigma, sigma_next: current and next noise levels (``sigma_next < sigma``), each a float
            or a [B] tensor; they broadcast over the non-batch dims.
        noise_level: ``a`` above; 0 gives diffusers' Euler step exactly (for "sde" and "dance").
        kind: "sde", "dance" or "cps" (see the module docstring).
        prev_sample: [B, ...] the next state to score (training); sampled when None (rollout).
        generator: for the sampled noise; noise is drawn on its device, then moved.
        reduce: "mean" or "sum" of the per-element log-density over the non-batch dims.

    Returns:
        ``(prev_sample, log_prob, mean, std)``: prev_sample [B, ...] in ``sample``'s dtype;
        log_prob [B], mean [B, ...] and std [B, 1, ..., 1] (the transition std, not sigma_t)
        in float32 (float64 for float64 inputs). log_prob is the density of
        ``prev_sample.detach()`` (as returned, i.e. after the cast to ``sample``'s dtype, so
        re-scoring a stored sample reproduces it exactly); gradients reach ``velocity``
        through ``mean``. Where ``std == 0`` (noise_level 0, or the last CPS step) the step is
        deterministic and log_prob is set to 0 (ratio 1, no policy gradient).
    """
    if kind not in SDE_KINDS:
        raise ValueError(f"unknown kind {kind!r}; valid: {', '.join(SDE_KINDS)}")
    if reduce not in REDUCTIONS:
        raise ValueError(f"unknown reduce {reduce!r}; valid: {', '.join(REDUCTIONS)}")
    if velocity.shape != sample.shape:
        raise ValueError(
            f"velocity shape {tuple(velocity.shape)} must equal sample shape {tuple(sample.shape)}"
        )
    if prev_sample is not None and prev_sample.shape != sample.shape:
        raise ValueError(
            f"prev_sample shape {tuple(prev_sample.shape)} must equal sample shape {tuple(sample.shape)}"
        )
    if sample.ndim < 1 or sample.shape[0] == 0:
        raise ValueError(f"sample must be [B, ...] with B >= 1, got shape {tuple(sample.shape)}")
    if noise_level < 0 or (kind == "cps" and noise_level > 1):
        valid = "in [0, 1] for cps" if kind == "cps" else ">= 0"
        raise ValueError(f"noise_level must be {valid}, got {noise_level}")

    # bf16/fp16 lose the small sigma_t^2/(2s) correction and can overflow: work in float32.
    cd = _compute_dtype(velocity, sample)
    x, v = sample.to(cd), velocity.to(cd)
    s = _per_sample(sigma, x, cd, "sigma")
    s_next = _per_sample(sigma_next, x, cd, "sigma_next")
    dt = s_next - s

    std = transition_std(s, s_next, noise_level, kind)
    if kind == "cps":
        x0_hat = x - s * v
        x1_hat = x + (1 - s) * v
        # clamp: s_next^2 - std^2 = (s_next*cos(a*pi/2))^2 can round below 0 at a = 1.
        mean = x0_hat * (1 - s_next) + x1_hat * (s_next.square() - std.square()).clamp(min=0).sqrt()
    else:
        sigma_t = _diffusion_coefficient(s, s_next, noise_level, kind)
        # With a = 0 the correction is exactly 0, so mean == x + v*dt bit for bit (Euler).
        mean = x + (v + sigma_t.square() / (2 * s) * (x + (1 - s) * v)) * dt

    if prev_sample is None:
        gen_device = generator.device if generator is not None else x.device
        noise = torch.randn(x.shape, generator=generator, device=gen_device, dtype=cd).to(x.device)
        prev_sample = mean + std * noise  # keeps mean's graph, as Flow-GRPO does
    prev_sample = prev_sample.to(sample.dtype)

    target = prev_sample.detach().to(cd)
    stochastic = std > 0
    std_safe = torch.where(stochastic, std, torch.ones_like(std))  # keeps grads finite where std == 0
    log_density = -(target - mean).square() / (2 * std_safe.square()) - std_safe.log() - _HALF_LOG_2PI
    log_prob = torch.where(stochastic.reshape(-1), _reduce(log_density, reduce), log_density.new_zeros(()))
    return prev_sample, log_prob, mean, std
