"""An exponential moving average of the policy's trainable weights, for evaluation and saving.

Flow-GRPO keeps one (decay 0.9) and evaluates with it: RL updates from single rollouts are noisy,
and the average of the last iterates scores above the last iterate. Rollouts and updates always
use the live weights; validation swaps the average in and back out, and at the end of fit the
average is copied into the policy, so the recipe's `save_to` writes it. (Evaluation that runs
inside the training loop, such as `PolicyGenEvalCallback`, sees the live weights.)

Unlike Lightning's `WeightAveraging`, which deep-copies the whole LightningModule when fit is set
up (before the recipes load their warm start, create the frozen reference or add LoRA), this keeps
one copy of the trainable parameters only, taken at `on_fit_start`, when they are final; it works
on FSDP-sharded parameters (each rank averages its own shard).
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor, nn


class PolicyEMA(pl.Callback):
    """EMA of the trainable parameters of `pl_module.<attribute>` for each attribute.

    After every `update_every`-th optimiser step from `start_step` on:
    `avg <- d * avg + (1 - d) * live`, with `d = min(decay, (1 + n) / (10 + n))` after n earlier
    updates when `warmup` (diffusers' EMA warm-up: early averages do not hold the start for long).

    Args:
        decay: the EMA decay per update (Flow-GRPO: 0.9).
        update_every: optimiser steps between updates.
        start_step: first optimiser step that updates the average (before it, avg = live).
        warmup: ramp the decay up as above (False: `decay` from the first update).
        attributes: the module attributes holding the averaged models ("policy"; UniGRPO's text
            policy is "text_policy").
    """

    def __init__(self, decay: float = 0.9, update_every: int = 1, start_step: int = 0, warmup: bool = True,
                 attributes: list[str] | tuple[str, ...] = ("policy",)):
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"PolicyEMA.decay must be in [0, 1), got {decay}")
        if update_every < 1:
            raise ValueError(f"PolicyEMA.update_every must be >= 1, got {update_every}")
        if not attributes:
            raise ValueError(
                "PolicyEMA.attributes is empty: name at least one model attribute, e.g. [policy]"
            )
        self.decay, self.update_every, self.start_step, self.warmup = decay, update_every, start_step, warmup
        self.attributes = list(attributes)
        self.num_updates = 0
        self._average: list[Tensor] | None = None
        self._restored: list[Tensor] | None = None
        self._last_step = -1

    # ---- the averaged parameters ------------------------------------------------------
    def parameters(self, pl_module: pl.LightningModule) -> list[nn.Parameter]:
        """The live trainable parameters, in a fixed order."""
        params = []
        for name in self.attributes:
            model = getattr(pl_module, name, None)
            if not isinstance(model, nn.Module):
                raise ValueError(
                    f"PolicyEMA.attributes: {type(pl_module).__name__} has no model {name!r}; "
                    "name the attributes that hold the trained models (e.g. [policy])"
                )
            params += [p for p in model.parameters() if p.requires_grad]
        return params

    def current_decay(self) -> float:
        if not self.warmup:
            return self.decay
        return min(self.decay, (1 + self.num_updates) / (10 + self.num_updates))

    @torch.no_grad()
    def update(self, pl_module: pl.LightningModule) -> None:
        weight = 1.0 - self.current_decay()
        for avg, live in zip(self._average, self.parameters(pl_module), strict=True):
            avg.lerp_(live.detach(), weight)
        self.num_updates += 1

    @torch.no_grad()
    def swap(self, pl_module: pl.LightningModule) -> None:
        """Exchanges the live and the averaged values (twice = no change)."""
        for avg, live in zip(self._average, self.parameters(pl_module), strict=True):
            tmp = live.detach().clone()
            live.data.copy_(avg)
            avg.copy_(tmp)

    # ---- hooks ------------------------------------------------------------------------
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        params = self.parameters(pl_module)
        if self._restored is not None:  # resumed from a checkpoint
            if len(self._restored) != len(params):
                raise ValueError(
                    f"PolicyEMA: the checkpoint averages {len(self._restored)} tensors, the model "
                    f"trains {len(params)}; resume with the same model and attributes"
                )
            self._average = [r.to(p.device, p.dtype) for r, p in zip(self._restored, params)]
            self._restored = None
        else:
            self._average = [p.detach().clone() for p in params]
        self._last_step = trainer.global_step

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        step = trainer.global_step  # optimiser steps so far (rollouts_per_update batches make one)
        if step == self._last_step:
            return
        self._last_step = step
        if step <= self.start_step:
            with torch.no_grad():  # before the start the average follows the live weights
                for avg, live in zip(self._average, self.parameters(pl_module), strict=True):
                    avg.copy_(live.detach())
        elif (step - self.start_step) % self.update_every == 0:
            self.update(pl_module)

    def on_validation_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._average is not None:
            self.swap(pl_module)

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._average is not None:
            self.swap(pl_module)

    @torch.no_grad()
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Callbacks' on_train_end runs before the module's, which saves to `save_to`.
        for avg, live in zip(self._average, self.parameters(pl_module), strict=True):
            live.data.copy_(avg)
        self._average = None

    def state_dict(self) -> dict[str, Any]:
        average = None if self._average is None else [a.detach().cpu() for a in self._average]
        return {"num_updates": self.num_updates, "average": average}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.num_updates = state_dict["num_updates"]
        self._restored = state_dict["average"]
