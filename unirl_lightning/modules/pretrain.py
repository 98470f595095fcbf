"""Warm start of the built-in model on rendered scenes: prompt -> image and image -> answer.

It gives post-training something to improve: a model that draws roughly right and answers
roughly right, as a pretrained unified model would.
"""

from __future__ import annotations

import torch

from unirl_lightning.models.base import UnifiedPolicy
from unirl_lightning.modules.training import warmup_cosine
from unirl_lightning.modules.unified import PolicyModule


class WarmStartPretrain(PolicyModule):
    """Supervised pretraining: generation cross-entropy (with condition dropout for CFG) plus
    answer NLL on rendered images.

    Args:
        cfg_dropout: probability of dropping the prompt (unconditional rows teach CFG).
        understanding_weight: weight of the answer loss.
    """

    def __init__(
        self,
        policy: UnifiedPolicy,
        cfg_dropout: float = 0.1,
        understanding_weight: float = 1.0,
        warm_start: str | None = None,
        lr: float = 1e-3,
        weight_decay: float = 0.01,
        warmup_steps: int = 100,
        max_steps: int = 3000,
        **kwargs,
    ):
        super().__init__(policy, warm_start=warm_start, lr=lr, weight_decay=weight_decay, **kwargs)

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        policy = self.policy
        tokens = policy.encode_images(batch["images"])
        drop = torch.rand(len(tokens)) < self.hparams.cfg_dropout
        prompts = [None if d else p for d, p in zip(drop.tolist(), batch["prompts"])]
        gen_loss = policy.generation_loss(prompts, tokens)
        und_loss = policy.understanding_loss(tokens, batch["questions"], batch["answers"])
        loss = gen_loss + self.hparams.understanding_weight * und_loss
        self.log_dict(
            {"train/gen_loss": gen_loss, "train/und_loss": und_loss}, prog_bar=True, batch_size=len(tokens)
        )
        return loss

    def configure_optimizers(self):
        opt = super().configure_optimizers()
        return {
            "optimizer": opt,
            "lr_scheduler": warmup_cosine(opt, self.hparams.warmup_steps, self.hparams.max_steps),
        }
