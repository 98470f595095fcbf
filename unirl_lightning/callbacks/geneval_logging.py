"""Periodic GenEval evaluation during training: generate, detect, score, log.

`GenEvalCallback` owns the scoring-and-logging half; the generation half is the `generate`
hook, which a recipe overrides (or subclasses) to call its policy. Scalars go to
`pl_module.log_dict` (callback_metrics, for monitors) and straight to every logger at the current
global step (evaluations are rare; they should not wait for `log_every_n_steps`); an image grid
and the prompts (with verdicts) go to every logger whose experiment has `add_image` / `add_text`
(TensorBoard's SummaryWriter).
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import lightning.pytorch as pl
import torch
from torch import Tensor

from unirl_lightning.evaluation.detection import Detector
from unirl_lightning.callbacks.image_grid import make_grid
from unirl_lightning.evaluation.geneval import GenEvalResult
from unirl_lightning.evaluation.judge import score_images
from unirl_lightning.evaluation.metrics import GenEvalScore, ImbalanceScore


def _to_uint8(images: Tensor) -> Tensor:
    """Accept uint8, or floats in [0, 1], as `[N, 3, H, W]`; return uint8."""
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"generate must return images [N, 3, H, W], got shape {tuple(images.shape)}")
    if images.dtype == torch.uint8:
        return images
    if images.is_floating_point():
        return (images.detach().clamp(0, 1) * 255).round().to(torch.uint8)
    raise ValueError(f"generate must return uint8 or float [0, 1] images, got {images.dtype}")


class GenEvalCallback(pl.Callback):
    """Every `every_n_steps` optimizer steps: generate images for `specs`, score them with GenEval
    rules through `detector`, log "geneval/*" (and "imbalance/*" when `understand` answers) scalars,
    an image grid and the prompts.

    Under DDP each rank evaluates its share `specs[rank::world_size]`; the metrics sum their
    counts across ranks, so the logged values cover all specs.

    Override `generate(pl_module, specs) -> uint8 [N, 3, H, W]` (N a multiple of len(specs), images
    grouped by prompt) and optionally `understand(pl_module, images, specs) -> bool [N]`.
    """

    def __init__(
        self,
        specs: Sequence[Mapping[str, Any]],
        detector: Detector,
        every_n_steps: int = 100,
        *,
        metric: GenEvalScore | None = None,
        imbalance: ImbalanceScore | None = None,
        prompt_ids: Sequence[int] | None = None,
        max_grid_images: int = 16,
        eval_kwargs: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__()
        if every_n_steps < 1:
            raise ValueError(f"every_n_steps must be >= 1, got {every_n_steps}")
        if prompt_ids is not None and len(prompt_ids) != len(specs):
            raise ValueError(f"prompt_ids has {len(prompt_ids)} entries for {len(specs)} specs")
        self.specs = list(specs)
        self.detector = detector
        self.every_n_steps = every_n_steps
        self.prompt_ids = list(prompt_ids) if prompt_ids is not None else list(range(len(self.specs)))
        self.metric = (
            metric if metric is not None else GenEvalScore(max_prompts=max(self.prompt_ids, default=-1) + 1)
        )
        self.imbalance = imbalance if imbalance is not None else ImbalanceScore()
        self.max_grid_images = max_grid_images
        self.eval_kwargs = dict(eval_kwargs or {})
        self.last_results: list[GenEvalResult] = []
        self._last_step = -1

    # ---- hooks for the recipe -------------------------------------------------------

    def generate(self, pl_module: pl.LightningModule, specs: Sequence[Mapping[str, Any]]) -> Tensor:
        """Images for `specs`: uint8 `[N, 3, H, W]`, N = k * len(specs), grouped by prompt."""
        raise NotImplementedError(
            "GenEvalCallback.generate is not wired to a policy: subclass GenEvalCallback and implement "
            "generate(pl_module, specs) -> uint8 [N, 3, H, W] (e.g. call pl_module's image sampler)"
        )

    def understand(
        self, pl_module: pl.LightningModule, images: Tensor, specs: Sequence[Mapping[str, Any]]
    ) -> Tensor | None:
        """Optional: bool `[N]`, whether the model answers each image's question right (for the
        imbalance metric). None (the default) skips imbalance; under DDP return None on all ranks
        or on none (the metric sync is collective)."""
        return None

    # ---- Lightning ------------------------------------------------------------------

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        step = trainer.global_step
        # the guard skips repeats within one optimizer step (gradient accumulation)
        if step > 0 and step % self.every_n_steps == 0 and step != self._last_step:
            self._last_step = step
            self.run_evaluation(trainer, pl_module)

    def run_evaluation(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, Tensor]:
        """Generate, score, update the metrics and log; returns the logged scalars."""
        rank, world = trainer.global_rank, trainer.world_size
        specs, pids = self.specs[rank::world], self.prompt_ids[rank::world]
        images, und = self._sample(pl_module, specs)
        k = len(images) // max(1, len(specs))
        specs_rep = [s for s in specs for _ in range(k)]
        results = score_images(images, specs_rep, self.detector, **self.eval_kwargs)
        self.last_results = results
        return self.log_evaluation(
            trainer, pl_module, images, specs_rep, results, [p for p in pids for _ in range(k)], und
        )

    def _sample(self, pl_module: pl.LightningModule, specs: list) -> tuple[Tensor, Tensor | None]:
        """Run the hooks in eval mode without gradients; check the image count."""
        if not specs:  # a rank with no share still joins the collective metric syncs
            overridden = type(self).understand is not GenEvalCallback.understand
            return torch.zeros(0, 3, 1, 1, dtype=torch.uint8), (
                torch.zeros(0, dtype=torch.bool) if overridden else None
            )
        was_training = pl_module.training
        pl_module.eval()
        try:
            with torch.no_grad():
                images = _to_uint8(self.generate(pl_module, specs))
                und = self.understand(pl_module, images, specs)
        finally:
            pl_module.train(was_training)
        if len(images) == 0 or len(images) % len(specs):
            raise ValueError(
                f"generate returned {len(images)} images for {len(specs)} specs; return k per spec"
            )
        return images, und

    def log_evaluation(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        images: Tensor,
        specs: Sequence[Mapping[str, Any]],
        results: Sequence[GenEvalResult],
        prompt_ids: Sequence[int],
        und_correct: Tensor | None = None,
    ) -> dict[str, Tensor]:
        """Update the metrics (fresh each evaluation), log scalars, a grid and the prompts."""
        device = pl_module.device
        self.metric.to(device).reset()
        self.imbalance.to(device).reset()
        tasks = [s["tag"] for s in specs]
        correct = torch.tensor([r.correct for r in results], dtype=torch.bool)
        self.metric.update(tasks, correct, torch.tensor(prompt_ids, dtype=torch.long))
        values = dict(self.metric.compute())  # collective under DDP: every rank gets here
        if und_correct is not None:
            self.imbalance.update(tasks, correct, torch.as_tensor(und_correct).reshape(-1).bool().cpu())
            values.update(self.imbalance.compute())
        # metric values are already synced; the partial-credit mean is pooled over ranks here
        total = sum(r.partial for r in results)
        sums = torch.tensor([total, len(results)], dtype=torch.float32, device=device)
        sums = trainer.strategy.reduce(sums, reduce_op="sum")
        values["geneval/partial"] = sums[0] / sums[1].clamp(min=1)
        values = {k: v.float() for k, v in values.items()}
        # callback_metrics (for checkpoint monitors) through Lightning; the loggers directly, so an
        # evaluation is written once, whatever `log_every_n_steps` is
        pl_module.log_dict(values, on_step=True, on_epoch=False, logger=False)
        for logger in trainer.loggers:
            logger.log_metrics({k: v.item() for k, v in values.items()}, step=trainer.global_step)
        if trainer.is_global_zero:
            self._log_media(trainer, images, specs, results)
        return values

    def _log_media(
        self,
        trainer: pl.Trainer,
        images: Tensor,
        specs: Sequence[Mapping[str, Any]],
        results: Sequence[GenEvalResult],
    ) -> None:
        n = min(len(images), self.max_grid_images)
        if n == 0:
            return
        grid = make_grid(images[:n])
        lines = [
            f"{i}. {'✓' if r.correct else '✗'} {s.get('prompt', s['tag'])}"
            + (f" — {r.reason}" if r.reason else "")
            for i, (s, r) in enumerate(zip(specs[:n], results[:n]))
        ]
        text = "  \n".join(lines)  # markdown line breaks, row-major like the grid
        for logger in trainer.loggers:
            exp = getattr(logger, "experiment", None)
            if hasattr(exp, "add_image"):
                exp.add_image("geneval/samples", grid, global_step=trainer.global_step, dataformats="CHW")
            if hasattr(exp, "add_text"):
                exp.add_text("geneval/prompts", text, global_step=trainer.global_step)
