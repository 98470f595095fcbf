"""UniGRPO: a reasoning text policy and a flow image policy trained as one MDP with one reward.

One trajectory = the text policy's tokens y (written from the riddle / user prompt) followed by
the flow policy's denoising steps x (conditioned on y, no CFG). The terminal reward (GenEval
judge of the final image against the spec) gives one group-relative advantage A_i per
trajectory, shared by every text token and every trained flow step:

    L = lambda_text * L_text(y) + lambda_img * L_img(x steps) + beta * L_vel (+ beta_text * KL_text)

L_text: clipped surrogate over tokens (clip `text_clip_range` ~0.2, TRL aggregation);
L_img: clipped surrogate per trained SDE step (clip `clip_range` ~1e-4 on mean-over-dims
log-probs); L_vel: `mean_d (v - v_ref)^2` to the frozen flow reference at the rollout states;
KL_text: k3 to the frozen text reference. `image_objective="awm"` replaces L_img by Advantage
Weighted Matching on the flow side (likelihood-free: each final latent re-noised at a few grid
times, the flow-matching loss weighted by clip(A_i, -K, K) / K, the velocity MSE to the reference
at those states), with the same shared advantage. Ablations: `train_text=False` freezes the text policy
(it still writes the prompt: image-only FlowGRPO on the same task); `image_condition="riddle"`
feeds the raw riddle to the flow model, `"prompt"` the plain GenEval prompt (an oracle).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Literal

import torch

from unirl_lightning.callbacks.image_grid import log_image_grid
from unirl_lightning.data.datamodule import PromptBatch
from unirl_lightning.models.flow import FlowPolicy, FlowRollout
from unirl_lightning.models.text.policies import TextPolicy, TextRollout, text_matches
from unirl_lightning.modules.base import load_warm_start
from unirl_lightning.modules.flow_grpo import FlowGRPO
from unirl_lightning.modules.training import guarded_step, live_mean, rank_advantages
from unirl_lightning.modules.warm_start import ensure_text_warm_start
from unirl_lightning.modules.forward_rl import timestep_indices
from unirl_lightning.objectives import awm_loss, awm_weights, kl_k3, noised, policy_loss, velocity_mse
from unirl_lightning.rewards.base import RewardFunction, RolloutContext, combine_rewards, finite_mean

CONDITIONS = ("text", "riddle", "prompt")


def _riddles(specs: list[dict]) -> list[str]:
    """What the text policy reads: the spec's "reasoning_prompt" when present, else its prompt."""
    return [s.get("reasoning_prompt", s["prompt"]) for s in specs]


class UniGRPO(FlowGRPO):
    """Joint GRPO of a text policy and a flow policy with one shared advantage (see module docstring).

    Args:
        text_policy: a `TextPolicy` (`TinyTextPolicy`, or `HFTextPolicy` around any causal LM). Its
            output must be words the flow model's text encoder knows (checked for built-in models).
        flow_policy: a `FlowPolicy` (`TinyFlowModel`, `DiffusersFlowPolicy`, `DiffusersFluxPolicy`).
        rewards: reward terms (default: GenEval partial credit).
        train_text: False freezes the text policy (image-only baseline; it still writes the prompt).
        image_condition: what the flow model reads: "text" (the text policy's output), "riddle"
            (the raw riddle) or "prompt" (the plain GenEval prompt, an oracle); the text policy is
            neither run nor trained unless "text".
        text_warm_start: "auto" (built-in `TinyTextPolicy`: the cached supervised riddle -> prompt
            warm start, see `modules/warm_start.py`; a no-op for other policies), a `save_pretrained`
            folder, or None.
        max_new_tokens / text_temperature: the text sampler of rollouts (validation is greedy);
            temperature 0 (greedy rollouts) is only allowed with `train_text=False`.
        lambda_text / lambda_img: weights of the two surrogate losses.
        text_clip_range: text ratio clip epsilon; text_loss_type: TRL aggregation over tokens.
        beta_text: weight of the k3 KL to the frozen text reference (its value is logged anyway
            when `track_reference`).
        text_lr: text policy learning rate (None: `lr`).
        image_objective: the flow policy's loss: "flow_grpo" (the clipped ratio of the trained SDE
            steps' log-probs) or "awm" (Advantage Weighted Matching on the final latents; the
            rollout sampler is then free, e.g. `noise_level: 0`; `regularizer` velocity_mse or none).
        awm_timesteps / awm_timestep_range: with "awm", the grid times each sample is re-noised at,
            one per stratum of `[lo, hi)` (default `[1, T - T // 10)`, AWM's `[1, 0.9 T)`).
        awm_power / awm_adv_clip: with "awm", the ghuber power p (None: plain MSE) and the clip K of
            the sample weights `clip(A, -K, K) / K` (`objectives.awm_loss`, `awm_weights`).
        save_to: the flow policy is saved there and, when the text policy trains, the text policy
            in its `text_policy/` sub-folder.
        beta: weight of the velocity MSE (beta_v); clip_range: image ratio clip. Other arguments
            (num_steps, noise_level, kind, sde_window(_size), step_weighting, num_iterations,
            rollouts_per_update, micro_batch_size, scale, adv_clip, regularizer, track_reference, lr,
            warm_start, ...) as in `FlowGRPO`.
            CFG is off in rollouts, training and validation (UniGRPO).
    """

    # the two policies are models, not hyper-parameters (they would be deep-copied into hparams)
    hparams_ignore = FlowGRPO.hparams_ignore + ("text_policy", "flow_policy")

    def __init__(
        self,
        text_policy: TextPolicy,
        flow_policy: FlowPolicy,
        rewards: list[RewardFunction] | None = None,
        *,
        train_text: bool = True,
        image_condition: Literal["text", "riddle", "prompt"] = "text",
        text_warm_start: str | None = "auto",
        max_new_tokens: int = 16,
        text_temperature: float = 1.0,
        lambda_text: float = 1.0,
        lambda_img: float = 1.0,
        text_clip_range: float = 0.2,
        text_loss_type: Literal["grpo", "bnpo", "dr_grpo"] = "grpo",
        beta_text: float = 0.0,
        text_lr: float | None = None,
        image_objective: Literal["flow_grpo", "awm"] = "flow_grpo",
        awm_timesteps: int = 6,
        awm_timestep_range: tuple[int, int] | None = None,
        awm_power: float | None = 0.25,
        awm_adv_clip: float = 5.0,
        **kwargs,
    ):
        # No CFG anywhere (UniGRPO): one velocity forward per step in rollouts, training and validation.
        super().__init__(flow_policy, rewards=rewards, cfg_scale=1.0, eval_cfg_scale=1.0, **kwargs)
        if not self.hparams.train_tied_groups:
            raise ValueError(
                "model.train_tied_groups: False is FlowGRPO's; UniGRPO trains every row (remove it)"
            )
        if self.windows_per_group:
            raise ValueError(
                "model.sde_window_per_group / sde_window_by_task are FlowGRPO's; UniGRPO draws one window "
                "per rollout (remove them)"
            )
        if image_condition not in CONDITIONS:
            raise ValueError(f"model.image_condition must be one of {CONDITIONS}, got {image_condition!r}")
        if text_temperature < 0 or (text_temperature == 0 and train_text and image_condition == "text"):
            raise ValueError(
                "model.text_temperature must be > 0 when the text policy trains (0 = greedy: frozen only)"
            )
        self._awm_range = _check_image_objective(self.hparams)
        _check_vocabulary(text_policy, flow_policy, image_condition)
        self.text_policy = text_policy
        if not self.trains_text:
            text_policy.requires_grad_(False)
        self.text_reference = self._make_text_reference()
        self._text_warm_started = False

    @property
    def trains_text(self) -> bool:
        return self.hparams.train_text and self.hparams.image_condition == "text"

    def _make_text_reference(self) -> TextPolicy | None:
        hp = self.hparams
        needed = self.trains_text and (hp.beta_text > 0 or hp.track_reference)
        return self.text_policy.make_reference() if needed else None

    # ---- warm starts --------------------------------------------------------------------------
    def setup(self, stage: str) -> None:
        super().setup(stage)  # the flow policy's warm start
        source = self.hparams.text_warm_start
        if self._text_warm_started or source is None or self.hparams.image_condition != "text":
            return
        if self.resuming(stage):
            return  # the checkpoint holds the weights
        self._text_warm_started = True
        if source == "auto":
            source = ensure_text_warm_start(self.text_policy)
            if source is None:
                return  # a pretrained LM is its own warm start
        load_warm_start(self.text_policy, source, "model.text_warm_start")
        self.text_reference = self._make_text_reference()

    # ---- sharding and saving -----------------------------------------------------------------
    def sharded_modules(self) -> list[torch.nn.Module]:
        return super().sharded_modules() + [
            m for m in (self.text_policy, self.text_reference) if m is not None
        ]

    def save_policies(self, path: str | Path) -> None:
        super().save_policies(path)
        if self.trains_text:
            self.save_model(self.text_policy, Path(path) / "text_policy")

    def lr_by_group(self, hparams: dict) -> list[float]:
        text_lr = hparams.get("text_lr")
        return [float(hparams["lr"]), float(text_lr if text_lr is not None else hparams["lr"])]

    def configure_optimizers(self):
        hp = self.hparams
        groups = [{"params": [p for p in self.policy.parameters() if p.requires_grad], "lr": hp.lr}]
        if self.trains_text:
            groups.append(
                {
                    "params": [p for p in self.text_policy.parameters() if p.requires_grad],
                    "lr": hp.text_lr if hp.text_lr is not None else hp.lr,
                }
            )
        return self.scheduled(
            torch.optim.AdamW(groups, lr=hp.lr, weight_decay=hp.weight_decay, betas=tuple(hp.betas))
        )

    # ---- rollout ------------------------------------------------------------------------------
    @torch.no_grad()
    def write(
        self, specs: list[dict], *, greedy: bool = False, generator: torch.Generator | None = None
    ) -> tuple[list[str], TextRollout | None]:
        """The flow model's conditions for `specs`, and the text rollout that wrote them (if any)."""
        hp = self.hparams
        if hp.image_condition == "prompt":
            return [s["prompt"] for s in specs], None
        if hp.image_condition == "riddle":
            return _riddles(specs), None
        text = self.text_policy.generate(
            _riddles(specs),
            max_new_tokens=hp.max_new_tokens,
            temperature=0.0 if greedy else hp.text_temperature,
            generator=generator,
        )
        return text.texts, text

    @torch.no_grad()
    def make_rollouts(self, batch: PromptBatch) -> RolloutContext:
        hp = self.hparams
        t0 = time.perf_counter()
        texts, text = self.write(batch.specs)
        t1 = time.perf_counter()
        # One noise per group; its rows write different prompts, so no shared ODE prefix (`groups=`).
        latents = self.policy.group_noise(batch.group_ids) if hp.same_latent else None
        rollout = self.policy.sample(
            texts,
            num_steps=hp.num_steps,
            noise_level=hp.noise_level,
            cfg_scale=1.0,
            sde_window=self.sde_window(),
            kind=hp.kind,
            latents=latents,
        )
        ctx = RolloutContext(specs=batch.specs, rollout=rollout, images=rollout.images)
        ctx.cache.update(text=text, texts=texts, text_s=t1 - t0, rollout_s=time.perf_counter() - t0)
        return ctx

    # ---- training -----------------------------------------------------------------------------
    def _text_loss(
        self, riddles: list[str], text: TextRollout, adv: torch.Tensor, ref: torch.Tensor | None,
        live: torch.Tensor,
    ):
        """lambda_text * L_text + beta_text * KL_text of one micro-batch (rows `live` only), and its
        stats."""
        hp = self.hparams
        logp = self.text_policy.logprobs(riddles, text)
        mask = text.mask & live[:, None]
        loss, stats = policy_loss(
            logp,
            text.logprobs,
            adv,
            mask,
            loss_type=hp.text_loss_type,
            epsilon_low=hp.text_clip_range,
            ref_logp=ref,
        )
        total = hp.lambda_text * loss
        if hp.beta_text > 0:
            m = mask.float()
            kl = ((torch.where(mask, kl_k3(logp, ref), 0.0) * m).sum(-1) / m.sum(-1).clamp(min=1)).mean()
            total = total + hp.beta_text * kl
        stats["loss"] = loss.detach()
        return total, stats

    def _image_loss(
        self, sub: FlowRollout, step: int, adv: torch.Tensor, cond, ref_cache: dict, key, live: torch.Tensor,
        weight: float = 1.0,
    ):
        """lambda_img * weight * L_img + beta * L_reg of one trained step of one micro-batch (rows
        `live` only, each counted as 1 / len(rows)), and its stats (`weight`: the step's
        `step_weighting` weight)."""
        hp = self.hparams
        out = self.policy.step_log_prob(sub, step, cond)
        old = sub.log_probs[:, step]
        loss, stats = policy_loss(
            out.log_prob[:, None], old[:, None], adv, live[:, None], epsilon_low=hp.clip_range
        )
        stats.pop("kl")  # no text-style reference log-probs here; the regulariser is logged below
        stats["approx_kl"] = live_mean(0.5 * (out.log_prob.detach() - old).square(), live)
        stats["loss"] = loss.detach()
        total = hp.lambda_img * weight * loss
        if self.has_reference:
            if key not in ref_cache:
                ref_cache[key] = self._reference_step(sub, step)
            ref = ref_cache[key]
            stats["velocity_mse"] = live_mean(velocity_mse(out.velocity.detach(), ref.velocity), live)
            if self.penalised:
                penalty = torch.where(live, self._penalty(out, ref, sub, step), 0.0).mean()
                stats[f"reg_{hp.regularizer}"] = penalty.detach()
                total = total + hp.beta * penalty
        return total, stats

    def _awm_image_loss(self, sub: FlowRollout, adv: torch.Tensor, live: torch.Tensor):
        """lambda_img * AWM loss + beta * velocity MSE to the reference of one micro-batch: each row's
        final latent re-noised at `awm_timesteps` stratified grid times (rows `live` only, each row
        counted as 1 / len(rows)), and its stats."""
        hp = self.hparams
        x0 = sub.latents[:, -1]
        m, k = len(x0), hp.awm_timesteps
        index = timestep_indices(m, k, *self._awm_range, "stratified").to(x0.device)
        pairs = torch.arange(m, device=x0.device).repeat_interleave(k)
        t = sub.sigmas.to(x0.device)[index.flatten()]
        x_t, target = noised(x0[pairs], torch.randn_like(x0[pairs]), t)
        cond = self.text_condition([sub.prompts[r] for r in pairs.tolist()])
        v = self.policy.velocity(x_t, t, cond)
        weights = awm_weights(adv[pairs], hp.awm_adv_clip)
        fm = awm_loss(v, target, t, weights, hp.awm_power)
        keep = live[pairs]
        stats = {"awm_loss": live_mean(fm.detach(), keep), "weight_abs": live_mean(weights.abs(), keep)}
        per_pair = hp.lambda_img * fm
        if self.has_reference:
            penalty = velocity_mse(v, self.reference_velocity(x_t, t, cond))
            stats["velocity_mse"] = live_mean(penalty.detach(), keep)
            if self.penalised:
                per_pair = per_pair + hp.beta * penalty
        stats["loss"] = live_mean(per_pair.detach(), keep)
        return torch.where(keep, per_pair, 0.0).sum() / (m * k), stats

    def training_step(self, batch: PromptBatch, batch_idx: int) -> None:
        hp = self.hparams
        ctx = batch.rollout if batch.rollout is not None else self.make_rollouts(batch)
        rollout: FlowRollout = ctx.rollout
        text: TextRollout | None = ctx.cache["text"]
        riddles = _riddles(batch.specs)
        t0 = time.perf_counter()
        rewards, logs = combine_rewards(self.rewards, ctx)
        finite, bad, all_bad = self.screen_rewards(rewards, ctx)
        adv, zero_frac = rank_advantages(
            self, rewards, batch.group_ids, scale=self.hparams.scale, clip=self.hparams.adv_clip
        )  # one A_i per trajectory, both streams
        steps, n = rollout.trained_steps, len(rollout)
        # Rows with a bad reward are masked out of both losses, which average over the n_live others;
        # every rank still runs every micro-batch (equal backward counts under sharding).
        n_live = max(int(finite.sum()), 1)
        # the SDE steps' loss weights; AWM re-noises the final latents and weights by advantage only
        weights = self.step_weights(rollout) if hp.image_objective != "awm" else []
        chunks = [
            torch.arange(i, min(i + hp.micro_batch_size, n), device=self.device)
            for i in range(0, n, hp.micro_batch_size)
        ]
        if all_bad:  # every sample's reward is NaN / inf on every rank: nothing to train, no backward
            chunks = []
            self.empty_batches += 1
        subs = [rollout.select(rows) for rows in chunks]
        train_text = self.trains_text and text is not None
        opt = self.optimizers()
        text_ref: dict[int, torch.Tensor | None] = {}
        img_ref: dict = {}
        acc: dict[str, list[float]] = {}
        accumulate = hp.rollouts_per_update
        update = (batch_idx + 1) % accumulate == 0  # gradients accumulate over this many rollouts
        for _ in range(hp.num_iterations):
            for c, (rows, sub) in enumerate(zip(chunks, subs)):
                share = len(rows) / n_live / accumulate
                live = finite[rows]
                if train_text:
                    sub_text, sub_riddles = text.select(rows), [riddles[i] for i in rows.tolist()]
                    if c not in text_ref:
                        with torch.no_grad():
                            text_ref[c] = (
                                None
                                if self.text_reference is None
                                else self.text_reference.logprobs(sub_riddles, sub_text)
                            )
                    loss, stats = self._text_loss(sub_riddles, sub_text, adv[rows], text_ref[c], live)
                    self.manual_backward(loss * share)
                    for k, v in stats.items():
                        if live.any():  # a micro-batch of bad-reward rows only has no statistics
                            acc.setdefault(f"text/{k}", []).append(float(v))
                if hp.image_objective == "awm":
                    loss, stats = self._awm_image_loss(sub, adv[rows], live)
                    self.manual_backward(loss * share)
                    for k, v in stats.items():
                        if live.any():
                            acc.setdefault(f"image/{k}", []).append(float(v))
                    continue
                cond = None
                if not self.policy.text_trainable:
                    with torch.no_grad():
                        cond = self.policy.encode_text(sub.prompts)
                for j, weight in zip(steps, weights):
                    loss, stats = self._image_loss(sub, j, adv[rows], cond, img_ref, (c, j), live, weight)
                    self.manual_backward(loss * share / len(steps))
                    for k, v in stats.items():
                        if live.any():
                            acc.setdefault(f"image/{k}", []).append(float(v))
            if not update:
                continue
            guarded_step(self, opt, hp.gradient_clip_val)
            self.lr_schedulers().step()
        logs.update({k: sum(v) / len(v) for k, v in acc.items()})
        logs.update(self._text_logs(batch.specs, ctx.cache["texts"], text, rewards))
        logs.update(
            {
                "reward/total": finite_mean(rewards),
                "reward/std": rewards[finite.cpu()].std().item() if int(finite.sum()) > 1 else 0.0,
                "train/zero_std_frac": zero_frac,
                "train/skipped_steps": float(self.skipped_steps),
                "train/empty_batches": float(self.empty_batches),
                "train/bad_rewards": float(bad),
                "train/bad_rewards_total": float(self.bad_rewards),
                "train/adv_abs": adv.abs().mean().item(),
                "train/trained_steps": float(len(steps)),
                "train/lr": opt.param_groups[0]["lr"],
                "time/text_s": ctx.cache.get("text_s", float("nan")),
                "time/rollout_s": ctx.cache.get("rollout_s", float("nan")),
                "time/train_s": time.perf_counter() - t0,
            }
        )
        self.log_dict(logs, prog_bar=False, batch_size=n)
        self.log("reward", finite_mean(rewards), prog_bar=True, batch_size=n)

    @staticmethod
    def _text_logs(
        specs: list[dict], texts: list[str], text: TextRollout | None, rewards: torch.Tensor
    ) -> dict:
        """Share of conditions equal to the plain GenEval prompt, text length, reward split by it."""
        exact = torch.tensor([text_matches(t, s["prompt"]) for t, s in zip(texts, specs)])
        logs = {"text/exact_prompt": exact.float().mean().item()}
        if text is not None:
            logs["text/len"] = text.mask.sum(-1).float().mean().item()
        if exact.any() and not exact.all():
            logs["reward/exact_text"] = finite_mean(rewards[exact])
            logs["reward/wrong_text"] = finite_mean(rewards[~exact])
        return logs

    # ---- evaluation ---------------------------------------------------------------------------
    def validation_step(self, batch: PromptBatch, batch_idx: int) -> None:
        """Greedy text, `eval_repeats` ODE images per text (noise 0, no CFG), GenEval judge against the
        spec."""
        hp = self.hparams
        gen = torch.Generator(device=self.device).manual_seed(10_000 + batch_idx)
        texts, _ = self.write(batch.specs, greedy=True)
        exact = (
            torch.tensor([text_matches(t, s["prompt"]) for t, s in zip(texts, batch.specs)]).float().mean()
        )
        k = hp.eval_repeats  # greedy text is deterministic: one text, k images from different noise
        specs = [s for s in batch.specs for _ in range(k)]
        rollout = self.policy.sample(
            [t for t in texts for _ in range(k)], num_steps=hp.eval_num_steps, noise_level=0.0, generator=gen
        )
        results = self.judge(rollout.images, specs)
        correct = torch.tensor([r.correct for r in results], dtype=torch.bool)
        self.val_geneval.update([s["tag"] for s in specs], correct.to(self.device))
        size = len(results)
        partial = torch.tensor([float(r.partial) for r in results]).mean()
        self.log("val/geneval_partial", partial, batch_size=size, sync_dist=True)
        self.log("val/text_exact", exact, batch_size=size, sync_dist=True)
        self.log_off_manifold(rollout, size)
        if batch_idx == 0:
            n = hp.grid_size
            captions = [f"{r} -> {t}" for r, t in zip(_riddles(batch.specs[:n]), texts[:n])]
            log_image_grid(
                self.logger,
                "val/images",
                rollout.images[::k][:n],
                captions,
                self.global_step,
                correct[::k][:n],
            )

    test_step = validation_step


def _check_image_objective(hp) -> tuple[int, int]:
    """Check the image objective's settings; the `[lo, hi)` grid range of AWM's times."""
    if hp.image_objective not in ("flow_grpo", "awm"):
        raise ValueError(f"model.image_objective must be 'flow_grpo' or 'awm', got {hp.image_objective!r}")
    T = hp.num_steps
    lo, hi = (1, T - T // 10) if hp.awm_timestep_range is None else tuple(hp.awm_timestep_range)
    if hp.image_objective != "awm":
        return lo, hi
    if not 0 <= lo < hi <= T:
        raise ValueError(
            f"model.awm_timestep_range must satisfy 0 <= lo < hi <= num_steps={T}, got {[lo, hi]}"
        )
    if not 1 <= hp.awm_timesteps <= hi - lo:
        raise ValueError(
            f"model.awm_timesteps must be in 1..{hi - lo} (awm_timestep_range [{lo}, {hi})), "
            f"got {hp.awm_timesteps}"
        )
    if hp.awm_power is not None and not 0 < hp.awm_power <= 1:
        raise ValueError(f"model.awm_power must be in (0, 1] or null, got {hp.awm_power}")
    if hp.awm_adv_clip <= 0:
        raise ValueError(f"model.awm_adv_clip must be > 0, got {hp.awm_adv_clip}")
    if hp.regularizer not in ("velocity_mse", "none"):
        raise ValueError(
            f"model.regularizer: {hp.regularizer!r} scores SDE transitions; image_objective 'awm' trains on "
            "re-noised final latents: use velocity_mse or none"
        )
    return lo, hi


def _check_vocabulary(text_policy: TextPolicy, flow_policy: FlowPolicy, image_condition: str) -> None:
    """The flow model must know every word the text policy can write (built-in models only)."""
    known = getattr(getattr(flow_policy, "config", None), "words", None)
    words = text_policy.output_words
    if image_condition != "text" or known is None or words is None:
        return
    missing = sorted(set(words) - set(known))
    if missing:
        raise ValueError(
            f"the text policy can write words the flow model's text encoder does not know: {missing[:8]}; "
            "restrict its output (TinyTextConfig.output_words / HFTextPolicy.allowed_words)"
        )
