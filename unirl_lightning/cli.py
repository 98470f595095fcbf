"""The command line: LightningCLI in subclass mode for the recipe (model) and the data."""

from __future__ import annotations

import contextvars
from typing import Any, Sequence

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint, ProgressBar
from lightning.pytorch.cli import LightningCLI

from unirl_lightning.callbacks.checkpoint import StepCheckpoint
from unirl_lightning.callbacks.progress import StepProgress
from unirl_lightning.loggers import TensorBoardLogger


class UniRLCLI(LightningCLI):
    """LightningCLI with the library's defaults: TensorBoard logging (in `--trainer.default_root_dir`
    when given, else `runs/`), recipe and data by class_path, `StepProgress` as the progress display
    (steps of max_steps, in a terminal and in a log) unless the config names a progress bar of its
    own or turns it off, and `StepCheckpoint` when checkpointing is on and the config names no
    checkpoint callback.

    Resuming (`--ckpt_path PATH` or `--ckpt_path last`) keeps this run's settings: the recipe
    refuses a checkpoint whose settings differ (naming the fields) unless
    `--override_checkpoint_settings true`; the learning rate, trainer settings and save_to may change.
    """

    def add_arguments_to_parser(self, parser) -> None:
        parser.set_defaults({"trainer.logger": {"class_path": "unirl_lightning.loggers.TensorBoardLogger"}})
        parser.add_argument(
            "--override_checkpoint_settings",
            type=bool,
            default=False,
            help="resume from --ckpt_path although the checkpoint's settings differ from this run's",
        )

    def _parse_ckpt_path(self) -> None:
        """LightningCLI would overwrite this run's model settings with the checkpoint's, silently
        dropping what the user passed at resume time (e.g. save_to); the recipe compares them instead."""

    def instantiate_trainer(self, **kwargs: Any) -> L.Trainer:
        callbacks = [self._get(self.config_init, c) for c in self._parser(self.subcommand).callback_keys]
        config = {**self._get(self.config_init, "trainer", default={}), **kwargs}
        given = config.get("callbacks") or []
        given = given if isinstance(given, list) else [given]
        if config.get("enable_progress_bar") is not False and not any(
            isinstance(c, ProgressBar) for c in given
        ):
            callbacks.append(StepProgress())
        if config.get("enable_checkpointing") is False:
            # `--trainer.enable_checkpointing false` turns off the config's checkpoint callbacks too
            config["callbacks"] = [c for c in given if not isinstance(c, ModelCheckpoint)]
        elif not any(isinstance(c, ModelCheckpoint) for c in given):
            # The on-policy streams never end an epoch: Lightning's default checkpoint would never save.
            callbacks.append(StepCheckpoint())
        trainer = self._instantiate_trainer(config, callbacks)
        for logger in trainer.loggers:  # TensorBoard in the run's own folder unless save_dir is given
            if isinstance(logger, TensorBoardLogger):
                logger.follow_run(config.get("default_root_dir"))
        return trainer

    def before_fit(self) -> None:
        override = bool(self._get(self.config, "override_checkpoint_settings", default=False))
        if hasattr(self.model, "override_checkpoint_settings"):
            self.model.override_checkpoint_settings = override
        ckpt_path = self._get(self.config, "ckpt_path")
        if hasattr(self.model, "resuming_from"):
            self.model.resuming_from = ckpt_path
        if ckpt_path is None:  # a new run: refuse another run's checkpoint folder before any compute
            for saver in self.trainer.checkpoint_callbacks:
                if isinstance(saver, StepCheckpoint):
                    saver.refuse_used_folder(self.trainer)
        if ckpt_path == "last":
            savers = self.trainer.checkpoint_callbacks
            if not any(cb._find_last_checkpoints(self.trainer) for cb in savers):
                folders = [str(getattr(cb, "dirpath", None)) for cb in savers]
                raise FileNotFoundError(
                    f"--ckpt_path last: no checkpoint in {folders or 'any checkpoint folder'} (checkpointing "
                    "off, or another --trainer.default_root_dir?); drop --ckpt_path to start anew"
                )


def cli_main(args: Sequence[str] | None = None, run: bool = True) -> UniRLCLI:
    """Run the CLI; `args` replaces sys.argv[1:] (tests), run=False only parses and instantiates.

    Parses in a copy of the current context: jsonargparse leaves its last parser, which holds the
    CLI and so its Trainer and model, in a context variable; in the copy it goes with the CLI, so a
    process that runs several recipes (a notebook, a sweep) frees each once it drops the CLI."""
    return contextvars.copy_context().run(
        UniRLCLI,
        L.LightningModule,
        L.LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        args=list(args) if args is not None else None,
        run=run,
        auto_configure_optimizers=False,
    )
