"""Pieces the discrete and flow recipes share: group advantages across ranks, the LR schedule, the
guarded optimiser step, and the frozen modules' eval mode."""

from __future__ import annotations

import math
import warnings

import lightning as L
import torch
import torch.distributed as dist
from lightning.fabric.utilities.warnings import PossibleUserWarning
from lightning.pytorch.utilities import rank_zero_warn

from unirl_lightning.objectives import group_advantages, zero_std_fraction


def gather_ranks(module: L.LightningModule, x: torch.Tensor) -> torch.Tensor:
    """All ranks' `x`, concatenated along dim 0 (identity on one process)."""
    if not (dist.is_available() and dist.is_initialized()) or module.trainer.world_size == 1:
        return x
    return module.all_gather(x).reshape(-1, *x.shape[1:])


def count_bad_rewards(module: L.LightningModule, rewards: torch.Tensor) -> tuple[torch.Tensor, int, int]:
    """This rank's mask of finite rewards `[N]` (on the module's device), and the non-finite rewards
    and all rewards counted over every rank: the same numbers on each rank, so that what a recipe
    decides from them (skip the step or not, pad micro-batches or not) agrees across ranks."""
    finite = torch.isfinite(rewards).to(module.device)
    counts = torch.tensor([[int((~finite).sum()), finite.numel()]], device=module.device)
    counts = gather_ranks(module, counts).sum(0)
    return finite, int(counts[0]), int(counts[1])


def live_mean(x: torch.Tensor, live: torch.Tensor) -> torch.Tensor:
    """Mean of `[B]` `x` over the `live` rows (bool `[B]`; 0 when none, and a dead row's NaN stays out)."""
    return torch.where(live, x, torch.zeros_like(x)).sum() / live.sum().clamp(min=1)


def rank_advantages(module: L.LightningModule, rewards: torch.Tensor, group_ids: torch.Tensor, *, scale: str,
                    clip: float | None) -> tuple[torch.Tensor, float]:
    """This rank's advantages `[N]`, normalised over every rank's rewards (groups may span ranks),
    and the fraction of zero-std groups. Non-finite rewards are left out (advantage 0)."""
    all_r = gather_ranks(module, rewards.to(module.device))
    all_g = gather_ranks(module, group_ids.to(module.device))
    adv = group_advantages(all_r, all_g, scale=scale, clip=clip)
    zero = zero_std_fraction(all_r, all_g)
    if all_r.shape[0] != rewards.shape[0]:  # keep this rank's rows
        adv = adv.view(module.trainer.world_size, -1)[module.trainer.global_rank]
    return adv, zero


def warmup_cosine(optimizer: torch.optim.Optimizer, warmup_steps: int, max_steps: int) -> dict:
    """Lightning scheduler config: linear warm-up, then cosine decay to 10% of the LR, per step.
    A `max_steps` within the warm-up is tolerated (the decay then ends one step after it)."""
    scheduler = warmup_then_decay(
        optimizer, warmup_steps, "cosine", max(max_steps, warmup_steps + 1), min_ratio=0.1
    )
    return {"scheduler": scheduler, "interval": "step"}


LR_DECAYS = ("constant", "linear", "cosine")


def check_lr_decay(decay: str, warmup_steps: int, total_steps: int | None) -> None:
    """Raise if the decay is unknown, or needs an end (`total_steps`) it does not have."""
    if decay not in LR_DECAYS:
        raise ValueError(f"model.lr_decay must be one of {LR_DECAYS}, got {decay!r}")
    if decay != "constant" and (total_steps is None or total_steps <= warmup_steps):
        raise ValueError(
            f"model.lr_decay {decay!r} decays to trainer.max_steps, which must exceed warmup_steps "
            f"({warmup_steps}); got max_steps {total_steps}. Set trainer.max_steps or use lr_decay: constant"
        )


def warmup_then_decay(
    optimizer: torch.optim.Optimizer,
    warmup_steps: int,
    decay: str,
    total_steps: int | None,
    min_ratio: float = 0.0,
) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up over `warmup_steps`, then the LR held ("constant") or decayed ("linear",
    "cosine") to `min_ratio` x LR at `total_steps` (optimiser steps) and held there."""
    check_lr_decay(decay, warmup_steps, total_steps)

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        if decay == "constant":
            return 1.0
        progress = min((step - warmup_steps) / (total_steps - warmup_steps), 1.0)
        shape = 1 - progress if decay == "linear" else 0.5 * (1 + math.cos(progress * math.pi))
        return min_ratio + (1 - min_ratio) * shape

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def grads_finite(module: L.LightningModule, optimizer: torch.optim.Optimizer) -> bool:
    """Whether every gradient the optimiser would apply is finite, on every rank (one sync)."""
    flags = [
        torch.isfinite(g.to_local() if hasattr(g, "to_local") else g).all()
        for group in optimizer.param_groups
        for p in group["params"]
        if (g := p.grad) is not None
    ]
    ok = bool(torch.stack(flags).all()) if flags else True
    return bool(module.trainer.strategy.reduce_boolean_decision(ok, all=True))


def guarded_step(module: L.LightningModule, optimizer, gradient_clip_val: float | None) -> bool:
    """Step (clipping first, if set) only if every gradient is finite; zero the gradients either way.

    One non-finite loss (a NaN reward, an overflow) would otherwise write NaN into every weight
    and silently end learning; the step is skipped with a warning instead and counted in
    `module.skipped_steps` (recipes log it as `train/skipped_steps`). Returns whether it stepped.
    """
    finite = grads_finite(module, optimizer.optimizer if hasattr(optimizer, "optimizer") else optimizer)
    if finite:
        if gradient_clip_val:
            module.clip_gradients(
                optimizer, gradient_clip_val=gradient_clip_val, gradient_clip_algorithm="norm"
            )
    else:
        module.skipped_steps += 1
        rank_zero_warn(
            f"{type(module).__name__}: non-finite gradients at step {module.global_step}; the optimiser "
            f"step is skipped ({module.skipped_steps} so far, logged as train/skipped_steps)"
        )
        # No gradients: the step below updates nothing (torch optimisers skip parameters without
        # one), but still counts, so trainer.global_step and max_steps advance.
        optimizer.zero_grad(set_to_none=True)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return finite


def expect_frozen_eval_modules(module: L.LightningModule) -> None:
    """Frozen references, encoders and reward models stay in eval mode on purpose (no dropout, fused
    inference kernels), and Lightning warns at the start of training about every module in eval
    mode. When every eval-mode module lies inside a frozen subtree (no trainable parameter), that
    warning says nothing and is silenced for this count of modules; otherwise it stays, to point
    at a trainable module left in eval mode by mistake."""
    training = {name: m.training for name, m in module.named_modules()}
    in_eval = [name for name, is_training in training.items() if not is_training]
    tops = [name for name in in_eval if name and training.get(name.rpartition(".")[0], True)]
    frozen = all(not any(p.requires_grad for p in module.get_submodule(name).parameters()) for name in tops)
    if in_eval and "" not in in_eval and frozen:
        warnings.filterwarnings(
            "ignore", message=rf"Found {len(in_eval)} module\(s\) in eval mode", category=PossibleUserWarning
        )


def rng_states() -> dict:
    """The global random states a run draws from: torch (CPU and every CUDA device), Python, numpy."""
    import random

    import numpy as np

    name, keys, pos, has_gauss, gauss = np.random.get_state()
    # plain types and tensors only, so checkpoints load with torch.load(weights_only=True)
    numpy_state = (name, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(gauss))
    states = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": numpy_state}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def set_rng_states(states: dict) -> None:
    """Restore what `rng_states` returned."""
    import random

    import numpy as np

    torch.set_rng_state(states["torch"])
    random.setstate(states["python"])
    name, keys, pos, has_gauss, gauss = states["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


class isolated_rng:
    """Context manager: the code inside draws from the global generators, which are put back as they
    were on exit, so it does not shift the random stream of what runs after it (a warm start trained
    in the process, a validation pass between training steps)."""

    def __enter__(self) -> "isolated_rng":
        self._states = rng_states()
        return self

    def __exit__(self, *exc) -> None:
        set_rng_states(self._states)
