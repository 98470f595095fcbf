"""What the flow recipes share: the flow policy and its warm start, AdamW, and GenEval validation.

Validation draws one image per held-out prompt by the deterministic ODE sampler (noise 0),
scores it with the GenEval judge, and logs the GenEval scores, the partial-credit mean and an
image grid. The discrete recipes' `PolicyModule` also measures understanding, which a flow
policy does not have.
"""

from __future__ import annotations

from pathlib import Path

import lightning as L
import torch

from unirl_lightning.data.datamodule import PromptBatch
from unirl_lightning.evaluation.detection import Detector
from unirl_lightning.evaluation.judge import GenEvalJudge
from unirl_lightning.evaluation.metrics import GenEvalScore
from unirl_lightning.models.flow import FlowPolicy


class FlowPolicyModule(L.LightningModule):
    """Base LightningModule of the flow recipes.

    Args:
        policy: the flow policy (any `FlowPolicy`).
        warm_start: "auto" (built-in `TinyFlowModel`: the cached flow warm start, trained on first
            use; a no-op for pretrained policies such as `DiffusersFlowPolicy`), a folder written by
            `save_pretrained`, or None (keep the initial weights).
        lr, weight_decay, betas: AdamW settings.
        detector: GenEval detector (default: the synthetic world's exact detector).
        eval_num_steps / eval_cfg_scale: the validation sampler (ODE, noise 0).
        eval_repeats: images per held-out prompt (more = a less noisy GenEval estimate).
        grid_size: images in the logged validation grid.
    """

    def __init__(
        self,
        policy: FlowPolicy,
        warm_start: str | None = "auto",
        lr: float = 1e-4,
        weight_decay: float = 0.0,
        betas: tuple[float, float] = (0.9, 0.999),
        detector: Detector | None = None,
        eval_num_steps: int = 20,
        eval_cfg_scale: float = 1.0,
        eval_repeats: int = 1,
        grid_size: int = 16,
    ):
        super().__init__()
        self.save_hyperparameters(ignore=["policy", "detector"])
        self.policy = policy
        self.judge = GenEvalJudge(detector)
        self.val_geneval = GenEvalScore()
        self._warm_started = False

    # ---- warm start -------------------------------------------------------------------
    def setup(self, stage: str) -> None:
        if self._warm_started or self.hparams.warm_start is None:
            return
        self._warm_started = True
        source = self.hparams.warm_start
        if source == "auto":
            if getattr(self.policy, "config", None) is None:
                return  # a pretrained model (e.g. DiffusersFlowPolicy) is its own warm start
            from unirl_lightning.flow_warm_start import ensure_flow_warm_start

            source = ensure_flow_warm_start(self.policy)
        if not Path(source).is_dir():
            raise FileNotFoundError(f"model.warm_start: {source!r} is not a folder written by save_pretrained")
        loaded = type(self.policy).from_pretrained(source)
        self.policy.load_state_dict(loaded.state_dict())
        self.on_warm_started()

    def on_warm_started(self) -> None:
        """Hook: runs after the warm-start weights are loaded (e.g. to copy the reference)."""

    def configure_optimizers(self):
        params = [p for p in self.policy.parameters() if p.requires_grad]
        return torch.optim.AdamW(params, lr=self.hparams.lr, weight_decay=self.hparams.weight_decay,
                                 betas=tuple(self.hparams.betas))

    # ---- evaluation -------------------------------------------------------------------
    def validation_step(self, batch: PromptBatch, batch_idx: int) -> None:
        hp = self.hparams
        gen = torch.Generator(device=self.device).manual_seed(10_000 + batch_idx)  # same noise every validation
        specs = [s for s in batch.specs for _ in range(hp.eval_repeats)]
        prompts = [s["prompt"] for s in specs]
        rollout = self.policy.sample(prompts, num_steps=hp.eval_num_steps, noise_level=0.0,
                                     cfg_scale=hp.eval_cfg_scale, generator=gen)
        results = self.judge(rollout.images, specs)
        correct = torch.tensor([r.correct for r in results], dtype=torch.bool)
        self.val_geneval.update([s["tag"] for s in specs], correct.to(self.device))
        partial = torch.tensor([float(r.partial) for r in results]).mean()
        self.log("val/geneval_partial", partial, batch_size=len(results), sync_dist=True)
        if batch_idx == 0:
            from unirl_lightning.callbacks.image_grid import log_image_grid

            n = hp.grid_size
            log_image_grid(self.logger, "val/images", rollout.images[:n], prompts[:n], self.global_step, correct[:n])

    def on_validation_epoch_end(self) -> None:
        self.log_dict({f"val/{k}": v for k, v in self.val_geneval.compute().items()}, sync_dist=False)
        self.val_geneval.reset()

    test_step = validation_step
    on_test_epoch_end = on_validation_epoch_end
