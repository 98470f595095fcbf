"""Clipped policy-gradient loss of GRPO with TRL's aggregation modes (``loss_type``).

Per token: ``l = -min(rho*A, clip(rho, 1-eps_low, 1+eps_high)*A) + beta*k3`` with
``rho = exp(logp - old_logp)``. The same function trains text tokens, discrete image tokens and
flow denoising steps (one "token" per step, ``T`` = number of trained steps).
"""

from __future__ import annotations

import torch
from torch import Tensor

from unirl_lightning.objectives.kl import kl_k3

#: Valid values of ``loss_type`` in :func:`policy_loss`.
LOSS_TYPES: tuple[str, ...] = ("grpo", "bnpo", "dr_grpo", "dapo")


def _check_shapes(logp: Tensor, old_logp: Tensor, advantages: Tensor, mask: Tensor,
                  ref_logp: Tensor | None) -> None:
    if logp.ndim != 2:
        raise ValueError(f"logp must be [B, T], got shape {tuple(logp.shape)}")
    pairs = {"old_logp": old_logp, "mask": mask}
    if ref_logp is not None:
        pairs["ref_logp"] = ref_logp
    for name, t in pairs.items():
        if t.shape != logp.shape:
            raise ValueError(f"{name} shape {tuple(t.shape)} must equal logp shape {tuple(logp.shape)}")
    if advantages.shape != logp.shape[:1]:
        raise ValueError(
            f"advantages shape {tuple(advantages.shape)} must be [B] = ({logp.shape[0]},) for logp shape "
            f"{tuple(logp.shape)}"
        )


def policy_loss(
    logp: Tensor,
    old_logp: Tensor,
    advantages: Tensor,
    mask: Tensor,
    *,
    loss_type: str = "grpo",
    epsilon_low: float = 0.2,
    epsilon_high: float | None = None,
    beta: float = 0.0,
    ref_logp: Tensor | None = None,
    max_len: int | None = None,
    num_items_in_batch: int | float | Tensor | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Clipped surrogate loss, aggregated as TRL's ``GRPOTrainer`` does.

    Args:
        logp: [B, T] log-probs of the taken actions under the current policy (with grad).
        old_logp: [B, T] log-probs under the rollout policy; detached here, so passing the
            same values as ``logp`` (on-policy) gives ``rho == 1`` exactly and the plain
            policy gradient ``-A * dlogp``.
        advantages: [B] one advantage per sequence (detached here).
        mask: [B, T] bool or {0, 1}; masked positions contribute nothing (not even NaN).
        loss_type: how per-token losses are reduced (TRL semantics):
            "grpo": mean over each sequence's tokens (count clamped to >= 1), then over sequences;
            "bnpo": sum / sum(mask) (clamped to >= 1);
            "dr_grpo": sum / (B * max_len), ``max_len`` defaulting to T;
            "dapo": sum / num_items_in_batch.
        epsilon_low, epsilon_high: clip range [1 - eps_low, 1 + eps_high]; eps_high defaults
            to eps_low (DAPO's clip-higher uses e.g. 0.28).
        beta: weight of the k3 KL penalty to ``ref_logp`` (required when beta > 0).
        ref_logp: [B, T] reference-policy log-probs (detached here). Given with beta == 0, it
            is only used for the "kl" statistic.
        max_len: the fixed length budget of "dr_grpo".
        num_items_in_batch: denominator of "dapo", meant to be the token count across all
            ranks and accumulation steps; defaults to the local ``mask.sum()``. Lightning
            averages gradients over ranks and divides the loss by ``accumulate_grad_batches``,
            so for an exact sum over the global token count pass
            ``global_tokens / (world_size * accumulate_grad_batches)`` (TRL likewise divides
            its global count by ``num_processes``).

    Returns:
        ``(loss, stats)``: a scalar (float32, or float64 for float64 logp), and detached
        scalars "clip_low_frac" (rho < 1-eps_low with A < 0), "clip_high_frac" (rho > 1+eps_high with A > 0),
        "clip_frac" (either), "ratio_mean" and "kl" (masked mean k3; 0 without ``ref_logp``),
        each a mean over unmasked tokens.
    """
    _check_shapes(logp, old_logp, advantages, mask, ref_logp)
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"unknown loss_type {loss_type!r}; valid: {', '.join(LOSS_TYPES)}")
    if beta != 0.0 and ref_logp is None:
        raise ValueError(f"beta={beta} needs ref_logp")
    eps_low = epsilon_low
    eps_high = epsilon_low if epsilon_high is None else epsilon_high
    if eps_low < 0 or eps_high < 0:
        raise ValueError(f"epsilon_low and epsilon_high must be >= 0, got {eps_low}, {eps_high}")

    dtype = torch.promote_types(logp.dtype, torch.float32)
    valid = mask.bool()
    m = valid.to(dtype)
    lp = logp.to(dtype)
    zero = lp.new_zeros(())
    # Zero the log-ratio at masked positions *before* exp, so padding garbage (-inf, NaN)
    # can neither leak into the loss nor into the gradient.
    log_ratio = torch.where(valid, lp - old_logp.detach().to(dtype), zero)
    rho = log_ratio.exp()
    adv = advantages.detach().to(dtype).unsqueeze(1)

    per_token = -torch.minimum(rho * adv, rho.clamp(1 - eps_low, 1 + eps_high) * adv)
    k3 = None
    if ref_logp is not None:
        k3 = kl_k3(torch.where(valid, lp, zero), torch.where(valid, ref_logp.detach().to(dtype), zero))
        if beta != 0.0:
            per_token = per_token + beta * k3

    total = (per_token * m).sum()
    if loss_type == "grpo":
        loss = ((per_token * m).sum(-1) / m.sum(-1).clamp(min=1)).mean()
    elif loss_type == "bnpo":
        loss = total / m.sum().clamp(min=1)
    elif loss_type == "dr_grpo":
        length = logp.shape[1] if max_len is None else max_len
        if length < 1:
            raise ValueError(f"max_len must be >= 1, got {length}")
        loss = total / (logp.shape[0] * length)
    else:  # dapo
        denom = m.sum() if num_items_in_batch is None else torch.as_tensor(num_items_in_batch)
        loss = total / denom.to(device=total.device, dtype=dtype).clamp(min=1)

    with torch.no_grad():
        count = m.sum().clamp(min=1)
        low = (rho < 1 - eps_low) & (adv < 0)
        high = (rho > 1 + eps_high) & (adv > 0)
        stats = {
            "clip_low_frac": (low * m).sum() / count,
            "clip_high_frac": (high * m).sum() / count,
            "clip_frac": ((low | high) * m).sum() / count,
            "ratio_mean": (rho * m).sum() / count,
            "kl": (k3 * m).sum() / count if k3 is not None else zero.clone(),
        }
    return loss, {k: v.detach() for k, v in stats.items()}
