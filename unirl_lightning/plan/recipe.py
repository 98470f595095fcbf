"""Read a recipe config with the project's own CLI parser (field names and types checked as `fit`
does) without building anything: no model, no weights."""

from __future__ import annotations

import contextlib
import io
from pathlib import Path
from typing import Any

from unirl_lightning.plan.arch import PlanError


def parse_recipe(config: str | Path, overrides: list[str] | None = None) -> Any:
    """The parsed config (a jsonargparse Namespace: trainer, model, data) of `config`; `overrides` are
    extra CLI arguments (`--model.init_args.micro_batch_size=1`)."""
    import lightning as L

    from unirl_lightning.cli import UniRLCLI

    if not Path(config).is_file():
        raise PlanError(
            f"--config: no file {str(config)!r}; pass a recipe config such as configs/janus_pro_7b_grpo.yaml"
        )

    class _ParseOnly(UniRLCLI):
        def instantiate_classes(self) -> None:  # the plan needs the settings, never the objects
            pass

    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            cli = _ParseOnly(
                L.LightningModule,
                L.LightningDataModule,
                subclass_mode_model=True,
                subclass_mode_data=True,
                args=["--config", str(config), *(overrides or [])],
                run=False,
                auto_configure_optimizers=False,
                seed_everything_default=False,
            )
    except SystemExit:
        text = err.getvalue()
        reason = text[text.find("error:") :].strip() if "error:" in text else text.strip()
        raise PlanError(f"{config}: the CLI refused it: {reason}") from None
    return cli.config


def get(ns: Any, dotted: str, default: Any = None) -> Any:
    """`ns.a.b.c` for "a.b.c", or `default` where a key is missing or None."""
    cur = ns
    for key in dotted.split("."):
        if cur is None:
            return default
        cur = cur.get(key) if hasattr(cur, "get") else getattr(cur, key, None)
    return default if cur is None else cur
