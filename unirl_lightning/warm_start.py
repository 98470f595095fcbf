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
from typing import Callable

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


def cache_dir(kind: str, policy, recipe: dict) -> Path:
    """`$UNIRL_CACHE/<kind>/<hash of policy.config + recipe>`: one folder per architecture and recipe."""
    cfg = getattr(policy, "config", None)
    if cfg is None:
        raise TypeError(f"warm_start='auto' ({kind}) is for the built-in models; "
                        f"give {type(policy).__name__} a folder written by save_pretrained, or null")
    key = json.dumps({"model": asdict(cfg), "recipe": recipe, "v": 1}, sort_keys=True)
    return cache_root() / kind / hashlib.sha256(key.encode()).hexdigest()[:16]


def cached_training(kind: str, policy, recipe: dict, train: Callable[[Path], None]) -> Path:
    """The cache folder of (kind, policy config, recipe); when it is absent, `train(folder)` writes
    the model into a scratch folder that is then renamed into place, so a run killed half way
    never leaves a cache that later runs would pick up."""
    target = cache_dir(kind, policy, recipe)
    if (target / "model.safetensors").is_file():
        return target
    print(f"[unirl_lightning] no cached {kind.replace('_', ' ')} at {target}: training it ({recipe['max_steps']} steps, once)")
    tmp = target.with_name(target.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    train(tmp)
    tmp.parent.mkdir(parents=True, exist_ok=True)
    tmp.rename(target)
    return target


def warm_start_dir(policy, recipe: dict | None = None) -> Path:
    """The cache folder of `policy`'s architecture + the recipe."""
    return cache_dir("warm_start", policy, {**RECIPE, **(recipe or {})})


def ensure_warm_start(policy, recipe: dict | None = None) -> Path:
    """Folder of the cached warm start for `policy`'s config, training it first if absent."""
    r = {**RECIPE, **(recipe or {})}

    def train(folder: Path) -> None:
        import lightning as L

        from unirl_lightning.callbacks.progress import StepProgress

        from unirl_lightning.data.rendered import RenderedSceneDataModule
        from unirl_lightning.modules.pretrain import WarmStartPretrain

        module = WarmStartPretrain(type(policy)(policy.config), lr=r["lr"], warmup_steps=r["warmup_steps"],
                                   max_steps=r["max_steps"], cfg_dropout=r["cfg_dropout"], save_to=str(folder))
        world = policy.world_config
        data = RenderedSceneDataModule(batch_size=r["batch_size"], canvas=world.canvas, sizes=world.sizes,
                                       grid=world.grid, num_train=r["num_train"], seed=r["seed"])
        L.seed_everything(r["seed"], verbose=False)
        target = folder.with_name(folder.name.removesuffix(".partial"))
        logger = L.pytorch.loggers.TensorBoardLogger(save_dir=str(target.parent), name=target.name + "_logs")
        trainer = L.Trainer(max_steps=r["max_steps"], logger=logger, enable_checkpointing=False, accelerator="cpu",
                            devices=1, val_check_interval=r["val_every"], check_val_every_n_epoch=None,
                            limit_val_batches=2, log_every_n_steps=10, enable_model_summary=False,
                            callbacks=[StepProgress("warm start")])
        trainer.fit(module, datamodule=data)

    return cached_training("warm_start", policy, r, train)
