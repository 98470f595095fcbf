"""UniRL SFT: the model draws images from prompts, answers questions about its own images, and
the answer NLL trains understanding — and, end to end, generation through straight-through
Gumbel image tokens. No external image data."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import torch

from unirl_lightning.data.datamodule import PromptBatch
from unirl_lightning.data.qa import grade_answer
from unirl_lightning.models.base import UnifiedPolicy
from unirl_lightning.modules.unified import PolicyModule
from unirl_lightning.modules.warm_start import ensure_warm_start


class UniRLSFT(PolicyModule):
    """Self-questioning supervised fine-tuning.

    Args:
        end_to_end: True: the understanding pass reads straight-through Gumbel one-hots of the
            generated tokens, so the answer loss reaches the generation logits; False: the
            image is detached and only understanding learns.
        gumbel_tau: temperature of the relaxed one-hots' backward pass.
        cfg_scale / temperature: rollout sampling settings (the relaxation uses the same logits).
        score_every_n_steps: how often the step's images are judged (GenEval) and answers graded
            for the training logs (0: never; it costs a detector pass and a greedy decode).
        sft_on: which own images the answer loss trains on: "all" (UniRL: every image, labelled
            with its prompt's answer, right or wrong) or "correct" (only those the GenEval judge
            passes, whose prompt answer is the true one; a detector pass per step). On a wrong
            image the prompt's answer teaches the model to answer from the question, not the image
            (benchmarks/discrete_grpo.md, "UniRL SFT").
    """

    def __init__(
        self,
        policy: UnifiedPolicy,
        end_to_end: bool = True,
        gumbel_tau: float = 1.0,
        cfg_scale: float = 1.0,
        temperature: float = 1.0,
        score_every_n_steps: int = 1,
        sft_on: Literal["all", "correct"] = "all",
        **kwargs,
    ):
        super().__init__(policy, **kwargs)
        if sft_on not in ("all", "correct"):
            raise ValueError(f"model.sft_on must be 'all' or 'correct', got {sft_on!r}")

    def auto_warm_start(self) -> Path | None:
        return ensure_warm_start(self.policy)  # the built-in model's cached warm start

    def make_rollouts(self, batch: PromptBatch):
        """Called by the DataModule on device: one image per spec from the current policy."""
        hp = self.hparams
        return self.policy.generate_images(batch.prompts, cfg_scale=hp.cfg_scale, temperature=hp.temperature,
                                           return_gumbel=hp.end_to_end)

    def training_step(self, batch: PromptBatch, batch_idx: int) -> torch.Tensor:
        rollout = batch.rollout if batch.rollout is not None else self.make_rollouts(batch)
        questions, answers = self.qa(batch.specs)
        images = (
            self.policy.relaxed_image_tokens(rollout, self.hparams.gumbel_tau)
            if self.hparams.end_to_end
            else rollout.tokens
        )
        logp, mask = self.policy.answer_logprobs(images, questions, answers)
        gen_ok = None
        if self.hparams.sft_on == "correct":
            gen_ok = self._judge_own_images(batch, rollout)
            rows = gen_ok.to(mask.device)[:, None]
            logp, mask = logp * rows, mask & rows
            self.log("train/sft_rows_frac", gen_ok.float().mean(), batch_size=len(batch))
        loss = -(logp.sum() / mask.sum().clamp(min=1))  # no judged-correct image: 0, nothing trains
        self.log("train/loss", loss, prog_bar=True, batch_size=len(batch))
        n = self.hparams.score_every_n_steps
        if n and batch_idx % n == 0:
            self._log_step_scores(batch, rollout, gen_ok)
        return loss

    @torch.no_grad()
    def _judge_own_images(self, batch: PromptBatch, rollout) -> torch.Tensor:
        """bool `[B]`: the GenEval verdict on each own image."""
        return self.judge.correct(self.policy.decode_images(rollout.tokens), batch.specs)

    @torch.no_grad()
    def _log_step_scores(self, batch: PromptBatch, rollout, gen_ok: torch.Tensor | None = None) -> None:
        if gen_ok is None:
            gen_ok = self._judge_own_images(batch, rollout)
        gen_ok = gen_ok.float()
        questions, _ = self.qa(batch.specs)
        answers = self.policy.answer(rollout.tokens, questions, greedy=True)
        grades = [grade_answer(s, a) for s, a in zip(batch.specs, answers.texts)]
        self.log_dict(
            {
                "train/geneval": gen_ok.mean(),
                "train/answer_acc": torch.tensor([g.correct for g in grades], dtype=torch.float).mean(),
                "train/answer_score": torch.tensor([g.score for g in grades], dtype=torch.float).mean(),
            },
            prog_bar=True,
            batch_size=len(batch),
        )
