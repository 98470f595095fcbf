"""The generation half of periodic GenEval evaluation, wired to any `UnifiedPolicy` recipe."""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import lightning.pytorch as pl
import torch
from torch import Tensor

from unirl_lightning.callbacks.geneval_logging import GenEvalCallback
from unirl_lightning.evaluation.detection import Detector
from unirl_lightning.evaluation.metrics import GenEvalScore
from unirl_lightning.worlds.detector import WorldDetector


class PolicyGenEvalCallback(GenEvalCallback):
    """Every `every_n_steps` steps: the recipe's policy draws `samples_per_prompt` images per
    prompt, the judge scores them, the policy answers its own questions (imbalance), and the
    scalars plus a captioned grid go to TensorBoard.

    Args:
        specs: fixed GenEval specs; None takes the DataModule's validation prompts.
        detector: GenEval detector (default: the synthetic world's exact one).
    """

    def __init__(
        self,
        specs: list[dict] | None = None,
        detector: Detector | None = None,
        every_n_steps: int = 100,
        samples_per_prompt: int = 1,
        cfg_scale: float = 1.0,
        temperature: float = 1.0,
        seed: int = 0,
        max_grid_images: int = 16,
    ):
        super().__init__(
            list(specs or []), detector or WorldDetector(), every_n_steps, max_grid_images=max_grid_images
        )
        self.samples_per_prompt, self.cfg_scale, self.temperature, self.seed = (
            samples_per_prompt,
            cfg_scale,
            temperature,
            seed,
        )
        self._tokens: Tensor | None = None

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if not self.specs:
            data = trainer.datamodule
            if data is None or not getattr(data, "val_specs", None):
                raise ValueError(
                    "PolicyGenEvalCallback has no specs: pass specs, or use a DataModule with val_specs"
                )
            self.specs = list(data.val_specs)
            self.prompt_ids = list(range(len(self.specs)))
            self.metric = GenEvalScore(max_prompts=len(self.specs))

    def generate(self, pl_module: pl.LightningModule, specs: Sequence[Mapping[str, Any]]) -> Tensor:
        prompts = [s["prompt"] for s in specs for _ in range(self.samples_per_prompt)]
        gen = torch.Generator(device=pl_module.device).manual_seed(
            self.seed
        )  # same noise each time: comparable
        rollout = pl_module.policy.generate_images(
            prompts, cfg_scale=self.cfg_scale, temperature=self.temperature, generator=gen
        )
        self._tokens = rollout.tokens
        return pl_module.policy.decode_images(rollout.tokens)

    def understand(
        self, pl_module: pl.LightningModule, images: Tensor, specs: Sequence[Mapping[str, Any]]
    ) -> Tensor | None:
        specs_rep = [s for s in specs for _ in range(self.samples_per_prompt)]
        return pl_module.understanding_correct(self._tokens, specs_rep)
