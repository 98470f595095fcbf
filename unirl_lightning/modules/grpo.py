"""Discrete-token GRPO (UniRL GRPO; CoRL-style rewards) for unified models.

Per step: P prompts x G images from the current policy -> (optionally) the policy's sampled
answers about its own images -> rewards -> group-relative advantages -> mu update iterations
of the clipped-ratio loss (+ beta k3 KL to the frozen reference) on image tokens and/or answer
tokens, with per-stream weights. Autoregressive and masked image orders alike: the policy turns
tokens into actions.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import torch

from unirl_lightning.data.datamodule import PromptBatch
from unirl_lightning.models.base import UnifiedPolicy
from unirl_lightning.modules.training import guarded_step, rank_advantages
from unirl_lightning.modules.unified import PolicyModule
from unirl_lightning.modules.warm_start import ensure_warm_start
from unirl_lightning.objectives import policy_loss
from unirl_lightning.rewards.base import RewardFunction, RolloutContext, combine_rewards, finite_mean
from unirl_lightning.rewards.geneval import GenEvalReward


def train_step_subset(action_mask: torch.Tensor, k: int) -> torch.Tensor:
    """bool `[B, A]` -> the same mask on `k` uniformly drawn action columns (all if `k >= A`), drawn
    from the global RNG so seeded runs repeat."""
    A = action_mask.shape[1]
    if k >= A:
        return action_mask
    chosen = torch.zeros(A, dtype=torch.bool)
    chosen[torch.randperm(A)[:k]] = True
    return action_mask & chosen.to(action_mask.device)[None]


class DiscreteGRPO(PolicyModule):
    """GRPO over image tokens and answer tokens.

    Args:
        rewards: reward terms with their weights (default: binary GenEval with the world's detector).
        image_weight / answer_weight: weights of the image-token and answer-token loss streams
            (0 switches a stream off; answer_weight > 0 makes the policy answer its own images).
        num_iterations: mu, update passes over each rollout (old log-probs stored before the first).
        micro_batch_size: rows per backward pass (bounds memory; gradients accumulate per step).
        loss_type / epsilon_low / epsilon_high: the clipped objective (TRL's definitions). Under data
            parallelism the losses divide by row and token counts over every rank, so N ranks make the
            update one process would make on all their rows (tests/test_fsdp.py checks it under FSDP2).
        beta: k3 KL weight to the frozen reference (0 skips the reference pass).
        scale / adv_clip: advantage normalisation ("group", "batch", "none") and optional clip.
        filter_zero_std: drop groups whose rewards are all equal (they carry no signal).
            Samples whose reward is NaN or inf are always dropped (`train/bad_rewards`).
        cfg_scale / temperature: rollout sampling; training log-probs use exactly the same.
        answer_temperature: sampling temperature of the answers.
        answer_reward_terms: names of the reward terms (e.g. ["self_understanding"]) whose weighted
            sum alone credits the answer stream, with its own group-relative advantages; None: one
            shared advantage from the total reward. An answer cannot change the image, so generation
            rewards only add noise to the answer tokens' credit.
        answer_sft_weight: weight of UniRL's supervised answer loss on the step's own images (NLL of
            the ground-truth answer, image detached), trained beside the GRPO streams so that
            understanding keeps pace with generation (lowers the imbalance metric); 0 = off.
        answer_sft_on: "all" images, or only those the GenEval judge passes ("correct"): the
            ground-truth answer describes the prompt, so on a wrong image it is a wrong label.
        reveal_steps_per_update: masked (MaskGIT-order) images: train a uniformly random subset of
            this many reveal steps per rollout (the same for every row), so the update re-scores
            only those steps instead of one full forward per step; None trains every step. Every
            row has the same number of steps, so the loss is an unbiased estimate of the full
            one for every `loss_type` (dr_grpo's length budget becomes this count;
            tests/test_objectives_grpo.py).
    """

    def __init__(
        self,
        policy: UnifiedPolicy,
        rewards: list[RewardFunction] | None = None,
        image_weight: float = 1.0,
        answer_weight: float = 0.0,
        num_iterations: int = 1,
        micro_batch_size: int = 32,
        loss_type: Literal["grpo", "bnpo", "dr_grpo", "dapo"] = "grpo",
        epsilon_low: float = 0.2,
        epsilon_high: float | None = None,
        beta: float = 0.0,
        scale: Literal["group", "batch", "none"] = "group",
        adv_clip: float | None = None,
        filter_zero_std: bool = False,
        cfg_scale: float = 1.0,
        temperature: float = 1.0,
        answer_temperature: float = 1.0,
        answer_reward_terms: list[str] | None = None,
        answer_sft_weight: float = 0.0,
        answer_sft_on: Literal["all", "correct"] = "all",
        gradient_clip_val: float | None = 1.0,
        reveal_steps_per_update: int | None = None,
        **kwargs,
    ):
        super().__init__(policy, **kwargs)
        if reveal_steps_per_update is not None and reveal_steps_per_update < 1:
            raise ValueError(f"model.reveal_steps_per_update={reveal_steps_per_update}: give a count >= 1, "
                             "or null to train every reveal step")
        if image_weight <= 0 and answer_weight <= 0 and answer_sft_weight <= 0:
            raise ValueError(
                "model.image_weight, answer_weight and answer_sft_weight are all 0: nothing would train"
            )
        if num_iterations < 1 or micro_batch_size < 1:
            raise ValueError("model.num_iterations and model.micro_batch_size must be >= 1")
        if rewards is None:
            rewards = [GenEvalReward("binary")]
        self.rewards = rewards
        if answer_reward_terms is not None:
            names = [fn.name for fn in rewards]
            unknown = sorted(set(answer_reward_terms) - set(names))
            if unknown or not answer_reward_terms:
                raise ValueError(
                    f"model.answer_reward_terms: {unknown or 'empty list'} not among the configured "
                    f"reward names {names}; give some of those names, or null for the total reward"
                )
        self.automatic_optimization = False  # mu passes and micro-batches per rollout
        self.reference = policy.make_reference() if beta > 0 else None

    def auto_warm_start(self) -> Path | None:
        return ensure_warm_start(self.policy)  # the built-in model's cached warm start

    def on_warm_started(self) -> None:
        if self.hparams.beta > 0:
            self.reference = self.policy.make_reference().to(self.device)

    @property
    def needs_answers(self) -> bool:
        return self.hparams.answer_weight > 0 or any(r.needs_answers for r in self.rewards)

    # ---- rollout (called by the DataModule on device) -------------------------------------
    @torch.no_grad()
    def make_rollouts(self, batch: PromptBatch) -> RolloutContext:
        hp = self.hparams
        rollout = self.policy.generate_images(
            batch.prompts, cfg_scale=hp.cfg_scale, temperature=hp.temperature
        )
        ctx = RolloutContext(
            specs=batch.specs, rollout=rollout, images=self.policy.decode_images(rollout.tokens)
        )
        if self.needs_answers:
            questions, _ = self.qa(batch.specs)
            ctx.answers = self.policy.answer(
                rollout.tokens, questions, greedy=False, temperature=hp.answer_temperature
            )
        return ctx

    # ---- training ---------------------------------------------------------------------
    def training_step(self, batch: PromptBatch, batch_idx: int) -> None:
        hp = self.hparams
        ctx = batch.rollout if batch.rollout is not None else self.make_rollouts(batch)
        if hp.reveal_steps_per_update is not None and ctx.rollout.reveal_step is not None:
            ctx.rollout.action_mask = train_step_subset(ctx.rollout.action_mask, hp.reveal_steps_per_update)
        rewards, logs = combine_rewards(self.rewards, ctx)
        finite, bad, all_bad = self.screen_rewards(rewards, ctx)
        adv, zero_frac = rank_advantages(self, rewards, batch.group_ids, scale=hp.scale, clip=hp.adv_clip)
        advantages = {"image": adv, "answer": adv}
        if hp.answer_weight > 0 and hp.answer_reward_terms:
            terms = ctx.cache["reward_terms"]
            answer_rewards = sum(terms[name] for name in hp.answer_reward_terms)
            advantages["answer"] = rank_advantages(
                self, answer_rewards, batch.group_ids, scale=hp.scale, clip=hp.adv_clip
            )[0]
        keep = torch.arange(len(adv), device=self.device)
        if hp.filter_zero_std:
            keep = keep[self._nonzero_std_rows(rewards, batch.group_ids)]
        keep = keep[finite[keep]]  # a NaN / inf reward: the sample trains nothing
        chunks, rows_per_rank = self._row_chunks(keep, uneven=hp.filter_zero_std or bad > 0)
        if not chunks:  # every row filtered out on every rank: nothing to learn, no backward anywhere
            self.empty_batches += 1
        streams = self._streams(ctx, keep, chunks, rows_per_rank) if chunks else []
        opt = self.optimizers()
        stats_acc: dict[str, list[float]] = {}
        for _ in range(hp.num_iterations):
            for name, weight, fns in streams:
                for rows, live, old, ref, mask in fns["chunks"]:
                    logp = fns["logp"](rows)
                    loss, stats = policy_loss(
                        logp,
                        old if old is not None else logp.detach(),
                        advantages[name][rows],
                        mask,
                        loss_type=hp.loss_type,
                        epsilon_low=hp.epsilon_low,
                        epsilon_high=hp.epsilon_high,
                        beta=hp.beta,
                        ref_logp=ref,
                        max_len=fns["max_len"],
                        num_items_in_batch=fns["num_items"],
                    )
                    # dapo already divides by the global token count; the others are means over chunk rows
                    share = 1.0 if hp.loss_type == "dapo" else len(rows) / fns["n_rows"]
                    self.manual_backward(weight * loss * share * float(live))
                    if live:
                        for k, v in stats.items():
                            stats_acc.setdefault(f"{name}/{k}", []).append(float(v))
            if hp.answer_sft_weight > 0 and not all_bad:
                sft = self._answer_sft_loss(ctx, finite)
                self.manual_backward(hp.answer_sft_weight * sft)
                stats_acc.setdefault("answer_sft/loss", []).append(float(sft.detach()))
            guarded_step(self, opt, hp.gradient_clip_val)
        logs.update({k: sum(v) / len(v) for k, v in stats_acc.items()})
        logs.update(
            {
                "reward/total": finite_mean(rewards),
                "reward/std": rewards[finite.cpu()].std().item() if int(finite.sum()) > 1 else 0.0,
                "train/zero_std_frac": zero_frac,
                "train/skipped_steps": float(self.skipped_steps),
                "train/empty_batches": float(self.empty_batches),
                "train/bad_rewards": float(bad),
                "train/bad_rewards_total": float(self.bad_rewards),
                "train/trained_rows_frac": len(keep) / len(adv),
            }
        )
        self.log_dict(logs, prog_bar=False, batch_size=len(batch))
        self.log("reward", finite_mean(rewards), prog_bar=True, batch_size=len(batch))

    def _answer_sft_loss(self, ctx: RolloutContext, finite: torch.Tensor) -> torch.Tensor:
        """Mean NLL per answer token of the ground-truth answers about the rollout's own images whose
        reward is finite (`finite`, bool `[N]`; with `answer_sft_on="correct"`, only those the judge
        passes); zero when no image is left.

        Under data parallelism the sum divides by the mean token count over ranks, not this rank's:
        the gradient reduce averages the ranks, so the update is the mean over every rank's answer
        tokens, as in one process."""
        rows, scale = finite.nonzero().flatten().tolist(), 1.0
        if self.hparams.answer_sft_on == "correct":
            if "geneval" not in ctx.cache:  # a GenEval reward already judged them otherwise
                ctx.cache["geneval"] = self.judge(ctx.images, ctx.specs)
            rows = [i for i in rows if ctx.cache["geneval"][i].correct]
        if not rows:  # keep the same backward on every rank (sharded training): one row, weight 0
            rows, scale = [0], 0.0
        questions, answers = self.qa([ctx.specs[i] for i in rows])
        tokens = ctx.rollout.tokens[torch.tensor(rows, device=ctx.rollout.tokens.device)]
        logp, mask = self.policy.answer_logprobs(tokens, questions, answers)
        count = mask.sum() * scale
        if self.trainer.world_size > 1:
            count = self.all_gather(count).sum() / self.trainer.world_size
        return -scale * logp.sum() / count.clamp(min=1)

    @staticmethod
    def _nonzero_std_rows(rewards: torch.Tensor, group_ids: torch.Tensor) -> torch.Tensor:
        """Rows of the groups whose finite rewards differ (at least two of them, not all equal)."""
        keep = torch.zeros_like(rewards, dtype=torch.bool)
        finite = torch.isfinite(rewards)
        for g in group_ids.unique():
            rows = group_ids.cpu() == g.cpu()
            values = rewards[rows & finite]
            keep[rows] = values.std(unbiased=False) > 0 if len(values) > 1 else False
        return keep.nonzero().squeeze(-1)

    def _row_chunks(self, keep: torch.Tensor, uneven: bool) -> tuple[list[tuple[torch.Tensor, bool]], float]:
        """Micro-batches `(rows, live)` of the kept rows, and the mean count of kept rows over ranks.

        Under data parallelism, when ranks may keep different numbers of rows (`uneven`:
        `filter_zero_std`, or bad rewards this step; the same on every rank), each is padded to the most
        chunks any rank has with dead chunks (row 0, loss weight 0), so every rank runs as many forwards
        and backwards and the sharded collectives stay paired; no rank has any when every rank filtered
        everything. The losses divide by the mean count rather than this rank's: the gradient reduce
        averages the ranks' gradients, so the update is then the mean over every rank's kept rows, as in
        one process (a rank's own count would weigh the rows of a rank that kept fewer more)."""
        mb = self.hparams.micro_batch_size
        chunks = [(rows, True) for rows in keep.split(mb)] if len(keep) else []
        rows_per_rank = float(len(keep))
        if uneven and self.trainer.world_size > 1:
            kept = self.all_gather(torch.tensor(len(keep), device=self.device))
            most = max(-(-int(k) // mb) for k in kept.flatten())
            chunks += [(keep.new_zeros(1), False)] * (most - len(chunks))
            rows_per_rank = float(kept.double().mean())
        return chunks, rows_per_rank

    def _streams(
        self,
        ctx: RolloutContext,
        keep: torch.Tensor,
        row_chunks: list[tuple[torch.Tensor, bool]],
        rows_per_rank: float,
    ) -> list:
        """Per loss stream: a log-prob function of rows, and micro-batches `(rows, live, old, ref, mask)`
        with stored old / ref log-probs; the row count the losses divide by (`rows_per_rank`) and
        dapo's token count (every rank's, over the world size: the gradient reduce averages)."""
        hp, out = self.hparams, []
        rollout = ctx.rollout
        questions, _ = self.qa(ctx.specs)
        subset = hp.reveal_steps_per_update is not None and rollout.reveal_step is not None

        def image_logp(rows, policy=None):
            return (policy or self.policy).image_logprobs(rollout.select(rows))

        def answer_logp(rows, policy=None):
            sub = rows.tolist()
            answers = ctx.answers
            picked = type(answers)(
                texts=[answers.texts[i] for i in sub],
                tokens=answers.tokens[rows],
                logprobs=answers.logprobs[rows],
                mask=answers.mask[rows],
            )
            return (policy or self.policy).answer_logprobs(
                rollout.tokens[rows], [questions[i] for i in sub], picked
            )[0]

        specs = []
        if hp.image_weight > 0:
            specs.append(("image", hp.image_weight, image_logp, rollout.action_mask))
        if hp.answer_weight > 0:
            specs.append(("answer", hp.answer_weight, answer_logp, ctx.answers.mask))
        for name, weight, fn, full_mask in specs:
            chunks = []
            with torch.no_grad():
                for rows, live in row_chunks:
                    old = fn(rows).detach() if hp.num_iterations > 1 else None
                    ref = fn(rows, self.reference).detach() if self.reference is not None else None
                    chunks.append((rows, live, old, ref, full_mask[rows].to(self.device)))
            num_items = full_mask[keep].sum()
            if hp.loss_type == "dapo" and self.trainer.world_size > 1:
                num_items = self.all_gather(num_items).sum() / self.trainer.world_size
            num_items = num_items.clamp(min=1)
            out.append(
                (
                    name,
                    weight,
                    {"logp": fn, "chunks": chunks, "n_rows": max(rows_per_rank, 1.0), "num_items": num_items,
                     # dr_grpo's length budget: the trained reveal steps when a subset trains
                     "max_len": hp.reveal_steps_per_update if name == "image" and subset else None},
                )
            )
        return out
