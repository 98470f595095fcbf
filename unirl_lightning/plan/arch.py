"""Architecture facts: the published configs of the real models (`configs/arch/*.json`), and the real
classes built from them on the meta device (shapes only, no weights, no memory).

An arch file is `{"_source", "_class", "config"}` for one model, or `{"_source", "_class",
"components": {name: {"_class", "config"}}}` for a diffusers pipeline. A local model folder is read
directly: its `config.json` (transformers, or a diffusers model), or a pipeline's `model_index.json`
with one `config.json` per component folder.
"""

from __future__ import annotations

import importlib
import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

#: where the arch files ship: the repository's configs/arch
ARCH_DIR = Path(__file__).resolve().parents[2] / "configs" / "arch"

#: model ids of the recipe configs -> their arch file
KNOWN_MODELS: dict[str, str] = {
    "deepseek-community/Janus-Pro-7B": "janus_pro_7b.json",
    "deepseek-community/Janus-Pro-1B": "janus_pro_1b.json",
    "stabilityai/stable-diffusion-3.5-medium": "sd35_medium.json",
    "black-forest-labs/FLUX.1-dev": "flux1_dev.json",
    "google/owlv2-base-patch16-ensemble": "owlv2_base_patch16_ensemble.json",
    "facebook/mask2former-swin-small-coco-instance": "mask2former_swin_small_coco_instance.json",
    "openai/clip-vit-large-patch14": "clip_vit_large_patch14.json",
    "yuvalkirstain/PickScore_v1": "pickscore_v1.json",
}


#: model_type -> class, for a transformers config.json that names no architectures
_BY_TYPE = {
    "janus": "JanusForConditionalGeneration",
    "owlv2": "Owlv2ForObjectDetection",
    "mask2former": "Mask2FormerForUniversalSegmentation",
    "clip": "CLIPModel",
}


class PlanError(ValueError):
    """A config the plan cannot read; the message names the file or field and the fix."""


def load_arch(model: str, field: str = "model") -> dict[str, Any]:
    """The arch facts of `model` (a known id, an arch JSON file or a local model folder); `field`
    names the config field that gave it, for errors."""
    path = Path(model)
    if model in KNOWN_MODELS:
        path = ARCH_DIR / KNOWN_MODELS[model]
    elif path.is_dir():
        return _read_folder(path, field)
    if not path.is_file():
        known = ", ".join(sorted(KNOWN_MODELS))
        raise PlanError(
            f"{field}: {model!r} is neither a model the plan knows ({known}) nor a local folder "
            f"with a config.json; point it at a local copy of the model or add an arch file to "
            f"{ARCH_DIR}"
        )
    return json.loads(path.read_text())


def _read_folder(path: Path, field: str) -> dict[str, Any]:
    index = path / "model_index.json"
    if index.is_file():  # a diffusers pipeline: one config.json per component folder
        spec = json.loads(index.read_text())
        components = {}
        for name, entry in spec.items():
            cfg = path / name / "config.json"
            if name.startswith("_") or not isinstance(entry, list) or None in entry or not cfg.is_file():
                continue
            library, cls = entry
            components[name] = {"_class": f"{library}.{cls}", "config": json.loads(cfg.read_text())}
        return {
            "_source": str(path),
            "_class": f"diffusers.{spec['_class_name']}",
            "components": components,
        }
    cfg = path / "config.json"
    if not cfg.is_file():
        raise PlanError(f"{field}: the folder {str(path)!r} has no config.json or model_index.json")
    config = json.loads(cfg.read_text())
    if "_class_name" in config:
        return {"_source": str(cfg), "_class": f"diffusers.{config['_class_name']}", "config": config}
    archs = config.get("architectures") or [_BY_TYPE.get(config.get("model_type"))]
    if not archs[0]:
        raise PlanError(f"{field}: {cfg} names no architecture ('architectures' or '_class_name')")
    return {"_source": str(cfg), "_class": f"transformers.{archs[0]}", "config": config}


def build_meta(entry: dict[str, Any]) -> nn.Module:
    """The real class of `entry` (`{"_class", "config"}`) on the meta device: exact parameter shapes."""
    library, name = entry["_class"].split(".", 1)
    cls = getattr(importlib.import_module(library), name)
    config = {k: v for k, v in entry["config"].items() if not k.startswith("_")}
    with torch.device("meta"):
        if library == "diffusers":
            return cls.from_config(config)
        config_cls = cls.config_class
        return cls(config_cls(**config))


def component(arch: dict[str, Any], name: str | None = None) -> dict[str, Any]:
    """One model entry of an arch: the model itself, or pipeline component `name`."""
    if name is None:
        return arch
    try:
        return arch["components"][name]
    except KeyError:
        raise PlanError(f"{arch.get('_source')}: no component {name!r}") from None


def count(module: nn.Module) -> tuple[int, int]:
    """(parameters, trainable parameters) of `module`, shared (tied) parameters once."""
    seen: dict[int, nn.Parameter] = {id(p): p for p in module.parameters()}
    total = sum(p.numel() for p in seen.values())
    return total, sum(p.numel() for p in seen.values() if p.requires_grad)
