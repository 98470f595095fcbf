"""What a checkpoint must agree with to be resumed, and the learning rates a resumed run may change.

A resumed run is the run that would have happened only if it trains the same model on the same
stream with the same objective. `run_settings` records those settings in every checkpoint (the
recipe's hyper-parameters, the policy's class and config, the rewards, the DataModule's settings);
`check_resume_settings` refuses a resume whose settings differ, naming each field, unless the user
overrides. Fields that only touch saving, logging or validation, and the learning rate, may change.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.utilities import rank_zero_warn

#: fields that may differ at resume: saving, warm starts (unused on resume), validation, the LR
CHANGEABLE = {
    "model.lr",
    "model.text_lr",
    "model.save_to",
    "model.overwrite",
    "model.warm_start",
    "model.text_warm_start",
    "model.grid_size",
    "data.val_batch_size",
}
CHANGEABLE_PREFIXES = ("model.eval_",)


def _class_name(obj: Any) -> str:
    return f"{type(obj).__module__}.{type(obj).__qualname__}"


def config_of(model: Any) -> dict[str, Any] | None:
    """A policy's config as a dict: the built-in models' dataclass, or the wrapped transformers /
    diffusers model's config (None when there is none)."""
    config = getattr(model, "config", None)
    for inner in ("model", "transformer"):
        if config is None:
            config = getattr(getattr(model, inner, None), "config", None)
    if dataclasses.is_dataclass(config) and not isinstance(config, type):
        return dataclasses.asdict(config)
    if hasattr(config, "to_dict"):
        return config.to_dict()
    return dict(config) if isinstance(config, dict) else None


def flatten(tree: dict[str, Any], prefix: str = "", skip: frozenset[str] = frozenset()) -> dict[str, Any]:
    """`{"a": {"b": 1}}` -> `{"a.b": 1}` (tuples as lists); keys starting with "_" or in `skip` are
    left out."""
    out: dict[str, Any] = {}
    for key, value in tree.items():
        key = str(key)  # e.g. transformers' id2label has int keys
        if key.startswith("_") or key in skip:
            continue
        if isinstance(value, dict) and value:
            out.update(flatten(value, f"{prefix}{key}.", skip))
        else:
            out[f"{prefix}{key}"] = list(value) if isinstance(value, tuple) else value
    return out


def short(value: Any, width: int = 120) -> str:
    """`repr(value)`, cut to `width` characters."""
    text = repr(value)
    return text if len(text) <= width else text[: width - 3] + "..."


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, (set, frozenset)):
        return sorted(obj, key=str)
    return f"<{type(obj).__qualname__}>"  # an object without settings of its own (e.g. a detector)


def _plain(obj: Any) -> Any:
    """JSON-comparable copy (tuples become lists)."""
    return json.loads(json.dumps(obj, default=_jsonable, sort_keys=True))


def _describe(obj: Any) -> dict[str, Any]:
    """An object's class and its public plain-valued attributes (a reward's weight, mode, name...)."""
    simple = (int, float, str, bool, type(None), list, tuple, dict)
    attrs = {k: v for k, v in vars(obj).items() if not k.startswith("_") and isinstance(v, simple)}
    return {"class": _class_name(obj), **attrs}


def run_settings(module: L.LightningModule) -> dict[str, Any]:
    """The settings a checkpoint of `module` is resumed under, as a JSON-comparable nested dict."""
    settings: dict[str, Any] = {
        "model": {"class": _class_name(module), **{k: v for k, v in module.hparams.items() if k[0] != "_"}}
    }
    for name in ("policy", "text_policy"):
        model = getattr(module, name, None)
        if model is not None:
            settings[name] = {"class": _class_name(model), "config": config_of(model)}
    if getattr(module, "rewards", None):
        settings["rewards"] = [_describe(r) for r in module.rewards]
    datamodule = module._trainer.datamodule if module._trainer is not None else None
    if datamodule is not None:
        hp = {k: v for k, v in datamodule.hparams.items() if k[0] != "_"}
        settings["data"] = {"class": _class_name(datamodule), **hp}
    return _plain(settings)


def changed_settings(saved: dict[str, Any], current: dict[str, Any]) -> list[tuple[str, Any, Any]]:
    """(field, checkpoint's value, this run's value) for each field that differs and may not."""
    missing = "(not set)"
    a, b = flatten(saved), flatten(current)
    fields = sorted(set(a) | set(b))
    return [
        (f, a.get(f, missing), b.get(f, missing))
        for f in fields
        if a.get(f, missing) != b.get(f, missing)
        and f not in CHANGEABLE
        and not f.startswith(CHANGEABLE_PREFIXES)
    ]


def check_resume_settings(saved: dict[str, Any], current: dict[str, Any], override: bool) -> None:
    """Raise (or, with `override`, warn) when the checkpoint's settings differ from this run's."""
    diffs = changed_settings(saved, current)
    if not diffs:
        return

    lines = "\n".join(f"  {f}: checkpoint {short(old)}, this run {short(new)}" for f, old, new in diffs[:25])
    more = f"\n  ... and {len(diffs) - 25} more" if len(diffs) > 25 else ""
    if override:
        rank_zero_warn(f"resuming with settings that differ from the checkpoint's:\n{lines}{more}")
        return
    raise ValueError(
        f"ckpt_path: the checkpoint was written by a run with other settings:\n{lines}{more}\n"
        "Resume with the checkpoint's settings (the same config files and overrides), or pass "
        "--override_checkpoint_settings true to train on with these. The learning rate, trainer "
        "settings (max_steps, logging, callbacks), save_to and validation settings may change freely."
    )


def lr_by_group(hparams: dict[str, Any]) -> list[float]:
    """Configured learning rate per optimiser parameter group (one LR for every group)."""
    return [float(hparams["lr"])]


def rescale_resumed_lrs(
    module: L.LightningModule, saved: list[float], current: list[float]
) -> dict[int, float]:
    """After the optimiser and schedule are restored: scale each parameter group whose configured LR
    changed (its LR, its schedule's base LR) so the run goes on at the new LR where the schedule
    stands. Returns {group: new LR} for the groups changed."""
    optimizers = module.optimizers(use_pl_optimizer=False)
    optimizers = optimizers if isinstance(optimizers, list) else [optimizers]
    schedulers = module.lr_schedulers() or []
    schedulers = schedulers if isinstance(schedulers, list) else [schedulers]
    changed: dict[int, float] = {}
    for opt in optimizers:
        for i, group in enumerate(opt.param_groups):
            old, new = saved[min(i, len(saved) - 1)], current[min(i, len(current) - 1)]
            if old == new or old == 0:
                continue
            ratio = new / old
            group["lr"] *= ratio
            if "initial_lr" in group:
                group["initial_lr"] *= ratio
            for sched in schedulers:
                if sched.optimizer is opt and hasattr(sched, "base_lrs"):
                    sched.base_lrs[i] *= ratio
            changed[i] = new
    return changed
