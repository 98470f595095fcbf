"""The CLI's default logger: TensorBoard, written inside the run's own folder."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from lightning.pytorch.loggers import TensorBoardLogger as LightningTensorBoardLogger


class TensorBoardLogger(LightningTensorBoardLogger):
    """Lightning's TensorBoardLogger whose `save_dir` follows the run: left unset, the logs go to
    `<trainer.default_root_dir>/lightning_logs/version_N` when the run names a root folder, else to
    `runs/lightning_logs/version_N`.

    Runs started side by side, each with its own `--trainer.default_root_dir`, so never pick the same
    `version_N` (with one shared folder, two runs started in the same second can, and Lightning then
    stops one of them at setup). A `save_dir` the user gives is kept as given.
    """

    def __init__(
        self, save_dir: str | Path | None = None, name: str | None = "lightning_logs", **kwargs: Any
    ) -> None:
        super().__init__(save_dir if save_dir is not None else "runs", name=name, **kwargs)
        self.follows_run = save_dir is None

    def follow_run(self, default_root_dir: str | Path | None) -> None:
        """Write under the trainer's `default_root_dir` (called by the CLI before anything is logged)."""
        if self.follows_run and default_root_dir is not None:
            self._root_dir = os.fspath(default_root_dir)
