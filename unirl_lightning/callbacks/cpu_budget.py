"""Stop fit at a CPU-time budget: "within 20 CPU minutes" measured as `time` measures it.

Lightning's `Trainer(max_time=...)` counts wall-clock time, which on a shared or throttled machine
is not the compute a run spent. This callback reads the process's own CPU time (user + system, all
threads: `resource.getrusage(RUSAGE_SELF)`) and ends training before the next optimiser update
would cross the budget, so the run's last update is complete and `save_to` still writes it.
"""

from __future__ import annotations

import resource
from typing import Any, Callable, Literal

import lightning.pytorch as pl
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn


def batches_per_update(pl_module: pl.LightningModule) -> int:
    """Training batches per optimiser update: the module's `rollouts_per_update`, else 1."""
    hparams = getattr(pl_module, "hparams", {}) or {}
    return max(1, int(hparams.get("rollouts_per_update", 1) or 1))


def process_cpu_seconds() -> float:
    """User + system CPU seconds of this process so far, every thread included."""
    use = resource.getrusage(resource.RUSAGE_SELF)
    return use.ru_utime + use.ru_stime


class CPUTimeBudget(pl.Callback):
    """End `fit` once the next optimiser update would take the process past `minutes` of CPU time.

    Updates are checked at their boundaries: every `rollouts_per_update` training batches when the
    module has that hyper-parameter (FlowGRPO, UniGRPO), else every batch. The next update's cost is
    estimated as the mean of the updates so far; `reserve_minutes` is kept for what follows the
    loop (saving, teardown).

    Args:
        minutes: the CPU budget.
        since: "process" counts from the start of the process (what `time python main.py fit ...`
            reports, imports, warm-start loading and validation included); "fit" from the start of
            the training loop (a warm start trained in the same process then does not count).
        reserve_minutes: CPU time kept back for the end of the run.

    Logs `time/cpu_min`, the CPU minutes used so far (by the chosen count), at each update.
    Dataloader worker processes are not counted (the on-policy DataModules use none). Checkpoints
    carry the time spent, so a resumed run adds its own process's time to its checkpoint's.
    """

    #: CPU seconds so far (a test replaces it with a fake clock)
    clock: Callable[[], float] = staticmethod(process_cpu_seconds)

    def __init__(
        self, minutes: float, since: Literal["process", "fit"] = "process", reserve_minutes: float = 0.1
    ) -> None:
        if minutes <= 0:
            raise ValueError(f"CPUTimeBudget: minutes must be > 0, got {minutes}")
        if since not in ("process", "fit"):
            raise ValueError(f"CPUTimeBudget: since must be 'process' or 'fit', got {since!r}")
        if not 0 <= reserve_minutes < minutes:
            raise ValueError(f"CPUTimeBudget: reserve_minutes must be in [0, minutes), got {reserve_minutes}")
        self.minutes, self.since, self.reserve_minutes = minutes, since, reserve_minutes
        self._origin = 0.0
        self._last = 0.0  # clock at the last update boundary
        self._update_costs: list[float] = []
        self._carried = 0.0  # CPU seconds of the processes before this one (a resumed run)
        self.stopped_at: int | None = None  # the training batch index after which fit was stopped

    def used_seconds(self) -> float:
        return self._carried + self.clock() - self._origin

    def state_dict(self) -> dict[str, Any]:
        return {"used_seconds": self.used_seconds(), "update_costs": list(self._update_costs)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._carried = float(state_dict["used_seconds"])
        self._update_costs = list(state_dict["update_costs"])

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._origin = self.clock() if self.since == "fit" else 0.0
        self._last = self.clock()
        if not self._carried:
            self._update_costs.clear()
        self.stopped_at = None
        used = (self.used_seconds() - self._carried) / 60
        if used >= 0.5 * self.minutes:
            rank_zero_warn(
                f"CPUTimeBudget: {used:.1f} of {self.minutes} CPU minutes were spent before training "
                "started (a warm start trained in this process?); set since: fit to count training only"
            )

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if (batch_idx + 1) % batches_per_update(pl_module) != 0:
            return
        now = self.clock()
        self._update_costs.append(now - self._last)
        self._last = now
        used = self._carried + now - self._origin
        pl_module.log("time/cpu_min", used / 60, batch_size=1)
        # the first update also pays for warm-up (allocations, caches): estimate from later ones
        costs = self._update_costs[1:] or self._update_costs
        next_cost = sum(costs) / len(costs)
        over = used + next_cost > (self.minutes - self.reserve_minutes) * 60
        # ranks' clocks differ: stop all of them when any would pass (collectives must match)
        if trainer.strategy.reduce_boolean_decision(over, all=False):
            self.stopped_at = batch_idx
            trainer.should_stop = True
            rank_zero_info(
                f"CPUTimeBudget: stopping after training batch {batch_idx + 1}: {used / 60:.2f} CPU "
                f"minutes used, the next update (~{next_cost:.0f} s) would pass {self.minutes}"
            )
