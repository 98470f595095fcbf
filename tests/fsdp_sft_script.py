"""UniRL SFT under FSDP2 (Lightning's ModelParallelStrategy) on 2 CPU processes (gloo).

Run by tests/test_fsdp.py as a script: Lightning re-launches it once per rank. Writes each
rank's result (full parameters' checksum, loss) to OUT_DIR.
"""

import json
import os
import sys

import lightning as L
import torch
from lightning.pytorch.strategies import ModelParallelStrategy

from unirl_lightning.data import OnPolicyDataModule
from unirl_lightning.models.tiny import TinyConfig, TinyUnifiedModel
from unirl_lightning.modules import UniRLSFT


def main(out_dir: str) -> None:
    torch.manual_seed(0)
    policy = TinyUnifiedModel(TinyConfig(d_model=32, n_layers=2, n_heads=2))
    module = UniRLSFT(policy, warm_start=None, lr=1e-3, score_every_n_steps=1, save_to=os.path.join(out_dir, 'saved'))
    data = OnPolicyDataModule(num_train=60, num_val=12, prompts_per_step=2, group_size=2, val_batch_size=6)
    trainer = L.Trainer(accelerator="cpu", devices=2, strategy=ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1),
                        max_steps=2, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, limit_val_batches=1, val_check_interval=2, check_val_every_n_epoch=None)
    trainer.fit(module, datamodule=data)
    full = {k: (v.full_tensor() if hasattr(v, "full_tensor") else v) for k, v in module.policy.state_dict().items()}
    result = {
        "rank": trainer.global_rank,
        "sharded": type(module.policy.blocks[0]).__name__,
        "checksum": float(sum(v.double().abs().sum() for v in full.values())),
        "loss": float(trainer.logged_metrics["train/loss"]),
        "geneval": float(trainer.logged_metrics["val/geneval/overall"]),
    }
    if trainer.is_global_zero:  # the saved full weights equal the gathered ones
        saved = TinyUnifiedModel.from_pretrained(os.path.join(out_dir, "saved")).state_dict()
        result["saved_checksum"] = float(sum(v.double().abs().sum() for v in saved.values()))
    with open(os.path.join(out_dir, f"rank{trainer.global_rank}.json"), "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    main(sys.argv[1])
