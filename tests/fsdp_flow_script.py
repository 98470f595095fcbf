"""FlowGRPO / UniGRPO under FSDP2 (Lightning's ModelParallelStrategy) on 2 CPU processes (gloo).

Run by tests/test_fsdp.py as `python fsdp_flow_script.py OUT_DIR RECIPE` (RECIPE: flow_grpo,
flow_grpo_lora, flow_grpo_skip_tied, flow_grpo_all_tied, flow_grpo_row_windows, flow_grpo_rank_nan,
flow_grpo_all_nan, unigrpo or unigrpo_rank_nan):
Lightning re-launches it once per rank. Writes each rank's result (full parameters' checksums,
reward, saved checksums) to OUT_DIR.
"""

import json
import os
import sys

import lightning as L
import torch
from lightning.pytorch.strategies import ModelParallelStrategy

from grad_capture import LatentMeanReward  # this script's folder
from unirl_lightning.data import OnPolicyDataModule
from unirl_lightning.data.reasoning import ReasoningDataModule
from unirl_lightning.models.flow import TinyFlowConfig, TinyFlowModel
from unirl_lightning.models.lora import merge_lora
from unirl_lightning.models.text.policies import TinyTextConfig, TinyTextPolicy
from unirl_lightning.modules.flow_grpo import FlowGRPO
from unirl_lightning.modules.unigrpo import UniGRPO


class RankTiedReward(LatentMeanReward):
    """Every image alike on rank 0 (all groups tie), the latent mean on the others."""

    def __call__(self, ctx):
        reward = super().__call__(ctx)
        return torch.zeros_like(reward) if torch.distributed.get_rank() == 0 else reward


class RankNaNReward(LatentMeanReward):
    """NaN for every sample on the ranks in `bad`, the latent mean on the others. The NaN rows' rollout
    log-probs (image and text) are made NaN too: any use of them in a loss would make it NaN and skip
    the step."""

    def __init__(self, bad: tuple[int, ...]):
        super().__init__()
        self.bad = bad

    def __call__(self, ctx):
        reward = super().__call__(ctx)
        if torch.distributed.get_rank() not in self.bad:
            return reward
        ctx.rollout.log_probs.fill_(float("nan"))
        if ctx.cache.get("text") is not None:  # UniGRPO's text rollout
            ctx.cache["text"].logprobs.fill_(float("nan"))
        return torch.full_like(reward, float("nan"))


class AllTiedReward(LatentMeanReward):
    def __call__(self, ctx):
        return torch.zeros(len(ctx.specs))


def full_state(module: torch.nn.Module) -> dict:
    return {k: (v.full_tensor() if hasattr(v, "full_tensor") else v) for k, v in module.state_dict().items()}


def checksum(module_or_state) -> float:
    state = full_state(module_or_state) if isinstance(module_or_state, torch.nn.Module) else module_or_state
    return float(sum(v.double().abs().sum() for v in state.values()))


def main(out_dir: str, recipe: str) -> None:
    torch.manual_seed(0)
    flow = TinyFlowModel(TinyFlowConfig(num_layers=2, num_heads=2, head_dim=8, text_dim=16))
    initial = checksum(flow)
    save_to = os.path.join(out_dir, "saved")
    common = dict(warm_start=None, num_steps=3, lr=1e-3, beta=0.01, micro_batch_size=2, save_to=save_to)
    if recipe.startswith("unigrpo"):
        text = TinyTextPolicy(TinyTextConfig(d_model=32, n_layers=2, n_heads=2))
        rewards = [RankNaNReward((0,))] if recipe == "unigrpo_rank_nan" else None
        module = UniGRPO(text, flow, rewards, text_warm_start=None, max_new_tokens=4, **common)
        data = ReasoningDataModule(
            num_train=60, num_val=12, prompts_per_step=2, group_size=2, val_batch_size=6
        )
    elif recipe == "flow_grpo_skip_tied":  # rank 0's groups all tie, rank 1's do not: equal backward counts
        module = FlowGRPO(flow, rewards=[RankTiedReward()], train_tied_groups=False, **common)
        data = OnPolicyDataModule(
            num_train=60, num_val=12, prompts_per_step=2, group_size=2, val_batch_size=6
        )
    elif recipe in ("flow_grpo_rank_nan", "flow_grpo_all_nan"):  # rank 0's (or every) reward NaN
        bad = (0,) if recipe == "flow_grpo_rank_nan" else (0, 1)
        module = FlowGRPO(flow, rewards=[RankNaNReward(bad)], **common)
        data = OnPolicyDataModule(
            num_train=60, num_val=12, prompts_per_step=2, group_size=2, val_batch_size=6
        )
    elif recipe == "flow_grpo_all_tied":  # every group ties on both ranks: nothing to train anywhere
        module = FlowGRPO(flow, rewards=[AllTiedReward()], train_tied_groups=False, **common)
        data = OnPolicyDataModule(
            num_train=60, num_val=12, prompts_per_step=2, group_size=2, val_batch_size=6
        )
    elif (
        recipe == "flow_grpo_row_windows"
    ):  # per-group windows: rank 0 trains steps 0 and 1, rank 1 only step 1
        module = FlowGRPO(
            flow, sde_window_size=1, sde_window_per_group=True, **{**common, "micro_batch_size": 4}
        )
        module.group_windows = lambda batch: torch.tensor(
            [[1, 2]] * len(batch)
            if torch.distributed.get_rank()
            else [[0, 1]] * 2 + [[1, 2]] * (len(batch) - 2)
        )
        data = OnPolicyDataModule(
            num_train=60, num_val=12, prompts_per_step=2, group_size=2, val_batch_size=6
        )
    else:  # flow_grpo, or flow_grpo_lora: LoRA adapters (mixed frozen / trainable parameters per unit)
        module = FlowGRPO(flow, lora_rank=4 if recipe.endswith("lora") else 0, **common)
        data = OnPolicyDataModule(
            num_train=60, num_val=12, prompts_per_step=2, group_size=2, val_batch_size=6
        )
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
    state = full_state(module.policy)
    result = {
        "rank": trainer.global_rank,
        "sharded": type(module.policy.transformer.transformer_blocks[0]).__name__,
        "initial": initial,
        "checksum": checksum(state),
        # the frozen weights: the reference copy, or the base model under the LoRA adapters
        "frozen_checksum": checksum(module.reference)
        if module.reference is not None
        else checksum({k.replace(".base_layer.", "."): v for k, v in state.items() if ".lora_" not in k}),
        "lora_b": float(sum(v.abs().sum() for k, v in state.items() if ".lora_B." in k)),
        "merged_checksum": checksum(merge_lora(state, module.policy.lora_scaling or 1.0)),
        "reward": float(trainer.logged_metrics["reward"]),
        "geneval": float(trainer.logged_metrics["val/geneval/overall"]),
        "trained_rows_frac": float(trainer.logged_metrics.get("train/trained_rows_frac", -1.0)),
        "empty_batches": float(trainer.logged_metrics.get("train/empty_batches", -1.0)),
        "bad_rewards": float(module.bad_rewards),
        "skipped_steps": float(module.skipped_steps),
        "global_step": trainer.global_step,
    }
    if recipe.startswith("unigrpo"):
        result["text_checksum"] = checksum(module.text_policy)
    if trainer.is_global_zero:  # the saved full weights equal the gathered ones
        result["saved_checksum"] = checksum(TinyFlowModel.from_pretrained(save_to))
        if recipe.startswith("unigrpo"):
            result["saved_text_checksum"] = checksum(
                TinyTextPolicy.from_pretrained(os.path.join(save_to, "text_policy"))
            )
    with open(os.path.join(out_dir, f"rank{trainer.global_rank}.json"), "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
