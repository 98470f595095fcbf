"""UniRL SFT and discrete GRPO under FSDP2 (Lightning's ModelParallelStrategy) on 2 CPU processes (gloo).

Run by tests/test_fsdp.py as `python fsdp_sft_script.py OUT_DIR [RECIPE]` (RECIPE: sft, the default;
grpo_filter_rank_tied: GRPO with filter_zero_std where rank 0's groups all tie and rank 1's do not;
grpo_filter_all_tied: every group ties on both ranks; grpo_rank_nan: GRPO where rank 0's rewards are all
NaN). Lightning re-launches it once per rank.
Writes each rank's result (full parameters' checksum, loss, counters) to OUT_DIR.
"""

import json
import os
import sys

import lightning as L
import torch
from lightning.pytorch.strategies import ModelParallelStrategy

from unirl_lightning.data import OnPolicyDataModule
from unirl_lightning.models.tiny import TinyConfig, TinyUnifiedModel
from unirl_lightning.modules import DiscreteGRPO, UniRLSFT
from unirl_lightning.rewards import RewardFunction


class TiedOnRanks(RewardFunction):
    """0 on the ranks in `tied` (every group ties there), a seeded random reward on the others."""

    def __init__(self, tied: tuple[int, ...]):
        super().__init__()
        self.tied = tied

    def __call__(self, ctx):
        if torch.distributed.get_rank() in self.tied:
            return torch.zeros(len(ctx.specs))
        return torch.rand(len(ctx.specs), generator=torch.Generator().manual_seed(len(ctx.specs)))


class NaNOnRank0(RewardFunction):
    """NaN for every sample on rank 0, a seeded random reward on the others."""

    def __call__(self, ctx):
        if torch.distributed.get_rank() == 0:
            return torch.full((len(ctx.specs),), float("nan"))
        return torch.rand(len(ctx.specs), generator=torch.Generator().manual_seed(len(ctx.specs)))


def checksum(module: torch.nn.Module) -> float:
    full = {k: (v.full_tensor() if hasattr(v, "full_tensor") else v) for k, v in module.state_dict().items()}
    return float(sum(v.double().abs().sum() for v in full.values()))


def main(out_dir: str, recipe: str = "sft") -> None:
    torch.manual_seed(0)
    policy = TinyUnifiedModel(TinyConfig(d_model=32, n_layers=2, n_heads=2))
    initial = checksum(policy)
    save_to = os.path.join(out_dir, "saved")
    if recipe == "sft":
        module = UniRLSFT(policy, warm_start=None, lr=1e-3, score_every_n_steps=1, save_to=save_to)
    else:
        tied = (0,) if recipe == "grpo_filter_rank_tied" else (0, 1)
        module = DiscreteGRPO(
            policy,
            warm_start=None,
            rewards=[NaNOnRank0() if recipe == "grpo_rank_nan" else TiedOnRanks(tied)],
            filter_zero_std=recipe != "grpo_rank_nan",
            answer_sft_weight=0.5 if recipe == "grpo_rank_nan" else 0.0,  # rank 0: no image to learn from
            beta=0.04,
            micro_batch_size=1,
            lr=1e-3,
            save_to=save_to,
        )
    data = OnPolicyDataModule(num_train=60, num_val=12, prompts_per_step=2, group_size=2, val_batch_size=6)
    trainer = L.Trainer(
        accelerator="cpu",
        devices=2,
        strategy=ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1),
        max_steps=2,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=1,
        val_check_interval=2,
        check_val_every_n_epoch=None,
    )
    trainer.fit(module, datamodule=data)
    metrics = {k: float(v) for k, v in trainer.logged_metrics.items()}
    result = {
        "rank": trainer.global_rank,
        "sharded": type(module.policy.blocks[0]).__name__,
        "initial": initial,
        "checksum": checksum(module.policy),
        "loss": metrics.get("train/loss", 0.0),
        "geneval": metrics["val/geneval/overall"],
        "global_step": trainer.global_step,
        "empty_batches": metrics.get("train/empty_batches", -1.0),
        "bad_rewards": metrics.get("train/bad_rewards_total", -1.0),
        "skipped_steps": metrics.get("train/skipped_steps", -1.0),
    }
    if trainer.is_global_zero:  # the saved full weights equal the gathered ones
        result["saved_checksum"] = checksum(TinyUnifiedModel.from_pretrained(save_to))
    with open(os.path.join(out_dir, f"rank{trainer.global_rank}.json"), "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    main(*sys.argv[1:])
