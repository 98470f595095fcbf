"""GenEval accuracy and the UniRL imbalance metric as torchmetrics Metrics.

Every state is a fixed-size count tensor reduced with `sum`, so the metrics give the same
result under DDP / FSDP as on one process holding all the data.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import Tensor
from torchmetrics import Metric
from torchmetrics.utilities.imports import _MATPLOTLIB_AVAILABLE

from unirl_lightning.evaluation.vocab import TASKS

#: GenEval's official prompt count, the default size of the per-prompt count tensors.
GENEVAL_NUM_PROMPTS = 553


def _task_index(tasks: Sequence[str], known: Sequence[str], device: torch.device) -> Tensor:
    """Task names -> long `[N]` indices into `known` (ValueError on an unknown task)."""
    lookup = {t: i for i, t in enumerate(known)}
    unknown = sorted({t for t in tasks if t not in lookup})
    if unknown:
        raise ValueError(
            f"unknown task(s) {unknown}; this metric counts {tuple(known)} (pass tasks=... to extend)"
        )
    return torch.tensor([lookup[t] for t in tasks], dtype=torch.long, device=device)


def _flags(x: Tensor | Sequence[bool], n: int, name: str, device: torch.device) -> Tensor:
    """A bool `[N]` tensor from a tensor or list, checked against the number of tasks."""
    x = torch.as_tensor(x, device=device).reshape(-1)
    if x.numel() != n:
        raise ValueError(f"{name} has {x.numel()} entries but tasks has {n}; pass one flag per image")
    return x.bool()


def _plot(metric: Metric, val: Any, ax: Any) -> Any:
    if not _MATPLOTLIB_AVAILABLE:
        raise ModuleNotFoundError(f"{type(metric).__name__}.plot needs matplotlib: pip install matplotlib")
    return metric._plot(val, ax)


class GenEvalScore(Metric):
    """GenEval image accuracy per task, their unweighted mean, and a per-prompt rate.

    `update(tasks, correct, prompt_ids=None)`: task names `[N]`, correct bool `[N]`, optional
    prompt ids long `[N]` in `[0, max_prompts)`. `compute()` returns float tensors:

    - "geneval/<task>": share of that task's images judged correct, for each task seen;
    - "geneval/overall": unweighted mean of the seen tasks' accuracies (GenEval's overall score
      when all six tasks are present); 0 when nothing was seen;
    - "geneval/prompt_correct_rate" (only once prompt ids were given): share of the prompts seen
      all of whose images are correct.
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False
    plot_lower_bound = 0.0
    plot_upper_bound = 1.0

    correct: Tensor
    total: Tensor
    prompt_images: Tensor
    prompt_correct: Tensor

    def __init__(
        self,
        tasks: Sequence[str] = TASKS,
        max_prompts: int = GENEVAL_NUM_PROMPTS,
        prefix: str = "geneval",
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if max_prompts < 0:
            raise ValueError(f"max_prompts must be >= 0 (0 disables prompt statistics), got {max_prompts}")
        self.tasks, self.max_prompts, self.prefix = tuple(tasks), int(max_prompts), prefix
        t = len(self.tasks)
        self.add_state("correct", torch.zeros(t, dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("total", torch.zeros(t, dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("prompt_images", torch.zeros(self.max_prompts, dtype=torch.long), dist_reduce_fx="sum")
        self.add_state(
            "prompt_correct", torch.zeros(self.max_prompts, dtype=torch.long), dist_reduce_fx="sum"
        )

    def update(self, tasks: Sequence[str], correct: Tensor, prompt_ids: Tensor | None = None) -> None:
        """Count images: tasks `[N]` names, correct bool `[N]`, prompt_ids long `[N]` or None."""
        # Out-of-place sums: states reset under inference mode (validation) are inference
        # tensors, which an in-place add outside inference mode (training) would reject.
        idx = _task_index(tasks, self.tasks, self.device)
        ok = _flags(correct, len(idx), "correct", self.device).long()
        t = len(self.tasks)
        self.total = self.total + torch.bincount(idx, minlength=t)
        self.correct = self.correct + torch.bincount(idx, weights=ok, minlength=t).long()
        if prompt_ids is None:
            return
        pid = torch.as_tensor(prompt_ids, device=self.device).reshape(-1).long()
        if pid.numel() != len(idx):
            raise ValueError(f"prompt_ids has {pid.numel()} entries but tasks has {len(idx)}")
        if pid.numel() and (pid.min() < 0 or pid.max() >= self.max_prompts):
            raise ValueError(
                f"prompt_ids must lie in [0, {self.max_prompts}), "
                f"got {pid.min().item()}..{pid.max().item()}; "
                "raise max_prompts at construction"
            )
        self.prompt_images = self.prompt_images + torch.bincount(pid, minlength=self.max_prompts)
        self.prompt_correct = (
            self.prompt_correct + torch.bincount(pid, weights=ok, minlength=self.max_prompts).long()
        )

    def compute(self) -> dict[str, Tensor]:
        seen = self.total > 0
        acc = self.correct.float() / self.total.clamp(min=1).float()
        out = {f"{self.prefix}/{task}": acc[i] for i, task in enumerate(self.tasks) if seen[i]}
        out[f"{self.prefix}/overall"] = acc[seen].mean() if seen.any() else acc.new_zeros(())
        prompts = self.prompt_images > 0
        if prompts.any():
            all_ok = prompts & (self.prompt_correct == self.prompt_images)
            out[f"{self.prefix}/prompt_correct_rate"] = all_ok.sum().float() / prompts.sum().float()
        return out

    def plot(self, val: Any = None, ax: Any = None) -> Any:
        """Bar/line plot via torchmetrics' helper; ModuleNotFoundError when matplotlib is missing."""
        return _plot(self, val, ax)


class ImbalanceScore(Metric):
    """UniRL's imbalance: P(understanding wrong | generation correct), per task and pooled.

    `update(tasks, gen_correct, und_correct)`: task names `[N]`, bool `[N]` each. `compute()`:
    "imbalance/<task>" for each task seen and "imbalance/overall" pooled over all images (not a
    mean of task rates). A rate with no generation-correct images is 0, not NaN, so it logs
    cleanly; use `confusion()` to tell "no data" from "no imbalance". Lower is better.
    """

    is_differentiable = False
    higher_is_better = False
    full_state_update = False
    plot_lower_bound = 0.0
    plot_upper_bound = 1.0

    table: Tensor

    def __init__(self, tasks: Sequence[str] = TASKS, prefix: str = "imbalance", **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.tasks, self.prefix = tuple(tasks), prefix
        # table[task, gen_correct, und_correct]: image counts
        self.add_state("table", torch.zeros(len(self.tasks), 2, 2, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, tasks: Sequence[str], gen_correct: Tensor, und_correct: Tensor) -> None:
        """Count images: tasks `[N]`, gen_correct bool `[N]`, und_correct bool `[N]`."""
        idx = _task_index(tasks, self.tasks, self.device)
        gen = _flags(gen_correct, len(idx), "gen_correct", self.device).long()
        und = _flags(und_correct, len(idx), "und_correct", self.device).long()
        flat = idx * 4 + gen * 2 + und
        self.table = self.table + torch.bincount(flat, minlength=len(self.tasks) * 4).view(-1, 2, 2)

    @staticmethod
    def _rate(table: Tensor) -> Tensor:
        """P(und wrong | gen right) from a `[2, 2]` table; 0 when no generation is right."""
        gen_ok = table[1].sum()
        return table[1, 0].float() / gen_ok.clamp(min=1).float()

    def compute(self) -> dict[str, Tensor]:
        out = {
            f"{self.prefix}/{task}": self._rate(self.table[i])
            for i, task in enumerate(self.tasks)
            if self.table[i].sum() > 0
        }
        out[f"{self.prefix}/overall"] = self._rate(self.table.sum(0))
        return out

    def confusion(self) -> dict[str, Tensor]:
        """Per seen task, the long `[2, 2]` table: rows generation wrong/right, columns understanding
        wrong/right. Synced across processes like `compute()`."""
        with self.sync_context():
            table = self.table.clone()
        return {task: table[i] for i, task in enumerate(self.tasks) if table[i].sum() > 0}

    def plot(self, val: Any = None, ax: Any = None) -> Any:
        """Bar/line plot via torchmetrics' helper; ModuleNotFoundError when matplotlib is missing."""
        return _plot(self, val, ax)
