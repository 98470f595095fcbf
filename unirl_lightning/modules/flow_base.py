"""What the flow recipes share: the flow policy and its warm start, AdamW, and GenEval validation.

Validation draws one image per held-out prompt by the deterministic ODE sampler (noise 0),
scores it with the GenEval judge, and logs the GenEval scores, the partial-credit mean, the
policy's image-quality proxy (`off_manifold`, when it has one) and an
image grid. The discrete recipes' `PolicyModule` also measures understanding, which a flow
policy does not have.
"""

from __future__ import annotations

import torch
from torch import Tensor

from unirl_lightning.callbacks.image_grid import log_image_grid
from unirl_lightning.data.datamodule import PromptBatch
from unirl_lightning.models.flow import FlowPolicy
from unirl_lightning.models.flow.base import TextCondition
from unirl_lightning.models.lora import check_lora_targets
from unirl_lightning.modules.base import RecipeModule


def check_lora_settings(policy: FlowPolicy, lora_rank: int, lora_target_modules: list[str] | None) -> None:
    """`model.lora_rank` >= 0, and the target modules exist in the policy's transformer (checked before
    any warm start or rollout)."""
    if lora_rank < 0:
        raise ValueError(f"model.lora_rank must be >= 0 (0 = full fine-tuning), got {lora_rank}")
    if lora_rank and lora_target_modules and getattr(policy, "transformer", None) is not None:
        check_lora_targets(policy.transformer, lora_target_modules)


class FlowPolicyModule(RecipeModule):
    """Base LightningModule of the flow recipes.

    Args:
        policy: the flow policy (any `FlowPolicy`); warm_start="auto" loads the built-in
            `TinyFlowModel`'s cached flow warm start (trained on first use) and leaves pretrained
            policies such as `DiffusersFlowPolicy` as they are.
        eval_num_steps / eval_cfg_scale: the validation sampler (ODE, noise 0).
        eval_repeats: images per held-out prompt (more = a less noisy GenEval estimate).
        Other arguments: `RecipeModule`'s (warm start, AdamW, detector, grid_size, save_to).
    """

    def __init__(
        self,
        policy: FlowPolicy,
        warm_start: str | None = "auto",
        lr: float = 1e-4,
        eval_num_steps: int = 20,
        eval_cfg_scale: float = 1.0,
        eval_repeats: int = 1,
        **kwargs,
    ):
        super().__init__(policy, warm_start=warm_start, lr=lr, **kwargs)

    def text_condition(self, prompts: list[str]) -> TextCondition:
        """The policy's text condition of `prompts`, with gradient only when its text encoder trains."""
        if self.policy.text_trainable:
            return self.policy.encode_text(prompts)
        with torch.no_grad():
            return self.policy.encode_text(prompts)

    # ---- LoRA and the reference ---------------------------------------------------------
    def add_lora_adapters(self) -> None:
        """Put the `lora_rank` adapters on the (warm-started) policy, once (`setup`)."""
        hp = self.hparams
        if hp.lora_rank and not self.policy.has_lora:
            self.policy.add_lora(hp.lora_rank, hp.lora_alpha, hp.lora_target_modules)

    @torch.no_grad()
    def reference_velocity(self, x_t: Tensor, t: Tensor, cond: TextCondition) -> Tensor:
        """The frozen reference's velocity at `(x_t, t)`: the recipe's `reference` copy, or under LoRA
        the base model (adapters disabled)."""
        reference = getattr(self, "reference", None)  # a submodule: not a class attribute
        if reference is not None:
            return reference.velocity(x_t, t, cond)
        with self.policy.adapters_disabled():
            return self.policy.velocity(x_t, t, cond)

    # ---- evaluation -------------------------------------------------------------------
    def validation_step(self, batch: PromptBatch, batch_idx: int) -> None:
        hp = self.hparams
        gen = torch.Generator(device=self.device).manual_seed(
            10_000 + batch_idx
        )  # same noise every validation
        specs = [s for s in batch.specs for _ in range(hp.eval_repeats)]
        prompts = [s["prompt"] for s in specs]
        rollout = self.policy.sample(
            prompts, num_steps=hp.eval_num_steps, noise_level=0.0, cfg_scale=hp.eval_cfg_scale, generator=gen
        )
        results = self.judge(rollout.images, specs)
        correct = torch.tensor([r.correct for r in results], dtype=torch.bool)
        self.val_geneval.update([s["tag"] for s in specs], correct.to(self.device))
        partial = torch.tensor([float(r.partial) for r in results]).mean()
        self.log("val/geneval_partial", partial, batch_size=len(results), sync_dist=True)
        self.log_off_manifold(rollout, len(results))
        if batch_idx == 0:
            n = hp.grid_size
            log_image_grid(
                self.logger, "val/images", rollout.images[:n], prompts[:n], self.global_step, correct[:n]
            )

    def log_off_manifold(self, rollout, batch_size: int) -> None:
        """Logs the policy's image-quality proxy of the final latents (drift the judge cannot see), if it has
        one."""
        off = self.policy.off_manifold(rollout.latents[:, -1])
        if off is not None:
            self.log("val/off_manifold", off.mean(), batch_size=batch_size, sync_dist=True)

    def on_validation_epoch_end(self) -> None:
        self.log_dict({f"val/{k}": v for k, v in self.val_geneval.compute().items()}, sync_dist=False)
        self.val_geneval.reset()

    test_step = validation_step
    on_test_epoch_end = on_validation_epoch_end
