"""The on-the-fly DataModule: prompt groups in, fresh rollouts of the current policy out.

The loaders stream GenEval-format specs (P prompts x G samples a step, deterministic per seed
and rank, each group kept whole on one rank). After the batch reaches the device,
`on_after_batch_transfer` hands it to the LightningModule's `make_rollouts`, so every step
trains on samples of the policy as it is now — no stale replay buffer.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Literal

import lightning as L
import torch
from torch.utils.data import DataLoader, IterableDataset

from unirl_lightning.data.prompts import geneval_vocabulary, split_specs
from unirl_lightning.data.specs import load_specs
from unirl_lightning.worlds.vocab import SHAPES, TASKS


@dataclass
class PromptBatch:
    """P prompts x G samples. specs: `P*G` dicts (each prompt repeated G times, contiguous);
    group_ids: long `[P*G]`, globally unique per prompt draw; `rollout` is filled on device."""

    specs: list[dict]
    group_ids: torch.Tensor
    rollout: Any = None
    extras: dict = field(default_factory=dict)

    @property
    def prompts(self) -> list[str]:
        return [s["prompt"] for s in self.specs]

    def __len__(self) -> int:
        return len(self.specs)


def check_task_weights(weights: dict[str, float], field: str) -> None:
    """Fails early on unknown tasks, negative weights or an all-zero mapping (`field` names the config
    key)."""
    unknown = sorted(set(weights) - set(TASKS))
    if unknown:
        raise ValueError(f"{field}: unknown task(s) {unknown}; GenEval's tasks are {list(TASKS)}")
    if any(w < 0 for w in weights.values()) or not any(w > 0 for w in weights.values()):
        raise ValueError(f"{field}: weights must be >= 0 with at least one > 0, got {weights}")


def reweight_by_task(specs: list[dict], weights: dict[str, float], seed: int) -> list[dict]:
    """A list as long as `specs` whose task shares follow `weights` (sampled with replacement per task,
    seeded)."""
    by_task: dict[str, list[dict]] = {}
    for s in specs:
        by_task.setdefault(s.get("tag", ""), []).append(s)
    missing = sorted(t for t, w in weights.items() if w > 0 and t not in by_task)
    if missing:
        raise ValueError(f"data.train_task_weights: no training prompts for task(s) {missing}")
    total = sum(weights.values())
    gen = torch.Generator().manual_seed(seed)
    out: list[dict] = []
    for task in TASKS:
        n = round(len(specs) * weights.get(task, 0.0) / total)
        if n:
            pool = by_task[task]
            out += [pool[i] for i in torch.randint(len(pool), (n,), generator=gen).tolist()]
    return out


def _collate(batch: list[PromptBatch]) -> PromptBatch:
    return batch[0]  # the dataset already yields whole batches


class PromptGroupStream(IterableDataset):
    """An endless, seeded stream of `PromptBatch`es; rank r of W draws its own, disjoint sequence.
    `start` skips that many batches (a resumed run continues where its checkpoint left the stream)."""

    def __init__(
        self,
        specs: list[dict],
        prompts_per_step: int,
        group_size: int,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
        start: int = 0,
    ):
        if not specs:
            raise ValueError("the prompt set is empty: give train_prompts a non-empty jsonl or num_train > 0")
        self.specs, self.P, self.G = specs, prompts_per_step, group_size
        self.seed, self.rank, self.world_size, self.start = seed, rank, world_size, start

    def __iter__(self) -> Iterator[PromptBatch]:
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + self.rank)
        for _ in range(self.start):  # the same draws as the batches skipped, so the stream matches
            torch.randint(len(self.specs), (self.P,), generator=gen)
        step = self.start
        while True:
            idx = torch.randint(len(self.specs), (self.P,), generator=gen).tolist()
            base = (step * self.world_size + self.rank) * self.P
            yield PromptBatch(
                specs=[self.specs[i] for i in idx for _ in range(self.G)],
                group_ids=torch.arange(base, base + self.P).repeat_interleave(self.G),
            )
            step += 1


class OnPolicyDataModule(L.LightningDataModule):
    """Streams prompt groups and turns them into on-policy rollouts each step.

    Args:
        train_prompts / val_prompts: GenEval `evaluation_metadata.jsonl` paths; when None a seeded
            generator makes `num_train` / `num_val` specs over `vocabulary` (tasks balanced), with
            disjoint prompts: validation takes `val_fraction` of each task's distinct prompts.
        vocabulary: object classes: a list, "shapes" (the synthetic world's) or "geneval" (COCO's 80).
            Generated prompts use it (None: shapes); prompt files are checked against it (None: not checked).
        prompts_per_step: P distinct prompts per step and rank; group_size: G samples per prompt.
        val_batch_size: prompts per validation batch (one sample each).
        train_task_weights: optional {task: weight} share of training prompts per GenEval task
            (validation is untouched), e.g. to spend rollouts on the tasks with room to learn
            rather than on ones the policy already solves; tasks left out get weight 0.
    """

    def __init__(
        self,
        train_prompts: str | None = None,
        val_prompts: str | None = None,
        vocabulary: list[str] | Literal["shapes", "geneval"] | None = None,
        num_train: int = 1200,
        num_val: int = 120,
        val_fraction: float = 0.25,
        prompts_per_step: int = 8,
        group_size: int = 8,
        val_batch_size: int = 60,
        seed: int = 0,
        train_task_weights: dict[str, float] | None = None,
    ):
        super().__init__()
        self.save_hyperparameters()
        if train_task_weights is not None:
            check_task_weights(train_task_weights, "data.train_task_weights")
        if prompts_per_step < 1 or group_size < 1:
            raise ValueError(
                f"prompts_per_step and group_size must be >= 1, got {prompts_per_step} and {group_size}"
            )
        for name, path in (("train_prompts", train_prompts), ("val_prompts", val_prompts)):
            if path is not None and not Path(path).is_file():
                raise FileNotFoundError(
                    f"data.{name}: no such file {path!r}; give a GenEval evaluation_metadata.jsonl"
                )
        if vocabulary == "geneval":
            vocabulary = geneval_vocabulary()
        elif vocabulary == "shapes":
            vocabulary = list(SHAPES)
        self.file_vocabulary = list(vocabulary) if vocabulary is not None else None
        self.vocabulary = list(vocabulary or SHAPES)
        self.train_specs: list[dict] = []
        self.val_specs: list[dict] = []
        self.batches_used = 0  # training batches turned into rollouts: the stream's position

    def state_dict(self) -> dict[str, Any]:
        """Saved in checkpoints: where this rank's prompt stream stands."""
        return {"batches_used": self.batches_used}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.batches_used = int(state_dict.get("batches_used", 0))

    def setup(self, stage: str | None = None) -> None:
        hp, vocab, checked = self.hparams, self.vocabulary, self.file_vocabulary
        if hp.train_prompts and hp.val_prompts:
            self.train_specs = load_specs(hp.train_prompts, vocabulary=checked)
            self.val_specs = load_specs(hp.val_prompts, vocabulary=checked)
        else:
            # Held-out prompts per task (a quarter of each small task's distinct prompts, at least
            # one), tasks balanced since GenEval's overall score is their unweighted mean.
            train, val = split_specs(
                vocab,
                hp.num_train,
                hp.num_val,
                hp.seed,
                test_fraction=hp.val_fraction,
                task_weights={t: 1.0 for t in TASKS},
                allow_repeats=True,
            )
            self.train_specs = load_specs(hp.train_prompts, vocabulary=checked) if hp.train_prompts else train
            self.val_specs = load_specs(hp.val_prompts, vocabulary=checked) if hp.val_prompts else val
        if hp.train_task_weights is not None:
            self.train_specs = reweight_by_task(self.train_specs, hp.train_task_weights, hp.seed)
        overlap = {s["prompt"] for s in self.val_specs} & {s["prompt"] for s in self.train_specs}
        if overlap:
            raise ValueError(
                f"{len(overlap)} prompts are in both train and validation sets, e.g. {sorted(overlap)[0]!r}"
            )

    def _rank(self) -> tuple[int, int]:
        trainer = self.trainer
        return (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)

    def train_dataloader(self) -> DataLoader:
        rank, world = self._rank()
        stream = PromptGroupStream(
            self.train_specs,
            self.hparams.prompts_per_step,
            self.hparams.group_size,
            self.hparams.seed,
            rank,
            world,
            start=self.batches_used,
        )
        return DataLoader(stream, batch_size=None, collate_fn=None)

    def val_dataloader(self) -> DataLoader:
        rank, world = self._rank()
        mine = self.val_specs[rank::world]  # each rank scores its own share; metrics reduce across ranks
        bs = self.hparams.val_batch_size
        batches = [
            PromptBatch(specs=mine[i : i + bs], group_ids=torch.arange(i, i + len(mine[i : i + bs])))
            for i in range(0, len(mine), bs)
        ]
        return DataLoader(batches, batch_size=None, collate_fn=None)

    def test_dataloader(self) -> DataLoader:
        return self.val_dataloader()

    def transfer_batch_to_device(
        self, batch: PromptBatch, device: torch.device, dataloader_idx: int
    ) -> PromptBatch:
        batch.group_ids = batch.group_ids.to(device)
        return batch

    def on_after_batch_transfer(self, batch: PromptBatch, dataloader_idx: int) -> PromptBatch:
        """Fresh rollouts from the current policy (training only; evaluation generates its own)."""
        trainer = self.trainer
        if trainer is not None and trainer.training:
            module = trainer.lightning_module
            make = getattr(module, "make_rollouts", None)
            if make is None:
                raise TypeError(
                    f"{type(module).__name__} has no make_rollouts(batch); OnPolicyDataModule needs one"
                )
            batch.rollout = make(batch)
            self.batches_used += 1
        return batch
