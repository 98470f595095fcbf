"""Likelihood-free flow RL: train on the forward (noising) process of the policy's own samples.

Per step: P prompts x G images from a sampler (any: ODE by default, no per-step log-probs kept)
-> rewards -> group-centred advantages over the batch's std -> each image's final latent `x0` is
re-noised at `k` times of the sampler's own grid with fresh noise, `x_t = (1 - t) x0 + t eps`,
and trained with a reward-weighted flow-matching loss on the target `eps - x0`, plus `beta` x the
velocity MSE to the frozen reference. `DiffusionNFT` and `AdvantageWeightedMatching` choose the loss
and the anchor models; this base does the rest (rollouts, time sampling, micro-batches, LoRA,
reference, accumulation over rollouts, the LR schedule).
"""

from __future__ import annotations

import math
import time
from abc import abstractmethod
from pathlib import Path
from typing import Literal

import torch
from torch import Tensor

from unirl_lightning.data.datamodule import PromptBatch
from unirl_lightning.models.flow.base import FlowPolicy, TextCondition
from unirl_lightning.modules.flow_base import FlowPolicyModule, check_lora_settings
from unirl_lightning.modules.training import guarded_step, rank_advantages, warmup_then_decay
from unirl_lightning.modules.warm_start import ensure_flow_warm_start
from unirl_lightning.objectives import noised, velocity_mse
from unirl_lightning.rewards.base import RewardFunction, RolloutContext, combine_rewards, finite_mean
from unirl_lightning.rewards.geneval import GenEvalReward


def timestep_indices(
    rows: int, k: int, lo: int, hi: int, how: Literal["subset", "stratified"], generator=None
) -> Tensor:
    """long `[rows, k]` grid indices in `[lo, hi)` per row: `k` distinct ones uniformly ("subset",
    DiffusionNFT) or one uniform pick in each of `k` contiguous strata ("stratified", AWM)."""
    span = hi - lo
    if not 1 <= k <= span:
        raise ValueError(f"timesteps_per_sample must be in 1..{span} (the range [{lo}, {hi})), got {k}")
    if how == "subset":
        return torch.rand(rows, span, generator=generator).argsort(1)[:, :k] + lo
    bounds = torch.linspace(0, span, k + 1).floor().long()  # strata [b_i, b_i+1), each non-empty
    width = (bounds[1:] - bounds[:-1]).clamp_min(1)
    pick = (torch.rand(rows, k, generator=generator) * width).floor().long()
    return (bounds[:-1] + pick).clamp(max=span - 1) + lo


class ForwardProcessRL(FlowPolicyModule):
    """Base of the forward-process flow RL recipes.

    Args:
        policy: a `FlowPolicy`.
        rewards: reward terms (default: GenEval partial credit with the world's detector).
        num_steps / noise_level / kind / sde_window: the rollout sampler (noise 0: the ODE; the
            losses need only final samples, so any sampler works).
        same_latent: one initial noise per prompt group.
        cfg_scale: CFG of the rollouts (1 = none, as both papers sample).
        timesteps_per_sample: times each sample is trained at, from the sampler's grid.
        timestep_range: `[lo, hi)` grid indices they are drawn from (default every step, t = 1 included).
        timestep_sampling: "subset" (distinct uniform picks) or "stratified" (one per stratum).
        adv_clip: K, the advantage clip of the reward mapping.
        scale: advantage normalisation ("batch": group mean, the batch's std, as both papers).
        beta: weight of the velocity MSE to the frozen reference (0: no reference held).
        rollouts_per_update / micro_batch_size: accumulation over rollouts, (sample, time) pairs per
            backward.
        lora_rank / lora_alpha / lora_target_modules: as FlowGRPO's (the reference is then the base
            model, adapters disabled).
        gradient_clip_val / warmup_steps: as FlowGRPO's.
        Other arguments as in `FlowPolicyModule`.
    """

    def __init__(
        self,
        policy: FlowPolicy,
        rewards: list[RewardFunction] | None = None,
        num_steps: int = 10,
        noise_level: float = 0.0,
        kind: Literal["sde", "dance", "cps"] = "sde",
        sde_window: tuple[int, int] | None = None,
        same_latent: bool = False,
        cfg_scale: float = 1.0,
        timesteps_per_sample: int = 9,
        timestep_range: tuple[int, int] | None = None,
        timestep_sampling: Literal["subset", "stratified"] = "subset",
        adv_clip: float = 5.0,
        scale: Literal["group", "batch", "none"] = "batch",
        beta: float = 1e-4,
        rollouts_per_update: int = 1,
        micro_batch_size: int = 64,
        lora_rank: int = 0,
        lora_alpha: float | None = None,
        lora_target_modules: list[str] | None = None,
        gradient_clip_val: float | None = 1.0,
        warmup_steps: int = 0,
        **kwargs,
    ):
        super().__init__(policy, **kwargs)
        lo, hi = (0, num_steps) if timestep_range is None else tuple(timestep_range)
        if not 0 <= lo < hi <= num_steps:
            raise ValueError(
                f"model.timestep_range must satisfy 0 <= lo < hi <= num_steps={num_steps}, got {[lo, hi]}"
            )
        if not 1 <= timesteps_per_sample <= hi - lo:
            raise ValueError(
                f"model.timesteps_per_sample must be in 1..{hi - lo} (timestep_range [{lo}, {hi})), "
                f"got {timesteps_per_sample}"
            )
        if timestep_sampling not in ("subset", "stratified"):
            raise ValueError(
                f"model.timestep_sampling must be 'subset' or 'stratified', got {timestep_sampling!r}"
            )
        if min(rollouts_per_update, micro_batch_size) < 1 or num_steps < 2:
            raise ValueError("model.rollouts_per_update and micro_batch_size must be >= 1, num_steps >= 2")
        check_lora_settings(policy, lora_rank, lora_target_modules)
        self.rewards = rewards if rewards is not None else [GenEvalReward("partial")]
        self.automatic_optimization = False  # micro-batches of (sample, time) pairs, accumulation
        self.reference: FlowPolicy | None = None
        self._time_range = (lo, hi)

    # ---- models ---------------------------------------------------------------------------
    def auto_warm_start(self) -> Path | None:
        return ensure_flow_warm_start(self.policy)

    def setup(self, stage: str) -> None:
        super().setup(stage)  # the warm start first: adapters and frozen copies follow it
        hp = self.hparams
        self.add_lora_adapters()
        if hp.beta > 0 and not hp.lora_rank and self.reference is None:
            self.reference = self.policy.make_reference()
        self.make_anchors()

    def make_anchors(self) -> None:
        """Hook: build the recipe's frozen copies of the policy (after the warm start and LoRA)."""

    def frozen_copy(self) -> FlowPolicy:
        return self.policy.make_reference().to(self.device)

    @staticmethod
    @torch.no_grad()
    def soft_update(copy: torch.nn.Module, live: torch.nn.Module, decay: float) -> None:
        """`copy <- decay * copy + (1 - decay) * live`, parameter by parameter."""
        for c, p in zip(copy.parameters(), live.parameters(), strict=True):
            c.lerp_(p.detach().to(c.dtype), 1.0 - decay)

    def sharded_modules(self) -> list[torch.nn.Module]:
        return [m for m in (self.policy, self.reference, *self.anchor_models()) if m is not None]

    def anchor_models(self) -> list[torch.nn.Module]:
        return []

    def sampling_policy(self) -> FlowPolicy:
        """The policy that draws the rollouts (the live one; DiffusionNFT: its old policy)."""
        return self.policy

    # ---- optimiser ------------------------------------------------------------------------
    def configure_optimizers(self):
        opt = super().configure_optimizers()
        steps = self.trainer.max_steps if self._trainer is not None and self.trainer.max_steps > 0 else None
        sched = warmup_then_decay(opt, max(self.hparams.warmup_steps, 0), "constant", steps)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    # ---- rollout --------------------------------------------------------------------------
    @torch.no_grad()
    def make_rollouts(self, batch: PromptBatch) -> RolloutContext:
        hp = self.hparams
        t0 = time.perf_counter()
        rollout = self.sampling_policy().sample(
            batch.prompts,
            num_steps=hp.num_steps,
            noise_level=hp.noise_level,
            cfg_scale=hp.cfg_scale,
            kind=hp.kind,
            sde_window=None if hp.sde_window is None else tuple(hp.sde_window),
            groups=batch.group_ids if hp.same_latent else None,
        )
        ctx = RolloutContext(specs=batch.specs, rollout=rollout, images=rollout.images)
        ctx.cache["rollout_s"] = time.perf_counter() - t0
        return ctx

    # ---- training -------------------------------------------------------------------------
    @abstractmethod
    def sample_loss(
        self,
        velocity: Tensor,
        x_t: Tensor,
        target: Tensor,
        t: Tensor,
        advantages: Tensor,
        cond: TextCondition,
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """The recipe's loss per (sample, time) pair `[m]` and its logged statistics."""

    def after_update(self) -> None:
        """Hook: runs after each optimiser step (e.g. to move an old policy toward the live one)."""

    def training_step(self, batch: PromptBatch, batch_idx: int) -> None:
        hp = self.hparams
        ctx = batch.rollout if batch.rollout is not None else self.make_rollouts(batch)
        rollout = ctx.rollout
        t0 = time.perf_counter()
        rewards, logs = combine_rewards(self.rewards, ctx)
        finite, bad, all_bad = self.screen_rewards(rewards, ctx)
        adv, zero_frac = rank_advantages(self, rewards, batch.group_ids, scale=hp.scale, clip=None)
        x0 = rollout.latents[:, -1]
        n, k = len(x0), hp.timesteps_per_sample
        index = timestep_indices(n, k, *self._time_range, hp.timestep_sampling).to(x0.device)
        rows = torch.arange(n, device=x0.device).repeat_interleave(k)
        times = rollout.sigmas.to(x0.device)[index.flatten()]
        if bad:  # a NaN / inf reward: the sample trains nothing (not even toward the anchors)
            # keep pairs of bad rows as weight-0 padding so sharded ranks run as many backwards
            live = finite.to(x0.device)[rows]
        else:
            live = torch.ones_like(rows, dtype=torch.bool)
        if all_bad:
            self.empty_batches += 1
        opt = self.optimizers()
        update = (batch_idx + 1) % hp.rollouts_per_update == 0
        acc: dict[str, list[float]] = {}
        mb = hp.micro_batch_size
        chunks = zip(rows.split(mb), times.split(mb), live.split(mb))
        for part, t, keep in [] if all_bad else chunks:
            x_t, target = noised(x0[part], torch.randn_like(x0[part]), t)
            cond = self.text_condition([rollout.prompts[r] for r in part.tolist()])
            v = self.policy.velocity(x_t, t, cond)
            loss, stats = self.sample_loss(v, x_t, target, t, adv[part], cond)
            if hp.beta > 0:
                penalty = velocity_mse(v, self.reference_velocity(x_t, t, cond))
                stats["velocity_mse_ref"] = penalty.detach().mean()
                loss = loss + hp.beta * penalty
            stats["fm_mse"] = (v.detach() - target).flatten(1).square().mean()
            trained = max(int(finite.sum()), 1) * k  # the mean over the finite samples' pairs
            self.manual_backward(torch.where(keep, loss, 0.0).sum() / trained / hp.rollouts_per_update)
            for key, value in stats.items():
                acc.setdefault(key, []).append(float(value))
        if update:
            guarded_step(self, opt, hp.gradient_clip_val)
            self.lr_schedulers().step()
            self.after_update()
        logs.update({f"policy/{key}": sum(v) / len(v) for key, v in acc.items()})
        logs.update(
            {
                "reward/total": finite_mean(rewards),
                "reward/std": rewards[finite.cpu()].std().item() if int(finite.sum()) > 1 else 0.0,
                "train/zero_std_frac": zero_frac,
                "train/skipped_steps": float(self.skipped_steps),
                "train/empty_batches": float(self.empty_batches),
                "train/bad_rewards": float(bad),
                "train/adv_abs": adv.abs().mean().item(),
                "train/lr": opt.param_groups[0]["lr"],
                "time/rollout_s": ctx.cache.get("rollout_s", math.nan),
                "time/train_s": time.perf_counter() - t0,
            }
        )
        self.log_dict(logs, prog_bar=False, batch_size=n)
        self.log("reward", finite_mean(rewards), prog_bar=True, batch_size=n)
