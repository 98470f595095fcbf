"""Save the recipe's policies every few CPU minutes, to score a learning curve after the run.

Scoring inside a run spends the run's budget on evaluation; saving a 2M-parameter policy costs
milliseconds. `PolicySnapshots` writes `save_pretrained` folders at CPU-minute marks and an
`index.json` naming each with its CPU minutes, optimiser step and rollouts, so a script can score
them afterwards (`benchmarks/flow_rl_curves.py`).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import lightning.pytorch as pl

from unirl_lightning.callbacks.cpu_budget import CPUTimeBudget, batches_per_update, process_cpu_seconds


class PolicySnapshots(pl.Callback):
    """Every `every_cpu_minutes` of CPU time, and when fit ends, `save_policies(<dirpath>/cpu-<minutes>)`.

    CPU time is `CPUTimeBudget`'s count when the trainer has one (same `since`, carried over a
    resume), else this process's user + system time. Snapshots are taken at update boundaries
    (after the last of `rollouts_per_update` batches), the first mark that a boundary has passed;
    `index.json` lists `{"folder", "cpu_minutes", "step", "rollouts"}` in order, rewritten
    atomically after each.

    Args:
        dirpath: where snapshots go (default `<trainer.default_root_dir>/snapshots`). A new run
            refuses a folder that already has an `index.json` unless `overwrite`.
        every_cpu_minutes: CPU minutes between snapshots.
        overwrite: let a new run write into a folder holding another run's snapshots.
    """

    INDEX = "index.json"

    def __init__(self, dirpath: str | None = None, every_cpu_minutes: float = 2.0, overwrite: bool = False):
        if every_cpu_minutes <= 0:
            raise ValueError(f"PolicySnapshots: every_cpu_minutes must be > 0, got {every_cpu_minutes}")
        self.dirpath, self.every, self.overwrite = dirpath, every_cpu_minutes, overwrite
        self.entries: list[dict[str, Any]] = []
        self._budget: CPUTimeBudget | None = None

    def state_dict(self) -> dict[str, Any]:
        return {"entries": list(self.entries)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.entries = list(state_dict["entries"])

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self.dirpath is None:
            self.dirpath = str(Path(trainer.default_root_dir) / "snapshots")
        index = Path(self.dirpath) / self.INDEX
        if stage == "fit" and index.exists() and not self.overwrite and trainer.ckpt_path is None:
            raise FileExistsError(
                f"PolicySnapshots: {self.dirpath} already holds snapshots of a run ({index}); give "
                "this run its own folder (dirpath, or trainer.default_root_dir), or set overwrite: true"
            )
        budgets = [c for c in trainer.callbacks if isinstance(c, CPUTimeBudget)]
        self._budget = budgets[0] if budgets else None

    def cpu_minutes(self) -> float:
        seconds = self._budget.used_seconds() if self._budget is not None else process_cpu_seconds()
        return seconds / 60

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        per_update = batches_per_update(pl_module)
        if (batch_idx + 1) % per_update:
            return
        minutes = self.cpu_minutes()
        last = self.entries[-1]["cpu_minutes"] if self.entries else 0.0
        # the first boundary past the next mark (one snapshot per mark passed, however long the update)
        if int(minutes // self.every) <= int(last // self.every):
            return
        self._snapshot(trainer, pl_module, minutes, per_update)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """The policy as fit ends (the curve's last point), unless the last snapshot is of this step."""
        if self.entries and self.entries[-1]["step"] == trainer.global_step:
            return
        self._snapshot(trainer, pl_module, self.cpu_minutes(), batches_per_update(pl_module))

    def _snapshot(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, minutes: float, per_update: int
    ) -> None:
        folder = f"cpu-{minutes:06.2f}"
        pl_module.save_policies(Path(self.dirpath) / folder)
        self.entries.append(
            {
                "folder": folder,
                "cpu_minutes": round(minutes, 3),
                "step": trainer.global_step,
                "rollouts": trainer.global_step * per_update,
            }
        )
        if trainer.is_global_zero:
            index = Path(self.dirpath) / self.INDEX
            tmp = index.with_suffix(".json.partial")
            tmp.write_text(json.dumps(self.entries, indent=1))
            os.replace(tmp, index)
