"""Soak: resident memory, open files and TensorBoard writers over long runs of the two default recipes.

    python benchmarks/soak.py                          # 1000 discrete GRPO steps, then 300 FlowGRPO updates
    python benchmarks/soak.py --steps 60 --updates 20  # a short run

In one process, one after the other: `configs/grpo.yaml` (DiscreteGRPO, TinyUnifiedModel) and
`configs/flow_grpo.yaml` (FlowGRPO, TinyFlowModel), each built by the CLI from its config with
small batches and `warm_start: null` (random weights, nothing trained or downloaded first), each
through its own Trainer with the TensorBoard logger logging every step and validation (2 batches)
every `--grpo-val-every` steps / `--flow-val-every` updates. A callback samples, every `--every`
optimiser steps and after a garbage collection: resident memory (RSS), open file descriptors,
open TensorBoard event writers, live `SummaryWriter` objects and their writer threads. After each
fit the script checks that the Trainer's event writer and its thread are closed, then drops the
Trainer and checks that no `SummaryWriter` is left alive.

Prints the samples, then a table; exits 1 if a target is missed: RSS growth from the baseline step
(`--baseline`, 100) to the end under `--max-growth` percent (5), no more open files at the end of
training than at the baseline step nor after fit than before it, one event writer and thread open
during a fit, none after it, and no `SummaryWriter` alive once the Trainer is dropped.
"""

from __future__ import annotations

import argparse
import gc
import os
import resource
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import lightning as L
import torch

from unirl_lightning.cli import cli_main

ROOT = Path(__file__).resolve().parents[1]

PAGE_MIB = os.sysconf("SC_PAGE_SIZE") / 2**20


# ---- what is sampled ----------------------------------------------------------------------------
def rss_mib() -> float:
    """Resident set size of this process in MiB (/proc/self/statm)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * PAGE_MIB


def peak_rss_mib() -> float:
    """The process's peak resident set size so far in MiB (getrusage; Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def open_files() -> list[str]:
    """Targets of this process's open file descriptors (/proc/self/fd)."""
    out = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            out.append(os.readlink(f"/proc/self/fd/{fd}"))
        except OSError:  # the descriptor listdir itself used, closed by now
            pass
    return out


def tensorboard_state() -> dict[str, int]:
    """Live TensorBoard writer objects (a scan of the garbage collector's objects) and threads.

    summary_writers: `SummaryWriter` objects alive (a closed one lives as long as its logger);
    open_writers: event-file writers not yet closed; writer_threads: their background threads alive.
    """
    from tensorboard.summary.writer.event_file_writer import _AsyncWriter, _AsyncWriterThread
    from torch.utils.tensorboard import SummaryWriter

    summary_writers = open_writers = 0
    for obj in gc.get_objects():
        kind = type(obj)  # not isinstance: that reads __class__, which some lazy objects warn about
        if issubclass(kind, SummaryWriter):
            summary_writers += 1
        elif issubclass(kind, _AsyncWriter) and not obj._closed:
            open_writers += 1
    threads = sum(isinstance(t, _AsyncWriterThread) and t.is_alive() for t in threading.enumerate())
    return {"summary_writers": summary_writers, "open_writers": open_writers, "writer_threads": threads}


@dataclass
class Sample:
    """One measurement of the process."""

    step: int
    rss_mib: float
    fds: int
    event_fds: int  # descriptors open on TensorBoard event files
    summary_writers: int
    open_writers: int
    writer_threads: int
    threads: int

    def line(self, label: str) -> str:
        return (
            f"{label} step {self.step}: rss {self.rss_mib:.1f} MiB, fds {self.fds} ({self.event_fds} event "
            f"files), writers {self.open_writers} open / {self.summary_writers} alive, writer threads "
            f"{self.writer_threads}, threads {self.threads}"
        )


def sample(step: int) -> Sample:
    """Measure the process now, after a garbage collection."""
    gc.collect()
    files = open_files()
    return Sample(
        step=step,
        rss_mib=rss_mib(),
        fds=len(files),
        event_fds=sum("tfevents" in f for f in files),
        threads=threading.active_count(),
        **tensorboard_state(),
    )


class SoakMonitor(L.Callback):
    """Samples the process at the start of training, every `every` optimiser steps, at the
    `baseline` step and at the end of training, and prints each sample."""

    def __init__(self, label: str, every: int, baseline: int) -> None:
        self.label, self.every, self.baseline = label, every, baseline
        self.samples: list[Sample] = []

    def _take(self, step: int) -> None:
        if self.samples and self.samples[-1].step == step:
            return
        self.samples.append(sample(step))
        print(self.samples[-1].line(self.label), flush=True)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._take(trainer.global_step)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args) -> None:
        step = trainer.global_step
        if step % self.every == 0 or step == self.baseline:
            self._take(step)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._take(trainer.global_step)



# ---- the two recipes ----------------------------------------------------------------------------
def _common(log_dir: str, name: str, steps: int, val_every: int) -> list[str]:
    return [
        "--model.init_args.warm_start", "null",
        "--trainer.max_steps", str(steps),
        "--trainer.val_check_interval", str(val_every),
        "--trainer.limit_val_batches", "2",
        "--trainer.log_every_n_steps", "1",
        "--trainer.logger.init_args.save_dir", log_dir,
        "--trainer.logger.init_args.name", name,
        # the config's step checkpoints, soaked too, into a fresh folder each run
        "--trainer.default_root_dir", tempfile.mkdtemp(prefix=f"soak_{name}_"),
    ]  # fmt: skip


def grpo_args(steps: int, val_every: int, log_dir: str) -> list[str]:
    """configs/grpo.yaml at a small batch: 4 prompts x 4 images a step, 2 x 16 validation prompts."""
    return ["--config", str(ROOT / "configs/grpo.yaml"), *_common(log_dir, "grpo", steps, val_every),
            "--data.init_args.prompts_per_step", "4",
            "--data.init_args.group_size", "4",
            "--data.init_args.val_batch_size", "16"]  # fmt: skip


def flow_args(updates: int, val_every: int, log_dir: str) -> list[str]:
    """configs/flow_grpo.yaml at a small batch: 2 prompts x 4 images a rollout, the config's 4 rollouts
    an update, 2 x 8 validation prompts (x 4 images each). `val_every` counts updates; the Trainer's
    val_check_interval counts rollouts."""
    rollouts = 4
    return ["--config", str(ROOT / "configs/flow_grpo.yaml"),
            *_common(log_dir, "flow_grpo", updates, val_every * rollouts),
            "--model.init_args.rollouts_per_update", str(rollouts),
            "--data.init_args.prompts_per_step", "2",
            "--data.init_args.group_size", "4",
            "--data.init_args.val_batch_size", "8"]  # fmt: skip


@dataclass
class RecipeResult:
    """What one recipe's soak measured."""

    name: str
    steps: int
    baseline: int
    samples: list[Sample]  # during training (the monitor's)
    before: Sample  # before the CLI built the recipe
    after_fit: Sample  # after fit returned (the logger finalised)
    released: Sample  # after the Trainer, module and data were dropped
    log_dir: str
    seconds: float
    failures: list[str] = field(default_factory=list)

    @property
    def growth(self) -> float:
        """RSS growth from the baseline step to the end of training, in percent."""
        base, end = self.at(self.baseline), self.samples[-1]
        return 100.0 * (end.rss_mib - base.rss_mib) / base.rss_mib

    def at(self, step: int) -> Sample:
        """The sample taken at `step` of training."""
        return next(s for s in self.samples if s.step == step)


def run_recipe(name: str, args: list[str], steps: int, every: int, baseline: int) -> RecipeResult:
    """Build the recipe with the CLI, fit it with a `SoakMonitor`, then check that its writer closed."""
    before = sample(0)
    argv, sys.argv = sys.argv, sys.argv[:1]  # this script's options are not the CLI's
    try:
        cli = cli_main(args, run=False)
    finally:
        sys.argv = argv
    monitor = SoakMonitor(name, every, baseline)
    cli.trainer.callbacks.append(monitor)
    log_dir = cli.trainer.logger.log_dir
    t0 = time.monotonic()
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    seconds = time.monotonic() - t0
    end_step = cli.trainer.global_step
    after_fit = sample(end_step)
    print(after_fit.line(f"{name} after fit"), flush=True)
    samples = monitor.samples
    # the Trainer, its logger and writer, the module and the data; Lightning gives every callback
    # the module's bound `log` methods, so the monitor goes too
    del cli, monitor
    released = sample(end_step)
    print(released.line(f"{name} released"), flush=True)
    return RecipeResult(name, end_step, baseline, samples, before, after_fit, released, log_dir, seconds)


def check(r: RecipeResult, max_growth: float) -> list[str]:
    """The targets `r` misses, as sentences."""
    base, end, during = r.at(r.baseline), r.samples[-1], r.samples
    failures = []
    if r.growth >= max_growth:
        failures.append(f"RSS grew {r.growth:.1f}% after step {r.baseline} (target < {max_growth}%)")
    if end.fds > base.fds:
        failures.append(f"open files grew from {base.fds} at step {r.baseline} to {end.fds} at the end")
    if any(s.open_writers != 1 or s.writer_threads != 1 for s in during):
        failures.append("not exactly one open event writer and writer thread during fit")
    if r.after_fit.open_writers or r.after_fit.writer_threads or r.after_fit.event_fds:
        failures.append("the event writer, its thread or its file is still open after fit")
    if r.after_fit.fds > r.before.fds:
        failures.append(f"{r.after_fit.fds - r.before.fds} more open files after fit than before it")
    if r.released.summary_writers:
        failures.append(f"{r.released.summary_writers} SummaryWriter(s) alive after the Trainer was dropped")
    return failures


def table(results: list[RecipeResult], max_growth: float) -> str:
    """The results as a markdown table, one column per recipe."""

    def row(label: str, fn: Callable[[RecipeResult], str], target: str = "") -> str:
        return f"| {label} | " + " | ".join(fn(r) for r in results) + f" | {target} |"

    def trio(attr: str) -> Callable[[RecipeResult], str]:
        return lambda r: "{} / {} / {}".format(
            getattr(r.samples[0], attr), getattr(r.samples[-1], attr), getattr(r.after_fit, attr)
        )

    lines = [
        "| | " + " | ".join(r.name for r in results) + " | target |",
        "|---|" + "---:|" * len(results) + "---|",
        row("optimiser steps", lambda r: str(r.steps)),
        row("wall time", lambda r: f"{r.seconds / 60:.1f} min"),
        row("RSS before the recipe (MiB)", lambda r: f"{r.before.rss_mib:.1f}"),
        row("RSS at training start (MiB)", lambda r: f"{r.samples[0].rss_mib:.1f}"),
        row("RSS at the baseline (MiB)", lambda r: f"{r.at(r.baseline).rss_mib:.1f} (step {r.baseline})"),
        row("RSS at the end (MiB)", lambda r: f"{r.samples[-1].rss_mib:.1f}"),
        row("RSS growth after the baseline step", lambda r: f"{r.growth:+.2f}%", f"< {max_growth:g}%"),
        row("RSS after the Trainer was dropped (MiB)", lambda r: f"{r.released.rss_mib:.1f}"),
        row("open fds: before / start / baseline / end / after fit", lambda r: (
            f"{r.before.fds} / {r.samples[0].fds} / {r.at(r.baseline).fds} / "
            f"{r.samples[-1].fds} / {r.after_fit.fds}"), "end <= baseline; after fit <= before"),
        row("event-file fds: start / end / after fit", trio("event_fds"), "0 after fit"),
        row("open event writers: start / end / after fit", trio("open_writers"), "1 / 1 / 0"),
        row("writer threads: start / end / after fit", trio("writer_threads"), "1 / 1 / 0"),
        row("threads: start / end / after fit", trio("threads")),
        row("SummaryWriters alive after the Trainer was dropped", lambda r: str(r.released.summary_writers),
            "0"),
    ]  # fmt: skip
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=1000, help="discrete GRPO optimiser steps (0 skips it)")
    ap.add_argument("--updates", type=int, default=300, help="FlowGRPO updates (0 skips it)")
    ap.add_argument("--every", type=int, default=50, help="optimiser steps between samples")
    ap.add_argument("--baseline", type=int, default=100,
                    help="the step growth is measured from (at most half of each run)")
    ap.add_argument("--grpo-val-every", type=int, default=50, help="discrete GRPO steps between validations")
    ap.add_argument("--flow-val-every", type=int, default=25, help="FlowGRPO updates between validations")
    ap.add_argument("--max-growth", type=float, default=5.0, help="RSS growth target, percent")
    ap.add_argument("--log-dir", default="runs/soak", help="where the TensorBoard logs go")
    ap.add_argument("--threads", type=int, default=1, help="torch threads")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    python = sys.version.split()[0]
    print(f"torch {torch.__version__}, lightning {L.__version__}, python {python}", flush=True)

    runs = [
        ("discrete GRPO", grpo_args(args.steps, args.grpo_val_every, args.log_dir), args.steps),
        ("FlowGRPO", flow_args(args.updates, args.flow_val_every, args.log_dir), args.updates),
    ]
    results = []
    for name, cli_args, steps in runs:
        if steps <= 0:
            continue
        baseline = min(args.baseline, steps // 2)
        every = min(args.every, max(1, baseline))
        results.append(run_recipe(name, cli_args, steps, every, baseline))
    if not results:
        ap.error("nothing to run: --steps and --updates are both 0")
    for r in results:
        r.failures = check(r, args.max_growth)
    print()
    print(table(results, args.max_growth))
    print(f"\npeak RSS of the process: {peak_rss_mib():.1f} MiB")
    print("logs:", ", ".join(r.log_dir for r in results))
    failures = [f"{r.name}: {f}" for r in results for f in r.failures]
    for f in failures:
        print("MISSED:", f)
    if failures:
        sys.exit(1)
    print("all targets met")


if __name__ == "__main__":
    main()
