"""The settings of a recipe config that decide its memory, as one flat dict (what the plan reads and
what its knobs change)."""

from __future__ import annotations

from typing import Any

from unirl_lightning.plan.arch import PlanError
from unirl_lightning.plan.recipe import get

#: policies the plan can build from architecture facts, by class name
JANUS, SD3, FLUX = "JanusPolicy", "DiffusersFlowPolicy", "DiffusersFluxPolicy"


def _world(cfg: Any) -> int:
    devices, nodes = get(cfg, "trainer.devices", "auto"), int(get(cfg, "trainer.num_nodes", 1))
    if isinstance(devices, (list, tuple)):
        return len(devices) * nodes
    if isinstance(devices, str):
        if devices in ("auto", "-1"):
            raise PlanError(
                "trainer.devices: 'auto' / -1 depends on the machine; give the GPU count "
                "(e.g. --trainer.devices 8) so the plan knows the ranks"
            )
        devices = len(devices.split(",")) if "," in devices else int(devices)
    return int(devices) * nodes


def _sharding(cfg: Any, world: int) -> tuple[str, int]:
    """(strategy name, ranks that share one copy's shards: 1 = replicated)."""
    strategy = get(cfg, "trainer.strategy", "auto")
    name = strategy if isinstance(strategy, str) else str(get(strategy, "class_path", "")).rsplit(".", 1)[-1]
    if name == "ModelParallelStrategy":
        dp = get(strategy, "init_args.data_parallel_size", "auto")
        return name, world if dp == "auto" else int(dp)
    if "fsdp" in name.lower():
        return name, world
    return name, 1


def read_settings(cfg: Any) -> dict[str, Any]:
    """The memory-relevant settings of a parsed recipe config (`recipe.parse_recipe`)."""
    model = get(cfg, "model.init_args")
    policy_cls = str(get(cfg, "model.init_args.policy.class_path", "")).rsplit(".", 1)[-1]
    pol = get(cfg, "model.init_args.policy.init_args")
    if policy_cls not in (JANUS, SD3, FLUX):
        raise PlanError(
            f"model.init_args.policy: the plan builds {JANUS}, {SD3} and {FLUX} from their "
            f"published architectures, not {policy_cls or 'this policy'}; the built-in models "
            f"of the CPU configs fit in any GPU"
        )
    world = _world(cfg)
    strategy, shard = _sharding(cfg, world)
    det = get(model, "detector")
    detector = None
    if det is not None and str(get(det, "class_path", "")).endswith(
        ("PretrainedDetector", "Mask2FormerDetector")
    ):
        paths = (
            get(det, "init_args.detector_path"),
            get(det, "init_args.model_path"),
            get(det, "init_args.clip_path"),
        )
        detector = {
            "paths": [p for p in paths if p],
            "device": str(get(det, "init_args.device", "cpu")),
        }
    reward_models = []
    for i, reward in enumerate(get(model, "rewards", []) or []):
        args = get(reward, "init_args") or {}
        path = args.get("model_path") or _default_reward_model(str(get(reward, "class_path", "")))
        if path:
            reward_models.append(
                {
                    "field": f"model.init_args.rewards[{i}].init_args.model_path",
                    "path": path,
                    "name": str(get(reward, "class_path")).rsplit(".", 1)[-1],
                    "device": str(args.get("device", "cpu")),
                    "dtype": str(args.get("dtype", "float32")),
                }
            )
    return {
        "recipe": str(get(cfg, "model.class_path")).rsplit(".", 1)[-1],
        "policy": policy_cls,
        "model": get(pol, "model_path") if policy_cls == JANUS else get(pol, "pretrained"),
        "torch_dtype": get(pol, "torch_dtype", "float32"),
        "gradient_checkpointing": bool(get(pol, "gradient_checkpointing", False)),
        "freeze_vq": bool(get(pol, "freeze_vq", True)),
        "resolution": int(get(pol, "resolution", 512)),
        "max_sequence_length": int(get(pol, "max_sequence_length", 128)),
        "drop_t5": bool(get(pol, "drop_t5", False)),
        "lora_rank": int(get(model, "lora_rank", 0)),
        "lora_alpha": get(model, "lora_alpha"),
        "lora_targets": get(model, "lora_target_modules"),
        "precision": str(get(cfg, "trainer.precision", "32-true")),
        "world": world,
        "strategy": strategy,
        "shard_ranks": shard,
        "micro_batch_size": int(
            get(model, "micro_batch_size", get(cfg, "data.init_args.prompts_per_step", 1))
        ),
        "prompts_per_step": int(get(cfg, "data.init_args.prompts_per_step", 1)),
        "cfg_scale": float(get(model, "cfg_scale", 1.0)),
        "beta": float(get(model, "beta", 0.0)),
        "regularizer": str(get(model, "regularizer", "none")),
        "track_reference": bool(get(model, "track_reference", True)),
        "ema_beta": float(get(model, "ema_beta", 0.0)),
        "image_weight": float(get(model, "image_weight", 1.0)),
        "answer_weight": float(get(model, "answer_weight", 0.0)),
        "end_to_end": bool(get(model, "end_to_end", False)),
        "detector": detector,
        "reward_models": reward_models,
    }


def _default_reward_model(class_path: str) -> str | None:
    """The model a model-scored reward loads when its config names none (its `model_path` default)."""
    import importlib
    import inspect

    module, _, name = class_path.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError):
        return None
    default = inspect.signature(cls).parameters.get("model_path")
    value = (
        getattr(cls, "default_model", None) if default is None or default.default is None else default.default
    )
    return value if isinstance(value, str) else None
