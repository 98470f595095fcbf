"""CPUTimeBudget: stops fit at an optimiser-update boundary before the CPU budget is passed."""

from __future__ import annotations

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


def test_real_clock_counts_this_process():
    a = process_cpu_seconds()
    torch.randn(300, 300) @ torch.randn(300, 300)
    assert process_cpu_seconds() >= a > 0


@pytest.mark.parametrize("kwargs,match", [
    (dict(minutes=0), "minutes must be > 0"),
    (dict(minutes=1, since="wall"), "since must be"),
    (dict(minutes=1, reserve_minutes=1), "reserve_minutes"),
])
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        CPUTimeBudget(**kwargs)
