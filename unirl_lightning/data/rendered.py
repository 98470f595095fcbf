"""Rendered-scene batches for the warm start: (prompt, ground-truth image, question, answer)."""

from __future__ import annotations

from typing import Iterator

import torch
from torch.utils.data import DataLoader, IterableDataset

from unirl_lightning.data.datamodule import OnPolicyDataModule
from unirl_lightning.data.qa import answer_for, question_for
from unirl_lightning.worlds.render import WorldConfig, render_batch


class RenderedSceneStream(IterableDataset):
    """Endless seeded batches: specs drawn from `specs`, each rendered with a fresh seed.

    Yields dicts with specs, prompts, images uint8 `[B, 3, H, W]`, questions, answers.
    """

    def __init__(self, specs: list[dict], batch_size: int, world: WorldConfig, seed: int, rank: int = 0):
        self.specs, self.batch_size, self.world, self.seed, self.rank = specs, batch_size, world, seed, rank

    def __iter__(self) -> Iterator[dict]:
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + self.rank)
        while True:
            idx = torch.randint(len(self.specs), (self.batch_size,), generator=gen).tolist()
            specs = [self.specs[i] for i in idx]
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
        Other arguments as in `OnPolicyDataModule`.
    """

    def __init__(
        self, batch_size: int = 64, canvas: int = 32, sizes: tuple[int, ...] = (8,), grid: int = 8, **kwargs
    ):
        super().__init__(**kwargs)
        self.save_hyperparameters()
        self.world = WorldConfig(canvas=canvas, sizes=tuple(sizes), grid=grid)

    def train_dataloader(self) -> DataLoader:
        rank, _ = self._rank()
        stream = RenderedSceneStream(
            self.train_specs, self.hparams.batch_size, self.world, self.hparams.seed, rank
        )
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
