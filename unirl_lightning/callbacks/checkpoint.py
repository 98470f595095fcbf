"""Step checkpoints for runs without epochs: every N optimiser steps and at the end, written atomically.

The on-policy DataModules stream prompts without end, so an epoch never finishes, and Lightning's
default `ModelCheckpoint` (which saves at epoch ends or after validation) would never save.
`StepCheckpoint` saves by optimiser steps instead, keeps the latest `keep` of them and links
`last.ckpt` to the newest; `--ckpt_path last` resumes from it.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import ModelCheckpoint

PARTIAL = ".partial"


def _fsync_tree(path: Path) -> None:
    """Flush a written file, or every file of a written folder (a sharded checkpoint), to disk."""
    files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
    for f in files:
        fd = os.open(f, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class StepCheckpoint(ModelCheckpoint):
    """Save the whole training state every `every_n_train_steps` optimiser steps and when fit ends.

    Each checkpoint is written to `<name>.partial` and renamed into place once complete, and
    `last.ckpt` is re-pointed by an atomic rename too: a process killed during a save leaves the
    previous checkpoints whole and loadable. Saves happen only at update boundaries (after the last
    of `rollouts_per_update` batches), so no half-accumulated gradient is ever needed on resume.

    Args:
        dirpath: the folder (default `<trainer.default_root_dir>/checkpoints`). A new run (no
            `ckpt_path`) refuses a folder that already holds checkpoints, unless `overwrite`:
            resume that run with `--ckpt_path last`, or give this one its own folder.
        every_n_train_steps: optimiser steps between checkpoints.
        keep: how many step checkpoints to keep (the newest; -1 keeps all).
        overwrite: let a new run write into a folder holding another run's checkpoints.
    """

    FILENAME = "step-{step:06d}"

    def __init__(
        self,
        dirpath: str | None = None,
        every_n_train_steps: int = 50,
        keep: int = 2,
        overwrite: bool = False,
    ) -> None:
        if every_n_train_steps < 1:
            raise ValueError(f"StepCheckpoint: every_n_train_steps must be >= 1, got {every_n_train_steps}")
        if keep == 0 or keep < -1:
            raise ValueError(f"StepCheckpoint: keep must be >= 1 or -1 (all), got {keep}")
        super().__init__(
            dirpath=dirpath,
            filename=self.FILENAME,
            monitor="step",
            mode="max",
            save_top_k=keep,
            save_last="link",
            every_n_train_steps=every_n_train_steps,
            auto_insert_metric_name=False,
            save_on_train_epoch_end=False,
            enable_version_counter=False,  # one last.ckpt, re-pointed; step names never repeat
        )
        self.overwrite = overwrite
        self._last_seen_step: int | None = None

    # ---- where ---------------------------------------------------------------------------
    def resolve_dirpath(self, trainer: pl.Trainer) -> Path:
        if self.dirpath is None:
            self.dirpath = os.path.join(trainer.default_root_dir, "checkpoints")
        return Path(self.dirpath)

    def complete_checkpoints(self, trainer: pl.Trainer) -> list[Path]:
        """The complete step checkpoints in the folder, oldest first."""
        folder = self.resolve_dirpath(trainer)
        if not folder.is_dir():
            return []
        found = [p for p in folder.iterdir() if re.fullmatch(r"step-\d+\.ckpt", p.name)]
        return sorted(found, key=lambda p: int(p.stem.split("-")[1]))

    def _find_last_checkpoints(self, trainer: pl.Trainer) -> set[str]:
        """What `ckpt_path="last"` resolves to: `last.ckpt`, else the newest complete step checkpoint."""
        folder = self.resolve_dirpath(trainer)
        last = folder / f"{self.CHECKPOINT_NAME_LAST}{self.FILE_EXTENSION}"
        if last.exists():  # a link to a step checkpoint that exists
            return {str(last)}
        found = self.complete_checkpoints(trainer)
        return {str(found[-1])} if found else set()

    def refuse_used_folder(self, trainer: pl.Trainer) -> None:
        """A new run must not overwrite (or prune) another run's checkpoints."""
        found = self.complete_checkpoints(trainer)
        if found and not self.overwrite:
            raise FileExistsError(
                f"StepCheckpoint: {self.dirpath} holds the checkpoints of another run (newest: "
                f"{found[-1].name}). Resume it with --ckpt_path last; or give this run its own folder "
                "(--trainer.default_root_dir DIR, or the callback's dirpath); or set the callback's "
                "overwrite: true"
            )

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        folder = self.resolve_dirpath(trainer)
        if trainer.is_global_zero and folder.is_dir():
            for stale in folder.glob(f"*{PARTIAL}"):  # left by a process killed while saving
                shutil.rmtree(stale) if stale.is_dir() else stale.unlink()
        super().setup(trainer, pl_module, stage)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_train_start(trainer, pl_module)
        if trainer.ckpt_path is None:  # the CLI checks before any compute; this covers Trainer.fit
            self.refuse_used_folder(trainer)
        # After the checkpoint is restored: a resumed run counts steps from its global step.
        self._last_seen_step = trainer.global_step

    # ---- when ----------------------------------------------------------------------------
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        step = trainer.global_step
        stepped, self._last_seen_step = step != self._last_seen_step, step
        if not stepped or self._should_skip_saving_checkpoint(trainer):
            return  # mid-accumulation (no optimiser step in this batch), or already saved
        due = step % self._every_n_train_steps == 0
        ending = trainer.should_stop or (trainer.max_steps > 0 and step >= trainer.max_steps)
        if due or ending:
            candidates = self._monitor_candidates(trainer)
            self._save_topk_checkpoint(trainer, candidates)
            self._save_last_checkpoint(trainer, candidates)

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Saves follow steps only."""

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Saves follow steps only."""

    # ---- how -----------------------------------------------------------------------------
    def _save_checkpoint(self, trainer: pl.Trainer, filepath: str) -> None:
        partial = filepath + PARTIAL
        super()._save_checkpoint(trainer, partial)
        if trainer.is_global_zero:
            target, written = Path(filepath), Path(partial)
            _fsync_tree(written)
            if target.is_dir():
                shutil.rmtree(target)
            os.replace(written, target)
            _fsync_dir(target.parent)
        trainer.strategy.barrier()
        self._last_checkpoint_saved = filepath

    @staticmethod
    def _link_checkpoint(trainer: pl.Trainer, filepath: str, linkpath: str) -> None:
        """Point `linkpath` (last.ckpt) at `filepath` by renaming a new link over it: never absent."""
        if trainer.is_global_zero and os.path.abspath(filepath) != os.path.abspath(linkpath):
            link = Path(linkpath)
            if link.is_dir() and not link.is_symlink():
                shutil.rmtree(link)
            tmp = link.with_name(link.name + ".link" + PARTIAL)
            if tmp.is_symlink() or tmp.exists():
                tmp.unlink()
            os.symlink(os.path.relpath(filepath, link.parent), tmp)
            os.replace(tmp, link)
            _fsync_dir(link.parent)
        trainer.strategy.barrier()
