"""FlowGRPO (Flow-GRPO; UniGRPO's image side): GRPO on the denoising steps of a flow policy.

Per step: P prompts x G images by the SDE sampler (stochastic steps inside the SDE window,
each with its log-prob) -> rewards -> group-relative advantages (clipped to +-5) -> `mu` passes
of the clipped-ratio loss on every trained step, one backward per (micro-batch, step) so memory
stays at one step's activations, plus `beta` x a regulariser to the frozen reference evaluated
at the rollout states: velocity MSE (UniGRPO, default), Flow-GRPO's latent KL, the exact step
KL, or none. Rollout and training use the same CFG scale (default 1: no CFG, one forward a step).
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Literal

import torch

from unirl_lightning.data.datamodule import PromptBatch
from unirl_lightning.models.flow.base import (
    FlowPolicy,
    FlowRollout,
    StepOutput,
    TextCondition,
    _GroupRows,
)
from unirl_lightning.modules.flow_base import FlowPolicyModule, check_lora_settings
from unirl_lightning.modules.training import (
    check_lr_decay,
    guarded_step,
    live_mean,
    rank_advantages,
    warmup_then_decay,
)
from unirl_lightning.modules.warm_start import ensure_flow_warm_start
from unirl_lightning.objectives import (
    exact_latent_kl,
    latent_kl,
    noise_aware_step_weights,
    policy_loss,
    velocity_mse,
)
from unirl_lightning.rewards.base import RewardFunction, RolloutContext, combine_rewards, finite_mean
from unirl_lightning.rewards.geneval import GenEvalReward
from unirl_lightning.worlds.vocab import TASKS

REGULARIZERS = ("velocity_mse", "latent_kl", "exact_kl", "none")
STEP_WEIGHTINGS = ("uniform", "noise_std", "noise_var")


def _window_range(window: tuple[int, int] | None, num_steps: int) -> tuple[int, int]:
    """`[lo, hi)`: the steps of `window` a random window may cover (never the last, ODE step)."""
    lo, hi = (0, num_steps) if window is None else (int(window[0]), int(window[1]))
    if not 0 <= lo < hi <= num_steps:
        raise ValueError(
            f"model.sde_window must satisfy 0 <= start < end <= num_steps={num_steps}, got {window}"
        )
    return lo, min(hi, num_steps - 1)


def _random_window(window, num_steps: int, size: int) -> tuple[int, int]:
    """A `size`-step window at a uniformly random start inside `window`'s coverable range."""
    lo, hi = _window_range(None if window is None else tuple(window), num_steps)
    start = lo + int(torch.randint(hi - lo - size + 1, (1,)))
    return (start, start + size)


def _check_task_window(task: str, window, num_steps: int, size: int) -> None:
    """`model.sde_window_by_task` entry: a GenEval task and a `[lo, hi)` range that fits a window of
    `size`."""
    field = f"model.sde_window_by_task.{task}"
    if task not in TASKS:
        raise ValueError(f"{field}: unknown task; GenEval's tasks are {list(TASKS)}")
    if len(window) != 2:
        raise ValueError(f"{field}: give a [lo, hi) range of window starts' steps, got {window}")
    lo, hi = _window_range(tuple(window), num_steps)
    if hi - lo < size:
        raise ValueError(
            f"{field}: [{lo}, {hi}) (the last step never trains) cannot hold a window of "
            f"sde_window_size {size}; widen it"
        )


class FlowGRPO(FlowPolicyModule):
    """GRPO over the SDE steps of a flow-matching policy.

    Args:
        policy: a `FlowPolicy` (the built-in `TinyFlowModel`, `DiffusersFlowPolicy` for SD3 / SD3.5,
            `models.flux.DiffusersFluxPolicy` for FLUX.1).
        rewards: reward terms (default: GenEval partial credit with the world's detector).
        num_steps / noise_level / kind: the rollout sampler (`objectives.sde_step` kinds).
        sde_window: fixed `[start, end)` steps sampled by SDE (trained); others are ODE steps.
        sde_window_size: if set, a window of this many steps at a random start each training
            step (Flow-GRPO-Fast), inside `sde_window` (then the range the windows may cover, as
            Flow-GRPO-Fast's `sde_window_range`; default every step but the last).
        sde_window_per_group: with `sde_window_size`, each prompt group draws its own random
            window rather than the whole rollout sharing one, so every rollout trains a spread
            of steps (rows are re-scored only at their own window's steps, packed as (row, step)
            pairs into micro-batches). Lifts colour attribution most (benchmarks/flow_grpo.md,
            "SDE window"); `configs/flow_grpo.yaml` sets it.
        sde_window_by_task: with `sde_window_size`, `{task: [lo, hi)}` ranges that the windows of
            that GenEval task's groups are drawn from (e.g. layout tasks early, colours anywhere);
            tasks not named use `sde_window`. Implies per-group windows.
        same_latent: one initial noise per prompt group (Flow-GRPO's `same_latent`), so reward
            differences inside a group come only from the trained SDE steps, not from the
            untrained initial noise (less advantage noise; benchmarks/flow_grpo.md). The ODE
            steps before the SDE window then run once per prompt, not once per image.
        cfg_scale: CFG of rollouts and of the training log-probs (1 = none, UniGRPO).
        num_iterations: mu, update passes over each rollout (old log-probs from the rollout).
        rollouts_per_update: accumulate gradients over this many training steps (rollout
            batches) before an optimiser step (Flow-GRPO accumulates over several sample
            batches); with num_iterations > 1 every pass still steps once per rollout.
        micro_batch_size: rows per backward (with one backward per trained step).
        train_tied_groups: False skips the backward of rows whose advantage is exactly 0 (groups
            whose rewards all tie): their policy-gradient term is 0, so the policy gradient is
            unchanged and the regulariser is taken as its mean over the trained rows (the same
            strength, on fewer states). Saves the tied share of the training compute. Under
            data parallelism every rank trains as many rows as the rank with the most untied
            ones (equal backward counts for the collectives), filling with tied rows. Rows whose
            reward is NaN or inf never train (`train/bad_rewards`): they fill last, loss masked.
        clip_range: ratio clip epsilon; ~1e-4 for mean-over-dims log-probs (Flow-GRPO).
        scale / adv_clip: advantage normalisation ("batch" = Flow-GRPO's global std for SD3,
            "group", "none") and clip.
        step_weighting: "uniform" (Flow-GRPO: every trained step's loss counts alike) or "noise_std"
            (each step's policy loss times its transition std over the mean std: evens out the
            per-step gradients, which otherwise shrink ~8x toward the first, layout-deciding
            steps; `objectives.noise_aware_step_weights`), or "noise_var" (times the variance: each
            step's Fisher information divided out, the early steps favoured further). Weights
            average 1 over the rollout's trained steps, or for a random `sde_window_size` window
            over every step a window can cover (so that its weights keep their size against
            other windows'); the regulariser is not reweighted.
        regularizer / beta: penalty to the frozen reference, times beta (0 or "none": no penalty).
        track_reference: keep the frozen reference even without a penalty, to log the velocity
            MSE to it (one no-grad forward per trained step).
        lora_rank: 0 trains every weight (the reference is a frozen copy); r > 0 freezes the
            policy and trains a rank-r LoRA adapter on its transformer (peft), whose base model,
            adapters disabled, is the reference (no copy held). Saved policies have it merged.
        lora_alpha / lora_target_modules: LoRA scale alpha (None: = rank; scaling alpha / r) and
            modules (None: the policy's default, SD3's attention projections).
        gradient_clip_val: max gradient norm per optimiser step (None: no clipping).
        warmup_steps: linear learning-rate warm-up (Adam's first, bias-corrected updates move
            every parameter by ~lr along a mostly-noise gradient; warming up avoids that shock).
        lr_decay / lr_min_ratio: after the warm-up, hold the LR ("constant") or decay it
            ("linear", "cosine") to `lr_min_ratio` x lr at `trainer.max_steps` optimiser steps.
            On the built-in config, 2e-4 decayed linearly matches 1e-4 held (mean of three seeds)
            where 2e-4 held is unstable (benchmarks/flow_grpo.md, "Learning rate").
        Other arguments as in `FlowPolicyModule`.
    """

    def __init__(
        self,
        policy: FlowPolicy,
        rewards: list[RewardFunction] | None = None,
        num_steps: int = 10,
        noise_level: float = 0.7,
        kind: Literal["sde", "dance", "cps"] = "sde",
        sde_window: tuple[int, int] | None = None,
        sde_window_size: int | None = None,
        sde_window_per_group: bool = False,
        sde_window_by_task: dict[str, tuple[int, int]] | None = None,
        same_latent: bool = False,
        cfg_scale: float = 1.0,
        num_iterations: int = 1,
        rollouts_per_update: int = 1,
        micro_batch_size: int = 64,
        train_tied_groups: bool = True,
        clip_range: float = 1e-4,
        scale: Literal["group", "batch", "none"] = "batch",
        adv_clip: float | None = 5.0,
        step_weighting: Literal["uniform", "noise_std", "noise_var"] = "uniform",
        regularizer: Literal["velocity_mse", "latent_kl", "exact_kl", "none"] = "velocity_mse",
        beta: float = 0.1,
        track_reference: bool = True,
        lora_rank: int = 0,
        lora_alpha: float | None = None,
        lora_target_modules: list[str] | None = None,
        gradient_clip_val: float | None = 1.0,
        warmup_steps: int = 0,
        lr_decay: Literal["constant", "linear", "cosine"] = "constant",
        lr_min_ratio: float = 0.0,
        **kwargs,
    ):
        super().__init__(policy, **kwargs)
        if regularizer not in REGULARIZERS:
            raise ValueError(f"model.regularizer must be one of {REGULARIZERS}, got {regularizer!r}")
        if step_weighting not in STEP_WEIGHTINGS:
            raise ValueError(f"model.step_weighting must be one of {STEP_WEIGHTINGS}, got {step_weighting!r}")
        if regularizer == "exact_kl" and kind != "sde":
            raise ValueError("model.regularizer 'exact_kl' is the closed form of kind 'sde'; use kind: sde")
        if min(num_iterations, micro_batch_size, rollouts_per_update) < 1 or num_steps < 2:
            raise ValueError(
                "model.num_iterations, rollouts_per_update and micro_batch_size must be >= 1, num_steps >= 2"
            )
        if num_iterations > 1 and rollouts_per_update > 1:
            raise ValueError(
                "model.num_iterations > 1 needs rollouts_per_update == 1 (each pass steps the optimiser)"
            )
        if sde_window_size is not None:
            lo, hi = _window_range(sde_window, num_steps)
            if not 1 <= sde_window_size <= hi - lo:
                raise ValueError(
                    f"model.sde_window_size must be in 1..{hi - lo} (the trainable steps of sde_window "
                    f"[{lo}, {hi}) with num_steps {num_steps}), got {sde_window_size}"
                )
        if (sde_window_per_group or sde_window_by_task) and sde_window_size is None:
            raise ValueError(
                "model.sde_window_per_group / sde_window_by_task draw random windows: set sde_window_size too"
            )
        for task, window in (sde_window_by_task or {}).items():
            _check_task_window(task, window, num_steps, sde_window_size)
        check_lr_decay(
            lr_decay, warmup_steps, None if lr_decay == "constant" else math.inf
        )  # the name; max_steps at setup
        if not 0 <= lr_min_ratio <= 1:
            raise ValueError(f"model.lr_min_ratio must be in [0, 1], got {lr_min_ratio}")
        if rewards is None:
            rewards = [GenEvalReward("partial")]
        self.rewards = rewards
        self.automatic_optimization = False  # mu passes, micro-batches and one backward per step
        check_lora_settings(policy, lora_rank, lora_target_modules)
        # with LoRA the base model (adapters disabled) is the reference: no copy
        self.reference = policy.make_reference() if self.uses_reference and not lora_rank else None

    @property
    def penalised(self) -> bool:
        return self.hparams.regularizer != "none" and self.hparams.beta > 0

    @property
    def uses_reference(self) -> bool:
        return self.penalised or self.hparams.track_reference

    @property
    def has_reference(self) -> bool:
        return self.uses_reference and (self.reference is not None or self.policy.has_lora)

    def auto_warm_start(self) -> Path | None:
        return ensure_flow_warm_start(self.policy)  # the built-in model's cached warm start; None for others

    def on_warm_started(self) -> None:
        if self.uses_reference and not self.hparams.lora_rank:
            self.reference = self.policy.make_reference().to(self.device)

    def setup(self, stage: str) -> None:
        if stage == "fit":  # before the warm start and any rollout
            check_lr_decay(self.hparams.lr_decay, max(self.hparams.warmup_steps, 0), self._decay_end())
        super().setup(stage)  # the warm start first: adapters go on the warm-started weights
        self.add_lora_adapters()

    def configure_optimizers(self):
        return self.scheduled(super().configure_optimizers())

    def scheduled(self, opt: torch.optim.Optimizer) -> dict:
        """Lightning's optimiser config: `opt` with the warm-up and `lr_decay` schedule, per optimiser
        step."""
        hp = self.hparams
        sched = warmup_then_decay(
            opt, max(hp.warmup_steps, 0), hp.lr_decay, self._decay_end(), hp.lr_min_ratio
        )
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def _decay_end(self) -> int | None:
        """Optimiser steps of the fit (`trainer.max_steps`; None when unset)."""
        return self.trainer.max_steps if self._trainer is not None and self.trainer.max_steps > 0 else None

    # ---- rollout (called by the DataModule on device) ---------------------------------------
    def sde_window(self) -> tuple[int, int] | None:
        """This step's SDE window: random of `sde_window_size` steps, or the fixed one."""
        hp = self.hparams
        if hp.sde_window_size is None:
            return None if hp.sde_window is None else tuple(hp.sde_window)
        return _random_window(hp.sde_window, hp.num_steps, hp.sde_window_size)

    @property
    def windows_per_group(self) -> bool:
        return bool(self.hparams.sde_window_per_group or self.hparams.sde_window_by_task)

    def group_windows(self, batch: PromptBatch) -> torch.Tensor:
        """long `[B, 2]`: one random `sde_window_size` window per prompt group, drawn inside its
        task's `sde_window_by_task` range (else `sde_window`'s), on each of the group's rows."""
        hp = self.hparams
        by_task = hp.sde_window_by_task or {}
        groups = _GroupRows(batch.group_ids, torch.device("cpu"))
        return groups.expand(
            torch.tensor(
                [
                    _random_window(
                        by_task.get(batch.specs[first].get("tag"), hp.sde_window),
                        hp.num_steps,
                        hp.sde_window_size,
                    )
                    for first in groups.first.tolist()
                ]
            )
        )

    @torch.no_grad()
    def make_rollouts(self, batch: PromptBatch) -> RolloutContext:
        hp = self.hparams
        t0 = time.perf_counter()
        # One initial noise per group: the ODE steps before the SDE window then run once per prompt.
        groups = batch.group_ids if hp.same_latent else None
        windows = (
            dict(sde_windows=self.group_windows(batch))
            if self.windows_per_group
            else dict(sde_window=self.sde_window())
        )
        rollout = self.policy.sample(
            batch.prompts,
            num_steps=hp.num_steps,
            noise_level=hp.noise_level,
            cfg_scale=hp.cfg_scale,
            kind=hp.kind,
            groups=groups,
            **windows,
        )
        ctx = RolloutContext(specs=batch.specs, rollout=rollout, images=rollout.images)
        ctx.cache["rollout_s"] = time.perf_counter() - t0
        return ctx

    # ---- training -------------------------------------------------------------------------
    @torch.no_grad()
    def _reference_step(
        self, rollout: FlowRollout, step: int | tuple[torch.Tensor, torch.Tensor]
    ) -> StepOutput:
        """The reference's output at one step of every row, or at `(rows, steps)` pairs."""

        def score(policy: FlowPolicy) -> StepOutput:
            return (
                policy.step_log_prob(rollout, step)
                if isinstance(step, int)
                else policy.pairs_log_prob(rollout, *step)
            )

        if self.reference is not None:
            return score(self.reference)
        with self.policy.adapters_disabled():
            return score(self.policy)

    def _penalty(
        self, out: StepOutput, ref: StepOutput, rollout: FlowRollout, step: int | torch.Tensor
    ) -> torch.Tensor:
        """`[B]` regulariser of one step (or of `[B]` rows' own steps) against the reference at the same
        states."""
        name = self.hparams.regularizer
        s, s_next = rollout.sigmas[step], rollout.sigmas[step + 1]
        if name == "velocity_mse":
            return velocity_mse(out.velocity, ref.velocity)
        if name == "latent_kl":  # Flow-GRPO's form: std = sigma_t = transition std / sqrt(|dt|)
            gap = (s - s_next).sqrt()
            gap = gap.reshape(-1, *[1] * (out.std.ndim - 1)) if gap.ndim else gap  # [B]: each row's own step
            return latent_kl(out.mean, ref.mean, out.std.detach() / gap)
        return exact_latent_kl(out.velocity, ref.velocity, s, s_next, float(rollout.noise_levels[step].max()))

    def step_weights(self, rollout: FlowRollout, steps: list[int] | None = None) -> list[float]:
        """One policy-loss weight per trained step of `rollout` (or per step of `steps`; `step_weighting`)."""
        hp = self.hparams
        steps = rollout.trained_steps if steps is None else steps
        if hp.step_weighting == "uniform" or not steps:
            return [1.0] * len(steps)
        power = 2.0 if hp.step_weighting == "noise_var" else 1.0
        if hp.sde_window_size is None:
            return noise_aware_step_weights(
                rollout.sigmas, rollout.noise_levels, steps, rollout.kind, power
            ).tolist()
        # A random window is weighted against every step a window can cover: a one-step window
        # (TempFlow-GRPO's branching) early in the schedule then outweighs one late in it.
        candidates = self._coverable_steps()
        levels = torch.full((hp.num_steps,), float(hp.noise_level))
        return noise_aware_step_weights(
            rollout.sigmas, levels, steps, rollout.kind, power, normalize_over=candidates
        ).tolist()

    def _coverable_steps(self) -> list[int]:
        """Every step a random window can cover (`sde_window`'s range and each task's)."""
        hp = self.hparams
        ranges = [hp.sde_window, *(hp.sde_window_by_task or {}).values()]
        return sorted(
            {j for r in ranges for j in range(*_window_range(None if r is None else tuple(r), hp.num_steps))}
        )

    @torch.no_grad()
    def _frozen_condition(self, rollout: FlowRollout, rows: torch.Tensor) -> TextCondition | None:
        """Rows' prompts encoded once, without gradient, when the text encoder is frozen (else None:
        the policy encodes them in the graph)."""
        return (
            None
            if self.policy.text_trainable
            else self.policy.encode_text([rollout.prompts[r] for r in rows.tolist()])
        )

    def _trained_rows(self, adv: torch.Tensor, finite: torch.Tensor, uneven: bool) -> torch.Tensor:
        """Rows to back-propagate, long `[m]`: those with a finite reward (bool `[N]` `finite`), or
        (`train_tied_groups: False`) those with a non-zero advantage; when ranks may differ (`uneven`,
        the same on every rank) padded to the most any rank has, with tied rows first, then rows
        with a bad reward (whose loss the caller masks out)."""
        eligible = finite if self.hparams.train_tied_groups else adv != 0
        count = torch.tensor(int(eligible.sum()), device=adv.device)
        count = int(self.all_gather(count).max()) if uneven and self.trainer.world_size > 1 else int(count)
        priority = eligible.to(torch.int8) + finite.to(torch.int8)
        return torch.argsort(priority, descending=True, stable=True)[:count].sort().values

    def training_step(self, batch: PromptBatch, batch_idx: int) -> None:
        hp = self.hparams
        ctx = batch.rollout if batch.rollout is not None else self.make_rollouts(batch)
        rollout: FlowRollout = ctx.rollout
        t0 = time.perf_counter()
        rewards, logs = combine_rewards(self.rewards, ctx)
        finite, bad, _ = self.screen_rewards(rewards, ctx)
        adv, zero_frac = rank_advantages(
            self, rewards, batch.group_ids, scale=self.hparams.scale, clip=self.hparams.adv_clip
        )
        steps = rollout.trained_steps
        weights = self.step_weights(rollout, steps)
        per_row = rollout.steps_per_row  # each row's loss averages over its own trained steps
        n = len(rollout)
        trained = self._trained_rows(adv, finite, uneven=not hp.train_tied_groups or bad > 0)
        m = len(trained)
        # rows with a bad reward are masked out: the policy loss averages over the n_live rows with a
        # finite reward, the regulariser over the m_live of them that train
        n_live, m_live = int(finite.sum()), int(finite[trained].sum())
        opt = self.optimizers()
        accumulate = hp.rollouts_per_update
        update = (batch_idx + 1) % accumulate == 0  # gradients accumulate over this many rollouts
        # Every backward re-scores (row, step) pairs (`pairs_log_prob`): one window pairs each
        # micro-batch of rows with each trained step; per-row windows pack every row's own steps
        # into micro-batches, so a rollout costs as many backwards as with one window (a backward
        # per step ran ~14-row batches, 2.5x the training time). Every row has the same number of
        # steps, so each rank makes the same number of backwards (FSDP's collectives match).
        if m == 0:  # every group tied or bad on every rank: nothing to train (each rank agrees, no backward)
            parts = []
            self.empty_batches += 1
        elif rollout.row_mask is None:
            parts = []
            for rows in trained.split(hp.micro_batch_size):
                cond = self._frozen_condition(rollout, rows)
                parts += [(rows, torch.full_like(rows, j), weight, cond) for j, weight in zip(steps, weights)]
        else:
            row_idx, pair_steps = rollout.row_mask[trained].nonzero(as_tuple=True)
            step_weight = torch.zeros(rollout.num_steps, device=adv.device)
            step_weight[steps] = torch.tensor(weights, device=adv.device)
            parts = [
                (rows, at, step_weight[at], self._frozen_condition(rollout, rows))
                for rows, at in zip(
                    trained[row_idx].split(hp.micro_batch_size), pair_steps.split(hp.micro_batch_size)
                )
            ]
        ref_cache: dict[int, StepOutput] = {}
        acc: dict[str, list[float]] = {}
        for _ in range(hp.num_iterations):
            for c, (rows, at, weight, cond) in enumerate(parts):
                out, old = self.policy.pairs_log_prob(rollout, rows, at, cond), rollout.log_probs[rows, at]
                live = finite[rows]
                # a positive weight scales the clipped surrogate -min(rA, clip(r)A) exactly as it scales A
                loss, stats = policy_loss(
                    out.log_prob[:, None],
                    old[:, None],
                    weight * adv[rows],
                    live[:, None],
                    epsilon_low=hp.clip_range,
                )
                loss = loss * len(rows) / max(n_live, 1)  # untrained rows: advantage 0, no gradient
                stats["approx_kl"] = live_mean(0.5 * (out.log_prob.detach() - old).square(), live)
                if self.has_reference:
                    if c not in ref_cache:
                        ref_cache[c] = self._reference_step(rollout, (rows, at))
                    ref = ref_cache[c]
                    stats["velocity_mse"] = live_mean(velocity_mse(out.velocity.detach(), ref.velocity), live)
                    if self.penalised:
                        penalty = live_mean(self._penalty(out, ref, rollout, at), live)
                        stats[f"reg_{hp.regularizer}"] = penalty.detach()
                        loss = loss + hp.beta * penalty * int(live.sum()) / max(m_live, 1)
                self.manual_backward(loss / per_row / accumulate)
                if live.any():  # a chunk of padding rows only (data parallelism) has no statistics
                    for k, v in stats.items():
                        acc.setdefault(k, []).append(float(v))
            if not update:
                continue
            guarded_step(self, opt, hp.gradient_clip_val)
            self.lr_schedulers().step()  # per optimiser step, as trainer.max_steps counts
        logs.update({f"policy/{k}": sum(v) / len(v) for k, v in acc.items()})
        logs.update(
            {
                "reward/total": finite_mean(rewards),
                "reward/std": rewards[finite.cpu()].std().item() if n_live > 1 else 0.0,
                "train/zero_std_frac": zero_frac,
                "train/skipped_steps": float(self.skipped_steps),
                "train/empty_batches": float(self.empty_batches),
                "train/bad_rewards": float(bad),
                "train/bad_rewards_total": float(self.bad_rewards),
                "train/adv_abs": adv.abs().mean().item(),
                "train/trained_steps": float(per_row),
                "train/trained_rows_frac": m_live / n,
                "train/lr": opt.param_groups[0]["lr"],
                "time/rollout_s": ctx.cache.get("rollout_s", math.nan),
                "time/train_s": time.perf_counter() - t0,
            }
        )
        self.log_dict(logs, prog_bar=False, batch_size=n)
        self.log("reward", finite_mean(rewards), prog_bar=True, batch_size=n)
