"""Group-relative advantages (GRPO, Flow-GRPO, Dr. GRPO).

Groups are identified by arbitrary integer ids (not necessarily contiguous or sorted), so the
same function serves a batch laid out prompt-major, shuffled, or gathered from several ranks.

Distributed training: a group's samples may live on different ranks. The caller must gather
``rewards`` and ``group_ids`` from all ranks (e.g. ``LightningModule.all_gather``) *before*
calling, then keep its own rank's slice of the result; normalising per rank would use the
wrong mean and std.

Std convention: by default the std is Bessel-corrected (``unbiased=True``), as in TRL's
``nanstd`` and ``torch.std``. Flow-GRPO's ``PerPromptStatTracker`` uses ``np.std`` (biased);
pass ``unbiased=False`` to reproduce it exactly. One convention is used for both the "group"
and the "batch" scales, so text and image advantages (UniGRPO) stay comparable. For G = 8 the
two differ by a factor sqrt(8/7) ~ 1.07 in |A|.

Non-finite rewards (NaN, +-inf: a reward that failed on some samples) are left out: the other
samples' advantages are those of the batch without them, and theirs are exactly 0.
"""

from __future__ import annotations

import torch
from torch import Tensor

#: Valid values of ``scale`` in :func:`group_advantages`.
SCALES: tuple[str, ...] = ("group", "batch", "none")


def _check_rewards(rewards: Tensor, group_ids: Tensor) -> None:
    if rewards.ndim != 1:
        raise ValueError(f"rewards must be 1-D [N], got shape {tuple(rewards.shape)}")
    if group_ids.shape != rewards.shape:
        raise ValueError(
            f"group_ids shape {tuple(group_ids.shape)} must equal rewards shape {tuple(rewards.shape)}"
        )
    if group_ids.is_floating_point() or group_ids.is_complex():
        raise ValueError(f"group_ids must be an integer tensor, got dtype {group_ids.dtype}")


def _groups(rewards: Tensor, group_ids: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Per-sample group index [N] in 0..G-1, group sizes [G] (float), and a flat-group flag [G].

    A group is flat when all its rewards are exactly equal (singletons included): it carries no
    learning signal, and its advantages are set to exactly 0 (no 1e-17 / eps residue, no NaN).
    """
    _, inverse, counts = torch.unique(group_ids, return_inverse=True, return_counts=True)
    n_groups = counts.numel()
    init = rewards.new_zeros(n_groups)
    gmax = init.scatter_reduce(0, inverse, rewards, reduce="amax", include_self=False)
    gmin = init.scatter_reduce(0, inverse, rewards, reduce="amin", include_self=False)
    return inverse, counts.to(rewards.dtype), gmax == gmin


def group_advantages(
    rewards: Tensor,
    group_ids: Tensor,
    scale: str = "group",
    eps: float = 1e-4,
    clip: float | None = None,
    *,
    unbiased: bool = True,
) -> Tensor:
    """Group-relative advantages ``A = (r - mean_group(r)) / (std + eps)``.

    Args:
        rewards: [N] rewards (gathered across ranks, see the module docstring).
        group_ids: [N] integer id of each sample's group (e.g. its prompt index).
        scale: "group" (std of the sample's group, GRPO), "batch" (std of all N rewards,
            Flow-GRPO's SD3 setting), or "none" (centred only, Dr. GRPO).
        eps: added to the std before dividing.
        clip: if given, clamp advantages to [-clip, clip] (Flow-GRPO uses 5).
        unbiased: Bessel-corrected std (TRL, default) or biased std (Flow-GRPO's ``np.std``).

    Returns:
        [N] advantages in ``rewards``' dtype promoted to at least float32. Samples of a group
        whose rewards are all equal (including singleton groups) get exactly 0. Samples whose
        reward is not finite get exactly 0 and are left out of every mean and std: the others'
        advantages equal those computed on the batch without them.
    """
    _check_rewards(rewards, group_ids)
    if scale not in SCALES:
        raise ValueError(f"unknown scale {scale!r}; valid: {', '.join(SCALES)}")
    r = rewards.to(torch.promote_types(rewards.dtype, torch.float32))
    if r.numel() == 0:
        return r.clone()
    finite = torch.isfinite(r)
    if not finite.all():
        adv = torch.zeros_like(r)
        if finite.any():
            adv[finite] = group_advantages(
                r[finite], group_ids[finite], scale, eps, clip, unbiased=unbiased
            )
        return adv

    inverse, counts, flat = _groups(r, group_ids)
    mean = r.new_zeros(counts.numel()).index_add_(0, inverse, r) / counts
    centred = torch.where(flat[inverse], torch.zeros_like(r), r - mean[inverse])

    ddof = 1 if unbiased else 0
    if scale == "group":
        sq = r.new_zeros(counts.numel()).index_add_(0, inverse, centred.square())
        # clamp: a singleton has sq == 0, so its std is 0 rather than 0/0 under Bessel.
        std = (sq / (counts - ddof).clamp(min=1)).sqrt()[inverse]
        adv = centred / (std + eps)
    elif scale == "batch":
        std = r.std(correction=ddof) if r.numel() > 1 else r.new_zeros(())
        adv = centred / (std + eps)
    else:
        adv = centred

    if clip is not None:
        adv = adv.clamp(-clip, clip)
    return adv


def zero_std_fraction(rewards: Tensor, group_ids: Tensor) -> float:
    """Fraction of groups whose rewards are all equal (no signal; singletons count as such), over
    their finite rewards (a group with none counts as flat).

    Args:
        rewards: [N] rewards; group_ids: [N] integer group ids.
    """
    _check_rewards(rewards, group_ids)
    if rewards.numel() == 0:
        return 0.0
    finite = torch.isfinite(rewards)
    n_groups = group_ids.unique().numel()
    r = rewards[finite].to(torch.promote_types(rewards.dtype, torch.float32))
    if r.numel() == 0:
        return 1.0
    _, _, flat = _groups(r, group_ids[finite])
    return (flat.sum().item() + n_groups - flat.numel()) / n_groups
