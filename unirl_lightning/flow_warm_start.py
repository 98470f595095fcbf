"""The cached flow-matching warm start of the built-in flow model, trained on first use.

Mirrors `warm_start.py` (the discrete model's): the first run trains `FlowWarmStart` (the recipe
of `configs/pretrain_flow.yaml`) on scenes rendered on the model's cell grid and caches the result
under `$UNIRL_CACHE/flow_warm_start/<hash of model config + recipe>`; later runs reuse it.
"""

from __future__ import annotations

from pathlib import Path

from unirl_lightning.warm_start import cache_dir, cached_training

#: The flow warm-start recipe (keep in step with configs/pretrain_flow.yaml).
RECIPE = {
    "max_steps": 2000,
    "batch_size": 64,
    "lr": 1e-3,
    "warmup_steps": 100,
    "cfg_dropout": 0.1,
    "t_sampling": "logit_normal",
    "num_train": 4000,
    "seed": 0,
}


def flow_warm_start_dir(policy, recipe: dict | None = None) -> Path:
    """The cache folder of `policy`'s config + the recipe."""
    return cache_dir("flow_warm_start", policy, {**RECIPE, **(recipe or {})})


def ensure_flow_warm_start(policy, recipe: dict | None = None) -> Path:
    """Folder of the cached flow warm start for `policy`'s config, training it first if absent."""
    r = {**RECIPE, **(recipe or {})}

    def train(folder: Path) -> None:
        import lightning as L

        from unirl_lightning.callbacks.progress import StepProgress

        from unirl_lightning.data import FlowSceneDataModule
        from unirl_lightning.modules.flow_pretrain import FlowWarmStart

        module = FlowWarmStart(type(policy)(policy.config), lr=r["lr"], warmup_steps=r["warmup_steps"],
                               max_steps=r["max_steps"], cfg_dropout=r["cfg_dropout"], t_sampling=r["t_sampling"],
                               save_to=str(folder))
        world = policy.config.world
        data = FlowSceneDataModule(grid=world.grid, gap=world.gap, batch_size=r["batch_size"], canvas=world.canvas,
                                   sizes=world.sizes, num_train=r["num_train"], seed=r["seed"])
        L.seed_everything(r["seed"], verbose=False)
        trainer = L.Trainer(max_steps=r["max_steps"], logger=False, enable_checkpointing=False, limit_val_batches=0,
                            accelerator="cpu", devices=1, enable_model_summary=False,
                            callbacks=[StepProgress("flow warm start")])
        trainer.fit(module, datamodule=data)

    return cached_training("flow_warm_start", policy, r, train)
