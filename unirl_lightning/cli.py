"""The command line: LightningCLI in subclass mode for the recipe (model) and the data."""

from __future__ import annotations

import contextvars
from typing import Any, Sequence

import lightning as L
from lightning.pytorch.callbacks import ProgressBar
from lightning.pytorch.cli import LightningCLI

from unirl_lightning.callbacks.progress import StepProgress


class UniRLCLI(LightningCLI):
    """LightningCLI with the library's defaults: TensorBoard logging, recipe and data by class_path,
    and `StepProgress` as the progress display (steps of max_steps, in a terminal and in a log)
    unless the config names a progress bar of its own or turns it off."""

    def add_arguments_to_parser(self, parser) -> None:
        parser.set_defaults({"trainer.logger": {"class_path": "lightning.pytorch.loggers.TensorBoardLogger",
                                                "init_args": {"save_dir": "runs"}}})

    def instantiate_trainer(self, **kwargs: Any) -> L.Trainer:
        callbacks = [self._get(self.config_init, c) for c in self._parser(self.subcommand).callback_keys]
        config = {**self._get(self.config_init, "trainer", default={}), **kwargs}
        given = config.get("callbacks") or []
        given = given if isinstance(given, list) else [given]
        if config.get("enable_progress_bar") is not False and not any(
            isinstance(c, ProgressBar) for c in given
        ):
            callbacks.append(StepProgress())
        return self._instantiate_trainer(config, callbacks)


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
