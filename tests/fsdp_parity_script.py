"""GRPO updates on fixed rollouts, in 1 process or sharded by FSDP2 over 2 CPU processes (gloo).

Run by tests/test_fsdp.py as `python fsdp_parity_script.py OUT_DIR RECIPE DEVICES` (RECIPE: grpo, grpo_dapo,
grpo_filter or flow_grpo; grpo_filter drops tied groups, where rank 0 keeps fewer rows than rank 1, and adds
UniRL's answer SFT loss; DEVICES: 1, unsharded, or 2, Lightning's ModelParallelStrategy, which re-launches
the script once per rank). Every process builds the same seeded policy and the same `ROWS`-row rollouts of
each update from it before training (with seeded rewards); one process trains on every row, and rank r of
two on rows `[r * ROWS / 2, (r + 1) * ROWS / 2)`, groups kept whole as the DataModule keeps them.

Writes `rank{r}.json` (each update's objective: the sum of the losses this rank back-propagated, and the
reference's parameters that are not sharded after training) and, from
rank 0, `result.pt`: the first update's gradients before clipping, each gradient entry's largest size over
the updates and the trained policy's weights, all gathered to full tensors.
"""

from __future__ import annotations

import json
import os
import sys

import lightning as L
import torch
from lightning.pytorch.strategies import ModelParallelStrategy
from torch.utils.data import DataLoader

from unirl_lightning.data import OnPolicyDataModule
from unirl_lightning.data.datamodule import PromptBatch
from unirl_lightning.models.flow import TinyFlowConfig, TinyFlowModel
from unirl_lightning.models.tiny import TinyConfig, TinyUnifiedModel
from unirl_lightning.modules import DiscreteGRPO
from unirl_lightning.modules.flow_grpo import FlowGRPO
from unirl_lightning.rewards.base import RewardFunction, RolloutContext

ROWS = 8  # rows of each update's rollout: 2 groups of 2 per rank under 2 ranks
GROUP = 2
BATCHES = 2  # training steps, each on its own rollout
ITERATIONS = {"grpo": 2, "flow": 1}  # optimiser updates per rollout (discrete: mu = 2, old log-probs stored)


class SpecReward(RewardFunction):
    """The reward stored in each spec (`"reward"`): fixed, seeded rewards whatever the images."""

    def __call__(self, ctx: RolloutContext) -> torch.Tensor:
        return torch.tensor([s["reward"] for s in ctx.specs])


def full(t: torch.Tensor) -> torch.Tensor:
    """A sharded tensor gathered whole (every rank must call), a plain one as it is."""
    return (t.full_tensor() if hasattr(t, "full_tensor") else t).detach().clone()


def recording(cls: type) -> type:
    """`cls` that records each update's objective, the first update's full gradients and each gradient
    entry's largest size over the updates, before clipping (when the recipe clips: `gradient_clip_val` set,
    as by default)."""

    class Recording(cls):
        def on_train_start(self) -> None:
            self.objectives: list[float] = []
            self.grads: dict[str, torch.Tensor] = {}
            self.grad_peaks: dict[str, torch.Tensor] = {}
            self._objective = 0.0

        def manual_backward(self, loss: torch.Tensor, *args, **kwargs) -> None:
            self._objective += float(loss.detach())
            super().manual_backward(loss, *args, **kwargs)

        def clip_gradients(self, optimizer, *args, **kwargs) -> None:
            grads = {n: full(p.grad) for n, p in self.policy.named_parameters() if p.grad is not None}
            self.grads = self.grads or grads
            for name, grad in grads.items():
                peak = self.grad_peaks.get(name, torch.zeros_like(grad))
                self.grad_peaks[name] = torch.maximum(peak, grad.abs())
            self.objectives.append(self._objective)
            self._objective = 0.0
            super().clip_gradients(optimizer, *args, **kwargs)

    Recording.__name__ = Recording.__qualname__ = cls.__name__
    return Recording


class FixedRollouts(L.LightningDataModule):
    """This rank's rows of each prepared batch, in order (one batch per training step)."""

    def __init__(self, batches: list[PromptBatch]):
        super().__init__()
        self.batches = batches

    def train_dataloader(self) -> DataLoader:
        rank, world = self.trainer.global_rank, self.trainer.world_size
        size = ROWS // world
        rows = torch.arange(rank * size, (rank + 1) * size)
        ctx_rows = [self._rows(b, rows) for b in self.batches]
        return DataLoader(ctx_rows, batch_size=None, collate_fn=None)

    @staticmethod
    def _rows(batch: PromptBatch, rows: torch.Tensor) -> PromptBatch:
        ctx = batch.rollout
        picked = RolloutContext(
            specs=[ctx.specs[i] for i in rows.tolist()],
            rollout=ctx.rollout.select(rows),
            images=ctx.images[rows],
        )
        return PromptBatch(specs=picked.specs, group_ids=batch.group_ids[rows], rollout=picked)


def rewards_for(recipe: str, update: int) -> list[float]:
    """Seeded rewards of one update's rows; grpo_filter ties rank 0's first group (rows 0 and 1) only."""
    rewards = torch.rand(ROWS, generator=torch.Generator().manual_seed(100 + update)).tolist()
    if recipe == "grpo_filter":
        rewards[1] = rewards[0]
    return rewards


def build(recipe: str) -> tuple[L.LightningModule, list[PromptBatch]]:
    """The seeded recipe, and its `BATCHES` batches of `ROWS` rows rolled out by the initial policy."""
    torch.manual_seed(0)
    data = OnPolicyDataModule(num_train=40, num_val=8)
    data.setup("fit")
    specs = data.train_specs[: BATCHES * ROWS // GROUP]
    common = dict(warm_start=None, rewards=[SpecReward()], lr=1e-3, micro_batch_size=2)
    if recipe.startswith("grpo"):
        policy = TinyUnifiedModel(TinyConfig(d_model=32, n_layers=2, n_heads=2))
        loss_type = "dapo" if recipe == "grpo_dapo" else "grpo"
        module = recording(DiscreteGRPO)(
            policy,
            beta=0.04,
            loss_type=loss_type,
            num_iterations=ITERATIONS["grpo"],
            filter_zero_std=recipe == "grpo_filter",
            answer_sft_weight=0.5 if recipe == "grpo_filter" else 0.0,
            **common,
        )
    else:
        policy = TinyFlowModel(TinyFlowConfig(num_layers=2, num_heads=2, head_dim=8, text_dim=16))
        module = recording(FlowGRPO)(policy, num_steps=3, beta=0.01, **common)
    batches = []
    for update in range(BATCHES):
        picked = specs[update * ROWS // GROUP : (update + 1) * ROWS // GROUP]
        rewards = rewards_for(recipe, update)
        rows = [{**s, "reward": rewards[i * GROUP + j]} for i, s in enumerate(picked) for j in range(GROUP)]
        group_ids = torch.arange(len(picked)).repeat_interleave(GROUP) + update * len(picked)
        batch = PromptBatch(specs=rows, group_ids=group_ids)
        torch.manual_seed(1 + update)
        batch.rollout = module.make_rollouts(batch)
        batches.append(batch)
    return module, batches


def main(out_dir: str, recipe: str, devices: str) -> None:
    module, batches = build(recipe)
    sharded = int(devices) > 1
    updates = BATCHES * ITERATIONS["grpo" if recipe.startswith("grpo") else "flow"]
    trainer = L.Trainer(
        accelerator="cpu",
        devices=int(devices),
        strategy=ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1) if sharded else "auto",
        max_steps=updates,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        use_distributed_sampler=False,  # each rank's loader already holds its own rows
    )
    trainer.fit(module, datamodule=FixedRollouts(batches))
    weights = {k: full(v) for k, v in module.policy.state_dict().items()}
    result = {
        "rank": trainer.global_rank,
        "objectives": module.objectives,
        "sharded": type(module.policy).__name__,
        # the frozen reference's parameters left gathered (not sharded) after training
        "reference_gathered": [
            n for n, p in module.reference.named_parameters() if not hasattr(p, "to_local")
        ],
    }
    if trainer.is_global_zero:
        saved = {"grads": module.grads, "grad_peaks": module.grad_peaks, "weights": weights}
        torch.save(saved, os.path.join(out_dir, "result.pt"))
    with open(os.path.join(out_dir, f"rank{trainer.global_rank}.json"), "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    main(*sys.argv[1:4])
