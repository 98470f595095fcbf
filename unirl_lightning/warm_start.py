"""The cached warm start of the built-in model, trained on first use.

Post-training recipes start from a model that already draws and answers roughly right. The
first run trains it (`WarmStartPretrain`, the same recipe as `configs/pretrain.yaml`) with a
progress bar and caches it under `$UNIRL_CACHE` (default `~/.cache/unirl_lightning`), keyed by
the model config and the recipe, so every later run reuses it.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import asdict
from pathlib import Path

#: The warm-start recipe (keep in step with configs/pretrain.yaml).
RECIPE = {
    "max_steps": 1200,
    "batch_size": 64,
    "lr": 1e-3,
    "warmup_steps": 100,
    "cfg_dropout": 0.1,
    "num_train": 4000,
    "seed": 0,
    "val_every": 200,
}


def cache_root() -> Path:
    return Path(os.environ.get("UNIRL_CACHE", Path.home() / ".cache" / "unirl_lightning"))


def warm_start_dir(policy) -> Path:
    """The cache folder of `policy`'s architecture + the recipe."""
    cfg = getattr(policy, "config", None)
    if cfg is None:
        raise TypeError(f"warm_start='auto' is for the built-in model; give {type(policy).__name__} a folder or null")
    key = json.dumps({"model": asdict(cfg), "recipe": RECIPE, "v": 1}, sort_keys=True)
    return cache_root() / "warm_start" / hashlib.sha256(key.encode()).hexdigest()[:16]


def ensure_warm_start(policy, recipe: dict | None = None) -> Path:
    """Folder of the cached warm start for `policy`'s config, training it first if absent."""
    target = warm_start_dir(policy)
    if (target / "model.safetensors").is_file():
        return target
    import lightning as L

    from unirl_lightning.data.rendered import RenderedSceneDataModule
    from unirl_lightning.modules.pretrain import WarmStartPretrain

    r = {**RECIPE, **(recipe or {})}
    print(f"[unirl_lightning] no cached warm start at {target}: training it ({r['max_steps']} steps, once)")
    fresh = type(policy)(policy.config)
    tmp = target.with_name(target.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    module = WarmStartPretrain(fresh, lr=r["lr"], warmup_steps=r["warmup_steps"], max_steps=r["max_steps"],
                               cfg_dropout=r["cfg_dropout"], save_to=str(tmp))
    world = policy.world_config
    data = RenderedSceneDataModule(batch_size=r["batch_size"], canvas=world.canvas, sizes=world.sizes, grid=world.grid,
                                   num_train=r["num_train"], seed=r["seed"])
    L.seed_everything(r["seed"], verbose=False)
    logger = L.pytorch.loggers.TensorBoardLogger(save_dir=str(target.parent), name=target.name + "_logs")
    trainer = L.Trainer(max_steps=r["max_steps"], logger=logger, enable_checkpointing=False, accelerator="cpu",
                        devices=1, val_check_interval=r["val_every"], check_val_every_n_epoch=None,
                        limit_val_batches=2, log_every_n_steps=10, enable_model_summary=False)
    trainer.fit(module, datamodule=data)
    tmp.rename(target)  # atomic: a half-written cache is never picked up
    return target
