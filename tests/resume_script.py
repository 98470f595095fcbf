"""Run a recipe through the CLI, recording each optimiser step's logged metrics (exact-resume tests).

python tests/resume_script.py METRICS.json [--stop-at N] [--hang-in-save N MARKER] fit --config ...

`--hang-in-save N MARKER`: from the checkpoint of step N on, a save writes half its bytes to the file,
touches MARKER and hangs, so a test can kill the process in the middle of a save.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import lightning as L
import torch

#: logged values that depend on the clock, not on the run
CLOCK_KEYS = ("time/",)


class StepMetrics(L.Callback):
    """Appends {step: {metric: value}} to a JSON file at each optimiser step."""

    def __init__(self, path: str) -> None:
        self.path = Path(path)
        self.steps: dict[int, dict[str, float]] = {}
        self._seen: int | None = None

    def on_train_start(self, trainer, pl_module) -> None:
        self._seen = trainer.global_step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self._seen:
            return
        self._seen = trainer.global_step
        self.steps[trainer.global_step] = {
            k: float(v)
            for k, v in trainer.callback_metrics.items()
            if not k.startswith(CLOCK_KEYS) and not k.startswith("val")
        }
        self.path.write_text(json.dumps(self.steps, indent=1))


class StopAt(L.Callback):
    """Stops fit after optimiser step `step`, as a pre-empted job would stop (max_steps unchanged, so the
    LR schedule is the uninterrupted run's)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step >= self.step:
            trainer.should_stop = True


def hang_in_save(from_step: int, marker: str) -> None:
    """Make checkpoint writes of global step >= `from_step` stop half way (see the module doc)."""
    import io
    import time

    from lightning.fabric.plugins.io import torch_io

    plain = torch_io._atomic_save

    def half_then_hang(checkpoint: dict, filepath) -> None:
        if checkpoint.get("global_step", 0) < from_step:
            return plain(checkpoint, filepath)
        buffer = io.BytesIO()
        torch.save(checkpoint, buffer)
        with open(filepath, "wb") as f:
            f.write(buffer.getvalue()[: buffer.tell() // 2])
            f.flush()
        Path(marker).touch()
        time.sleep(600)

    torch_io._atomic_save = half_then_hang


def run(metrics_path: str, args: list[str], stop_at: int | None = None) -> None:
    from unirl_lightning.cli import cli_main

    torch.set_num_threads(2)  # as the test process: reductions split the same way
    here = StepMetrics.__module__
    args = args + [f"--trainer.callbacks+={here}.StepMetrics", f"--trainer.callbacks.path={metrics_path}"]
    if stop_at is not None:  # before the checkpoint callback, which then saves the stopped step
        args += [f"--trainer.callbacks+={here}.StopAt", f"--trainer.callbacks.step={stop_at}"]
    cli_main(args)


if __name__ == "__main__":
    rest = sys.argv[2:]
    stop = None
    if rest[:1] == ["--stop-at"]:
        stop, rest = int(rest[1]), rest[2:]
    if rest[:1] == ["--hang-in-save"]:
        hang_in_save(int(rest[1]), rest[2])
        rest = rest[3:]
    run(sys.argv[1], rest, stop)
