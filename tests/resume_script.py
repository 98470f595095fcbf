"""Run a recipe through the CLI, recording each optimiser step's logged metrics (exact-resume tests).

python tests/resume_script.py METRICS.json [--stop-at N] fit --config ... [--ckpt_path last]
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
    run(sys.argv[1], rest, stop)
