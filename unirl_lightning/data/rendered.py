"""Rendered-scene batches for the warm start: (prompt, ground-truth image, question, answer)."""

from __future__ import annotations

from typing import Iterator, Sequence

import torch
from torch.utils.data import DataLoader, IterableDataset

from unirl_lightning.data.datamodule import OnPolicyDataModule, check_task_weights, reweight_by_task
from unirl_lightning.data.qa import answer_for, question_for
from unirl_lightning.worlds.render import WorldConfig, render_batch


class RenderedSceneStream(IterableDataset):
    """Endless seeded batches: specs drawn from `specs`, each rendered with a fresh seed.

    `phases = [(n1, specs1), (n2, specs2), ...]` draws the first `n1` batches from `specs1`, the
    next `n2` from `specs2` and so on before `specs` (a curriculum: e.g. position scenes alone,
    then colour scenes, then the mixture). Yields dicts with specs, prompts, images uint8
    `[B, 3, H, W]`, questions, answers.
    """

    def __init__(
        self,
        specs: list[dict],
        batch_size: int,
        world: WorldConfig,
        seed: int,
        rank: int = 0,
        phases: Sequence[tuple[int, list[dict]]] = (),
    ):
        self.specs, self.batch_size, self.world, self.seed, self.rank = specs, batch_size, world, seed, rank
        self.phases = list(phases)

    def _pool(self, batch: int) -> list[dict]:
        """The specs batch number `batch` draws from."""
        end = 0
        for n, pool in self.phases:
            end += n
            if batch < end:
                return pool
        return self.specs

    def __iter__(self) -> Iterator[dict]:
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + self.rank)
        batches = 0
        while True:
            pool = self._pool(batches)
            batches += 1
            idx = torch.randint(len(pool), (self.batch_size,), generator=gen).tolist()
            specs = [pool[i] for i in idx]
            seeds = torch.randint(2**62, (self.batch_size,), generator=gen).tolist()
            images, _ = render_batch(specs, seeds, self.world)
            yield {
                "specs": specs,
                "prompts": [s["prompt"] for s in specs],
                "images": images,
                "questions": [question_for(s) for s in specs],
                "answers": [answer_for(s) for s in specs],
            }


class RenderedSceneDataModule(OnPolicyDataModule):
    """Training batches of rendered scenes; validation as in `OnPolicyDataModule` (held-out prompts).

    Args:
        batch_size: scenes per step; canvas / sizes / grid: the world (must match the model's).
        first_steps / first_task_weights: a curriculum: the first `first_steps` batches draw the
            training prompts reweighted by `first_task_weights` (e.g. `{position: 1.0}`: position
            scenes alone), the rest the whole training set.
        phases: a curriculum of several phases, in order, before the whole training set: a list of
            `{steps: N, task_weights: {...}}` (e.g. position scenes alone for 1200 steps, then
            colour scenes for 800; benchmarks/flow_rl_budget.md). Give it or first_steps, not both.
        Other arguments as in `OnPolicyDataModule`.
    """

    def __init__(
        self,
        batch_size: int = 64,
        canvas: int = 32,
        sizes: tuple[int, ...] = (8,),
        grid: int = 8,
        first_steps: int = 0,
        first_task_weights: dict[str, float] | None = None,
        phases: list[dict] | None = None,
        **kwargs,
    ):
        super().__init__(**kwargs)
        if first_steps < 0 or (first_steps > 0) != (first_task_weights is not None):
            raise ValueError(
                "data.first_steps and data.first_task_weights go together (steps > 0 with weights, or "
                f"0 and None); got {first_steps} and {first_task_weights}"
            )
        if first_task_weights is not None:
            check_task_weights(first_task_weights, "data.first_task_weights")
            if phases:
                raise ValueError("give data.phases or data.first_steps / first_task_weights, not both")
        for i, phase in enumerate(phases or []):
            steps = phase.get("steps") if isinstance(phase, dict) else None
            if not isinstance(steps, int) or steps < 1 or set(phase) != {"steps", "task_weights"}:
                raise ValueError(f"data.phases[{i}] = {phase!r}: give {{steps: N >= 1, task_weights: "
                                 "{task: weight, ...}}")
            check_task_weights(phase["task_weights"], f"data.phases[{i}].task_weights")
        self.save_hyperparameters()
        self.world = WorldConfig(canvas=canvas, sizes=tuple(sizes), grid=grid)

    def train_dataloader(self) -> DataLoader:
        rank, _ = self._rank()
        hp = self.hparams
        phases = hp.phases or []
        if hp.first_task_weights is not None:
            phases = [{"steps": hp.first_steps, "task_weights": hp.first_task_weights}]
        pools = [(p["steps"], reweight_by_task(self.train_specs, p["task_weights"], hp.seed)) for p in phases]
        stream = RenderedSceneStream(self.train_specs, hp.batch_size, self.world, hp.seed, rank, pools)
        return DataLoader(stream, batch_size=None)

    def transfer_batch_to_device(self, batch, device, dataloader_idx):
        if isinstance(batch, dict):
            return {**batch, "images": batch["images"].to(device)}
        return super().transfer_batch_to_device(batch, device, dataloader_idx)

    def on_after_batch_transfer(self, batch, dataloader_idx):
        return batch if isinstance(batch, dict) else super().on_after_batch_transfer(batch, dataloader_idx)


class FlowSceneDataModule(RenderedSceneDataModule):
    """`RenderedSceneDataModule` on a chosen placement grid.

    The built-in flow model's latent cells each hold one whole object, so its scenes are placed
    on a `grid` = cell-size grid (default 8 px) with `gap` free cells between objects; the
    default world places 8-px shapes on a 4-px grid, where objects straddle cells.
    """

    def __init__(
        self,
        grid: int = 8,
        gap: int = 1,
        batch_size: int = 64,
        canvas: int = 32,
        sizes: tuple[int, ...] = (8,),
        **kwargs,
    ):
        super().__init__(batch_size=batch_size, canvas=canvas, sizes=sizes, **kwargs)
        self.save_hyperparameters()
        self.world = WorldConfig(canvas=canvas, sizes=tuple(sizes), grid=grid, gap=gap)
