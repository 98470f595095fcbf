"""Keep the trained policy when a run raises: the last completed update goes to `save_to`.

A crash after hours of RL (a reward model's error, a NaN in a rare batch, a bug in a user's
reward) would otherwise lose every update since the last checkpoint. Recipes add this callback
themselves (`RecipeModule.configure_callbacks`) when `save_to` is set.
"""

from __future__ import annotations

import json
import traceback
from pathlib import Path

import lightning.pytorch as pl
from lightning.pytorch.utilities import rank_zero_warn


#: the file beside an interrupted run's saved policy; resuming that run may write over the folder
STATE_FILE = "training_state.json"


def interrupted_run_state(folder: str | Path) -> dict | None:
    """The `training_state.json` of an interrupted run's export in `folder`, or None when the folder
    holds anything else (a finished export, a user's files, nothing)."""
    path = Path(folder) / STATE_FILE
    try:
        state = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return state if isinstance(state, dict) and state.get("finished") is False else None


class SaveOnException(pl.Callback):
    """On an exception during fit, `pl_module.save_policies(save_to)` and a `training_state.json`
    beside it saying the run did not finish (step, exception, traceback's last line).

    The weights saved are those of the last completed optimiser update: gradients of an update
    in progress are never applied. Nothing is written before the first update, nor under
    sharded (FSDP) training, whose full weights need every rank to join a gather that a
    crashed rank cannot join (resume from the last step checkpoint there: `--ckpt_path last`).
    """

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        state = getattr(pl_module, "_save_to_interrupted", None)
        if state is not None and not trainer.ckpt_path:  # before the first rollout
            raise FileExistsError(
                f"model.save_to: {pl_module.hparams.save_to} holds the policy of an interrupted run "
                f"(step {state.get('global_step')}, {STATE_FILE}); resume that run (--ckpt_path last, "
                "or its checkpoint), pick another folder, or set overwrite: true"
            )

    def on_exception(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException
    ) -> None:
        save_to = getattr(pl_module.hparams, "save_to", None)
        if not save_to or trainer.global_step == 0 or not hasattr(pl_module, "save_policies"):
            return
        if (
            any(getattr(m, "_fsdp_sharded", False) for m in pl_module.sharded_modules())
            and trainer.world_size > 1
        ):
            rank_zero_warn(
                f"the run raised {type(exception).__name__}; sharded weights cannot be gathered from a "
                f"crashed run, so nothing was saved to {save_to}; resume from the last step checkpoint "
                "(--ckpt_path last)"
            )
            return
        if not trainer.is_global_zero:
            return
        try:
            pl_module.save_policies(save_to)
        except Exception as error:  # the original exception matters more: report and let it propagate
            rank_zero_warn(f"saving the policy to {save_to} after the run raised failed too: {error!r}")
            return
        state = {
            "finished": False,
            "global_step": trainer.global_step,
            "exception": repr(exception),
            "where": traceback.format_exception(exception)[-2].strip() if exception.__traceback__ else "",
        }
        (Path(save_to) / STATE_FILE).write_text(json.dumps(state, indent=2) + "\n")
        rank_zero_warn(
            f"the run raised {type(exception).__name__} after {trainer.global_step} optimiser steps; "
            f"the policy of the last completed update is saved to {save_to}"
        )
