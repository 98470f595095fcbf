"""Likelihood-free flow RL on the forward (noising) process: DiffusionNFT and Advantage Weighted
Matching. Both train the flow-matching loss on the policy's own final samples `x0`, re-noised as
`x_t = (1 - t) x0 + t eps` with fresh noise, target velocity `eps - x0`; rewards only weight it.

- DiffusionNFT (Zheng et al. 2025): an implicit positive policy `v+ = beta v + (1 - beta) v_old`
  and negative policy `v- = (1 + beta) v_old - beta v` around the sampling ("old") policy; the
  positive fits the samples in proportion to their optimality probability `r`, the negative in
  proportion to `1 - r`. Each term's x0 error is normalised by its own (detached) mean absolute error.
- AWM (Xue et al. 2025): the flow-matching loss weighted by the signed, clipped advantage,
  `A' * t ((m + d)^p - d^p) / p` with `m` the per-sample velocity MSE ("ghuber", p = 0.25).

On-policy (v_old = v) NFT's gradient is `clip(A, -K, K)` times the gradient of its adaptive
flow-matching loss, for every beta: the two methods differ in the loss shape and in NFT's old policy.
All functions return one value per sample `[B]` in float32 (computed in float64 where it divides).
"""

from __future__ import annotations

from torch import Tensor


def _per_sample_mean(x: Tensor) -> Tensor:
    return x.flatten(1).mean(1)


def _check(v: Tensor, *others: Tensor) -> None:
    for o in others:
        if o.shape != v.shape:
            raise ValueError(f"shapes differ: {tuple(v.shape)} and {tuple(o.shape)}")
    if v.ndim < 2:
        raise ValueError(f"expected [B, ...] tensors, got shape {tuple(v.shape)}")


def _col(t: Tensor, like: Tensor) -> Tensor:
    """`[B]` -> `[B, 1, ..., 1]` to broadcast over `like`."""
    return t.reshape(-1, *[1] * (like.ndim - 1)).to(like.dtype)


def nft_optimality(advantages: Tensor, clip: float = 5.0) -> Tensor:
    """DiffusionNFT's optimality probability `r = 1/2 + 1/2 clip(A / clip, -1, 1)` in [0, 1], `[B]`."""
    if clip <= 0:
        raise ValueError(f"clip must be > 0, got {clip}")
    return 0.5 + 0.5 * (advantages / clip).clamp(-1.0, 1.0)


def awm_weights(advantages: Tensor, clip: float = 5.0) -> Tensor:
    """AWM's signed sample weights `clip(A, -clip, clip) / clip` in [-1, 1], `[B]`."""
    if clip <= 0:
        raise ValueError(f"clip must be > 0, got {clip}")
    return advantages.clamp(-clip, clip) / clip


def noised(x0: Tensor, noise: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
    """The forward process at `t` `[B]`: (`x_t = (1 - t) x0 + t noise`, target velocity `noise - x0`)."""
    _check(x0, noise)
    tc = _col(t, x0)
    return (1 - tc) * x0 + tc * noise, noise - x0


def adaptive_x0_loss(velocity: Tensor, target: Tensor, t: Tensor, floor: float = 1e-5) -> Tensor:
    """NFT's per-sample x0 loss `mean (x0_hat - x0)^2 / sg(max(mean |x0_hat - x0|, floor))`, `[B]`.

    With `x0_hat = x_t - t v`, the error `x0_hat - x0 = t (target - v)`; written in velocities so it
    needs no `x_t`. The detached normaliser makes it a Huber-like, scale-free loss.
    """
    _check(velocity, target)
    err = (_col(t, velocity) * (target - velocity)).double()
    scale = _per_sample_mean(err.abs()).detach().clamp_min(floor)
    return (_per_sample_mean(err.square()) / scale).float()


def diffusion_nft_loss(
    velocity: Tensor, old_velocity: Tensor, target: Tensor, t: Tensor, optimality: Tensor, beta: float = 1.0
) -> Tensor:
    """DiffusionNFT's policy loss per sample, `(r L(v+) + (1 - r) L(v-)) / beta`, `[B]`.

    Args:
        velocity: `[B, ...]` the trained policy's velocity at `x_t` (with gradient).
        old_velocity: `[B, ...]` the sampling (old) policy's velocity there (detached here).
        target: `[B, ...]` `noise - x0`; t: `[B]` noise levels; optimality: `[B]` r in [0, 1].
        beta: the mixing coefficient (> 0; 1 in the paper's GenEval runs, 0.1 for OCR).
    """
    if beta <= 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    _check(velocity, old_velocity, target)
    old = old_velocity.detach()
    positive = beta * velocity + (1 - beta) * old
    negative = (1 + beta) * old - beta * velocity
    r = optimality.to(velocity.dtype)
    loss = r * adaptive_x0_loss(positive, target, t) + (1 - r) * adaptive_x0_loss(negative, target, t)
    return loss / beta


def ghuber_fm_loss(
    velocity: Tensor, target: Tensor, t: Tensor, power: float = 0.25, delta: float = 1e-10
) -> Tensor:
    """AWM's robust flow-matching loss `t ((m + d)^p - d^p) / p`, `m = mean (v - target)^2`, `[B]`.

    p = 1 is the t-weighted MSE `t m`; smaller p down-weights samples with large errors
    (gradient `t (m + d)^(p - 1)` times that of `m`).
    """
    if not 0 < power <= 1:
        raise ValueError(f"power must be in (0, 1], got {power}")
    _check(velocity, target)
    m = _per_sample_mean((velocity - target).double().square())
    tt = t.double()
    return (tt * ((m + delta) ** power - delta**power) / power).float()


def awm_loss(
    velocity: Tensor, target: Tensor, t: Tensor, weights: Tensor, power: float | None = 0.25
) -> Tensor:
    """AWM's policy loss per sample: `weights * ghuber_fm_loss` (`power` None: the plain MSE), `[B]`.

    Minimising it lowers the flow-matching loss (raises the ELBO, a likelihood bound) of samples
    with positive weight and raises it for negative ones: the policy gradient with the ELBO in
    place of the intractable log-likelihood.
    """
    if power is None:
        _check(velocity, target)
        fm = _per_sample_mean((velocity - target).float().square())
    else:
        fm = ghuber_fm_loss(velocity, target, t, power)
    return weights.to(fm.dtype) * fm
