"""What every recipe shares: the policy and its warm start, the optimiser, and GenEval validation.

Validation (every `val_check_interval` steps) is the evaluation loop of the library: the policy
draws one image per held-out prompt, the judge scores it (GenEval), the policy answers its own
question about it (imbalance), and it answers about a rendered ground-truth image of the same
prompt (understanding accuracy). Scalars and an image grid go to the logger.
"""

from __future__ import annotations


import torch

from unirl_lightning.callbacks.image_grid import log_image_grid
from unirl_lightning.data.datamodule import PromptBatch
from unirl_lightning.data.qa import answer_for, grade_answer, question_for
from unirl_lightning.evaluation.metrics import ImbalanceScore
from unirl_lightning.models.base import UnifiedPolicy
from unirl_lightning.modules.base import RecipeModule
from unirl_lightning.worlds.render import WorldConfig, render_batch


class PolicyModule(RecipeModule):
    """Base LightningModule of the unified-model recipes.

    Args:
        policy: the unified model (any `UnifiedPolicy`).
        eval_cfg_scale / eval_temperature: sampling settings of validation images.
        Other arguments: `RecipeModule`'s (warm start, AdamW, detector, grid_size, save_to).
    """

    def __init__(
        self,
        policy: UnifiedPolicy,
        warm_start: str | None = "auto",
        lr: float = 1e-5,
        eval_cfg_scale: float = 1.0,
        eval_temperature: float = 1.0,
        **kwargs,
    ):
        super().__init__(policy, warm_start=warm_start, lr=lr, **kwargs)
        self.val_imbalance = ImbalanceScore()

    # ---- shared evaluation ------------------------------------------------------------
    def understanding_correct(self, image_tokens: torch.Tensor, specs: list[dict]) -> torch.Tensor:
        """bool `[N]`: the policy's greedy answer to each spec's question about the given images."""
        answers = self.policy.answer(image_tokens, [question_for(s) for s in specs], greedy=True)
        return torch.tensor(
            [grade_answer(s, a).correct for s, a in zip(specs, answers.texts)], dtype=torch.bool
        )

    def validation_step(self, batch: PromptBatch, batch_idx: int) -> None:
        specs = batch.specs
        gen = torch.Generator(device=self.device).manual_seed(10_000 + batch_idx)
        rollout = self.policy.generate_images(
            batch.prompts,
            cfg_scale=self.hparams.eval_cfg_scale,
            temperature=self.hparams.eval_temperature,
            generator=gen,
        )
        images = self.policy.decode_images(rollout.tokens)
        tasks = [s["tag"] for s in specs]
        gen_ok = self.judge.correct(images, specs)
        und_ok = self.understanding_correct(rollout.tokens, specs)
        self.val_geneval.update(tasks, gen_ok.to(self.device))
        self.val_imbalance.update(tasks, gen_ok.to(self.device), und_ok.to(self.device))
        self.log("val/answer_acc_own", und_ok.float().mean(), batch_size=len(specs), sync_dist=True)
        rendered = self.rendered_tokens(specs, seed=batch_idx)
        if rendered is not None:
            acc = self.understanding_correct(rendered, specs).float().mean()
            self.log("val/answer_acc_rendered", acc, batch_size=len(specs), sync_dist=True)
        if batch_idx == 0:
            n = self.hparams.grid_size
            log_image_grid(
                self.logger, "val/images", images[:n], batch.prompts[:n], self.global_step, gen_ok[:n]
            )

    def rendered_tokens(self, specs: list[dict], seed: int = 0) -> torch.Tensor | None:
        """Ground-truth images of the specs as policy tokens (None when the policy has no image encoder)."""
        images, _ = render_batch(specs, [seed * 100_003 + i for i in range(len(specs))], self.world_config())
        return self.policy.encode_images(images)

    def world_config(self) -> WorldConfig:
        """The policy's synthetic world (its `world_config`), or the default one."""
        return self.policy.world_config or WorldConfig()

    def on_validation_epoch_end(self) -> None:
        self.log_dict({f"val/{k}": v for k, v in self.val_geneval.compute().items()}, sync_dist=False)
        self.log_dict({f"val/{k}": v for k, v in self.val_imbalance.compute().items()}, sync_dist=False)
        self.val_geneval.reset()
        self.val_imbalance.reset()

    # ---- shared training helpers --------------------------------------------------------
    @staticmethod
    def qa(specs: list[dict]) -> tuple[list[str], list[str]]:
        """UniRL's question and ground-truth answer for each spec."""
        return [question_for(s) for s in specs], [answer_for(s) for s in specs]
