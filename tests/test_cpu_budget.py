"""CPUTimeBudget: stops fit at an optimiser-update boundary before the CPU budget is passed."""

from __future__ import annotations

import threading
import time
from typing import Any, Callable

import lightning.pytorch as pl
import pytest
import torch
from torch.utils.data import DataLoader

from unirl_lightning.callbacks import CPUTimeBudget
from unirl_lightning.callbacks.cpu_budget import process_cpu_seconds


class FakeClock:
    """CPU seconds that advance by `per_batch` each training batch (the module ticks it)."""

    def __init__(self, start: float = 0.0):
        self.now = start

    def __call__(self) -> float:
        return self.now


class Accumulating(pl.LightningModule):
    """Manual optimisation stepping every `rollouts_per_update` batches, as FlowGRPO does."""

    def __init__(self, clock: FakeClock, per_batch: float, rollouts_per_update: int):
        super().__init__()
        self.save_hyperparameters(ignore=["clock"])
        self.automatic_optimization = False
        self.clock, self.layer = clock, torch.nn.Linear(2, 1)
        self.updates = 0

    def training_step(self, batch, batch_idx):
        self.clock.now += self.hparams.per_batch
        self.manual_backward(self.layer(batch).square().mean())
        if (batch_idx + 1) % self.hparams.rollouts_per_update == 0:
            opt = self.optimizers()
            opt.step()
            opt.zero_grad()
            self.updates += 1

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)

    def train_dataloader(self):
        return DataLoader(torch.randn(1000, 2), batch_size=1)


def _fit(module, budget, max_steps=100):
    trainer = pl.Trainer(max_steps=max_steps, callbacks=[budget], logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, accelerator="cpu")
    trainer.fit(module)
    return trainer


@pytest.mark.parametrize("since,start", [("process", 3.0), ("fit", 50.0)])
def test_stops_at_an_update_boundary_before_the_budget(since, start):
    clock = FakeClock(start)
    module = Accumulating(clock, per_batch=2.0, rollouts_per_update=4)  # 8 CPU s per update
    budget = CPUTimeBudget(minutes=1.0, since=since, reserve_minutes=0.05)  # 60 s, 3 reserved
    budget.clock = clock
    _fit(module, budget)
    origin = 0.0 if since == "process" else start
    used = clock.now - origin
    # updates cost 8 s; the loop keeps going while used + 8 <= 57
    assert budget.stopped_at is not None and (budget.stopped_at + 1) % 4 == 0
    assert used + 8 > 57 and used <= 57
    assert module.updates == (budget.stopped_at + 1) // 4


def test_never_stops_a_run_inside_its_budget():
    clock = FakeClock()
    module = Accumulating(clock, per_batch=0.1, rollouts_per_update=1)
    budget = CPUTimeBudget(minutes=10.0)
    budget.clock = clock
    trainer = _fit(module, budget, max_steps=20)
    assert budget.stopped_at is None and trainer.global_step == 20 and module.updates == 20


def _burn(seconds: float, clock: Callable[[], float] = time.thread_time) -> None:
    """Matrix products until `clock` (this thread's CPU time by default) has advanced `seconds`."""
    a, end = torch.randn(128, 128), clock() + seconds
    while clock() < end:
        a = torch.tanh(a @ a)


def test_real_clock_counts_this_process():
    a = process_cpu_seconds()
    torch.randn(300, 300) @ torch.randn(300, 300)
    assert process_cpu_seconds() >= a > 0
    # it agrees with the kernel's per-process CPU clock
    a, b = process_cpu_seconds(), time.process_time()
    _burn(0.3, time.process_time)
    assert abs((process_cpu_seconds() - a) - (time.process_time() - b)) < 0.02
    # and counts every thread: a worker's CPU time while this thread sleeps
    worker = threading.Thread(target=_burn, args=(0.3,))
    a = process_cpu_seconds()
    worker.start()
    worker.join()
    assert process_cpu_seconds() - a >= 0.3


class Burner(pl.LightningModule):
    """Automatic optimisation; each training step burns `seconds` of CPU on one thread."""

    def __init__(self, seconds: float) -> None:
        super().__init__()
        self.seconds, self.layer = seconds, torch.nn.Linear(2, 1)

    def training_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
        _burn(self.seconds)
        return self.layer(batch).square().mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)

    def train_dataloader(self):
        return DataLoader(torch.randn(100_000, 2), batch_size=1)


class CPUReadings(pl.Callback):
    """At each batch end (after the budget's): the logged `time/cpu_min` and the process's CPU seconds."""

    def __init__(self) -> None:
        self.start, self.logged, self.cpu = 0.0, [], []

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.start = process_cpu_seconds()

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        self.logged.append(float(trainer.callback_metrics["time/cpu_min"]))
        self.cpu.append(process_cpu_seconds() - self.start)


def test_real_clock_stops_a_real_run_at_its_budget():
    """The process's own CPU clock: `time/cpu_min` grows with every update and is what getrusage
    reports; the run ends at the last update that fits the budget, near it."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        budget, readings = CPUTimeBudget(minutes=0.025, since="fit", reserve_minutes=0.0), CPUReadings()
        quiet = dict(enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                     accelerator="cpu")
        trainer = pl.Trainer(max_steps=10_000, callbacks=[budget, readings], logger=False, **quiet)
        trainer.fit(Burner(seconds=0.05))
    finally:
        torch.set_num_threads(threads)
    limit = 0.025 * 60
    used = [60 * m for m in readings.logged]
    assert budget.stopped_at is not None  # the budget ended the run, not max_steps
    assert trainer.global_step == budget.stopped_at + 1 == len(used) < 10_000
    assert all(b > a for a, b in zip(used, used[1:]))  # it grows with every update
    assert max(abs(u - c) for u, c in zip(used, readings.cpu)) < 0.02  # getrusage, read a moment later
    costs = sorted(b - a for a, b in zip(used, used[1:]))
    cost = costs[len(costs) // 2]
    assert 0.04 < cost < 0.2  # about the 0.05 s burnt per update, plus the loop's own work
    # stopped because the next update would pass: within two updates of the limit, and past it by
    # no more than an update's jitter (the estimate is the mean cost; one update may run longer)
    assert limit - 2 * cost < used[-1] <= limit + 0.5 * cost


@pytest.mark.parametrize("kwargs,match", [
    (dict(minutes=0), "minutes must be > 0"),
    (dict(minutes=1, since="wall"), "since must be"),
    (dict(minutes=1, reserve_minutes=1), "reserve_minutes"),
])
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        CPUTimeBudget(**kwargs)


def test_a_resumed_run_counts_the_time_its_checkpoint_spent():
    clock = FakeClock(0.0)
    first = CPUTimeBudget(minutes=1.0, since="process", reserve_minutes=0.05)
    first.clock = clock
    _fit(Accumulating(clock, per_batch=2.0, rollouts_per_update=4), first, max_steps=3)
    spent = first.state_dict()
    assert spent["used_seconds"] == pytest.approx(24.0) and len(spent["update_costs"]) == 3

    clock2 = FakeClock(5.0)  # the new process's start-up
    resumed = CPUTimeBudget(minutes=1.0, since="process", reserve_minutes=0.05)
    resumed.clock = clock2
    resumed.load_state_dict(spent)
    module = Accumulating(clock2, per_batch=2.0, rollouts_per_update=4)
    _fit(module, resumed)
    # 24 s carried + 5 s start-up: updates of 8 s continue while used + 8 <= 57
    assert resumed.used_seconds() == pytest.approx(29.0 + 8 * module.updates)
    assert resumed.used_seconds() + 8 > 57 >= resumed.used_seconds()


class Saving(Accumulating):
    """`Accumulating` with the recipes' `save_policies` (writes its weights and the clock)."""

    def save_policies(self, path):
        path.mkdir(parents=True)
        torch.save({"weight": self.layer.weight.detach().clone(), "clock": self.clock.now}, path / "w.pt")


def test_snapshots_every_cpu_minutes_at_update_boundaries(tmp_path):
    import json

    from unirl_lightning.callbacks import PolicySnapshots

    clock = FakeClock()
    module = Saving(clock, per_batch=10.0, rollouts_per_update=4)  # 40 CPU s per update
    budget = CPUTimeBudget(minutes=10.0, reserve_minutes=0.0)
    budget.clock = clock
    snaps = PolicySnapshots(dirpath=str(tmp_path / "snaps"), every_cpu_minutes=1.5)
    trainer = pl.Trainer(max_steps=11, callbacks=[budget, snaps], logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, accelerator="cpu")
    trainer.fit(module)
    index = json.loads((tmp_path / "snaps" / "index.json").read_text())
    # boundaries every 40 s: the first at or past each 90 s mark is 120, 200, 280, 360; fit ends at 440
    minutes = [e["cpu_minutes"] for e in index]
    assert [round(m * 60) for m in minutes] == [120, 200, 280, 360, 440]
    for e in index:
        saved = torch.load(tmp_path / "snaps" / e["folder"] / "w.pt")
        assert abs(saved["clock"] / 60 - e["cpu_minutes"]) < 1e-3  # saved at that moment
        assert e["rollouts"] == 4 * e["step"] and e["step"] == saved["clock"] / 40
    # one per mark: no two snapshots inside one 1.5-minute window (the end's aside)
    assert len({int(m // 1.5) for m in minutes[:-1]}) == len(minutes) - 1
    # a new run refuses the folder
    again = PolicySnapshots(dirpath=str(tmp_path / "snaps"), every_cpu_minutes=1.5)
    with pytest.raises(FileExistsError, match="overwrite"):
        pl.Trainer(max_steps=1, callbacks=[again], logger=False, enable_checkpointing=False,
                   enable_progress_bar=False, enable_model_summary=False).fit(Saving(FakeClock(), 1.0, 1))
