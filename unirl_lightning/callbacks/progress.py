"""Progress that reads right in a terminal and in a log file.

Lightning's bars count batches of an epoch; the recipes here run on an endless on-policy stream
bounded by `trainer.max_steps`, so those bars show "Epoch 0/-2" and a batch rate. This one counts
optimiser steps of `max_steps`, with the step rate, elapsed and remaining time, the latest values
the recipe logs to the progress bar (the reward, the loss) and the latest validation score. On a
terminal it redraws one line; with output sent to a file (a cluster job) it writes a line every
`log_every_s` seconds, so a log shows how far a run got.
"""

from __future__ import annotations

import math
import sys
import time
from typing import Any, TextIO

import lightning.pytorch as pl
from lightning.pytorch.callbacks import ProgressBar


def _clock(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def _value(v: Any) -> str:
    v = float(v)
    return f"{v:.4g}" if abs(v) >= 1e-3 or v == 0 else f"{v:.2e}"


class StepProgress(ProgressBar):
    """Optimiser steps done of `trainer.max_steps`, rate, elapsed / left, latest metrics.

    Args:
        name: what the line is about (e.g. "fit", "warm start").
        log_every_s: seconds between lines when the output is not a terminal.
        refresh_s: seconds between redraws on a terminal.
        stream: where to write (default: standard output).

    Validation ends with one line of the `val/.../overall` scores.
    """

    def __init__(self, name: str = "fit", log_every_s: float = 30.0, refresh_s: float = 0.5,
                 stream: TextIO | None = None) -> None:
        super().__init__()
        self.name, self.log_every_s, self.refresh_s = name, log_every_s, refresh_s
        self._stream = stream
        self._enabled = True
        self._start = self._last_write = 0.0
        self._start_step = 0
        self._val_start = 0.0
        self._val_line = ""
        self._open_line = False  # a terminal line redrawn in place, not yet ended
        self._written_step = -1

    @property
    def stream(self) -> TextIO:
        return self._stream or sys.stdout

    @property
    def is_terminal(self) -> bool:
        return bool(getattr(self.stream, "isatty", lambda: False)())

    def disable(self) -> None:
        self._enabled = False

    def enable(self) -> None:
        self._enabled = True

    @property
    def is_enabled(self) -> bool:
        return self._enabled and self.trainer.is_global_zero

    # ---- the line ----------------------------------------------------------------------------
    def line(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> str:
        """`name step done/total (pct) | rate | elapsed, left | metrics | last validation`."""
        done, total = trainer.global_step, trainer.max_steps
        elapsed = time.monotonic() - self._start
        rate = (done - self._start_step) / elapsed if elapsed > 0 else 0.0
        parts = [f"{self.name} step {done}/{total}" + (f" ({100 * done / total:.0f}%)" if total > 0 else "")
                 if total > 0 else f"{self.name} step {done}"]
        if rate > 0:
            parts.append(f"{rate:.2f} step/s" if rate >= 1 else f"{1 / rate:.2f} s/step")
        left = (total - done) / rate if rate > 0 and total > 0 else math.inf
        parts.append(f"elapsed {_clock(elapsed)}" + (f", left {_clock(left)}" if total > 0 else ""))
        metrics = {k: v for k, v in self.get_metrics(trainer, pl_module).items() if k != "v_num"}
        if metrics:
            parts.append(
                " ".join(f"{k} {_value(v) if not isinstance(v, str) else v}" for k, v in metrics.items())
            )
        if self._val_line:
            parts.append(self._val_line)
        return " | ".join(parts)

    def _write(self, text: str, redraw: bool) -> None:
        if redraw:  # terminal: overwrite the current line
            self.stream.write("\r\033[K" + text)
            self._open_line = True
        else:
            self.stream.write(("\n" if self._open_line else "") + (text + "\n" if text else ""))
            self._open_line = False
        self.stream.flush()
        self._last_write = time.monotonic()
        self._written_step = self.trainer.global_step

    # ---- hooks ---------------------------------------------------------------------------------
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._start = self._last_write = time.monotonic()
        self._start_step = trainer.global_step
        if self.is_enabled and not self.is_terminal:
            total = f" of {trainer.max_steps}" if trainer.max_steps > 0 else ""
            self._write(f"{self.name}: training from step {trainer.global_step}{total}", redraw=False)

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if not self.is_enabled:
            return
        since = time.monotonic() - self._last_write
        if self.is_terminal and since >= self.refresh_s:
            self._write(self.line(trainer, pl_module), redraw=True)
        elif not self.is_terminal and since >= self.log_every_s:
            self._write(self.line(trainer, pl_module), redraw=False)

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._val_start = time.monotonic()

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        scores = {
            k.removeprefix("val/").removesuffix("/overall"): v
            for k, v in trainer.callback_metrics.items()
            if k.startswith("val/") and k.endswith("/overall")
        }
        if not scores:
            return
        text = " ".join(f"{k} {_value(v)}" for k, v in scores.items())
        self._val_line = "val " + text
        if self.is_enabled:
            took = _clock(time.monotonic() - self._val_start)
            self._write(
                f"{self.name} validation at step {trainer.global_step}: {text} ({took})", redraw=False
            )

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self.is_enabled:
            return
        if self.is_terminal:  # the final state, then end the line
            self._write(self.line(trainer, pl_module), redraw=True)
            self._write("", redraw=False)
        elif self._written_step != trainer.global_step:
            self._write(self.line(trainer, pl_module), redraw=False)
