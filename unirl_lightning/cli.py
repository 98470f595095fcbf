"""The command line: LightningCLI in subclass mode for the recipe (model) and the data."""

from __future__ import annotations

from typing import Sequence

import lightning as L
from lightning.pytorch.cli import LightningCLI


class UniRLCLI(LightningCLI):
    """LightningCLI with the library's defaults (TensorBoard logging, recipe and data by class_path)."""

    def add_arguments_to_parser(self, parser) -> None:
        parser.set_defaults({"trainer.logger": {"class_path": "lightning.pytorch.loggers.TensorBoardLogger",
                                                "init_args": {"save_dir": "runs"}}})


def cli_main(args: Sequence[str] | None = None, run: bool = True) -> UniRLCLI:
    """Run the CLI; `args` replaces sys.argv[1:] (tests), run=False only parses and instantiates."""
    return UniRLCLI(
        L.LightningModule,
        L.LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        args=list(args) if args is not None else None,
        run=run,
        auto_configure_optimizers=False,
    )
