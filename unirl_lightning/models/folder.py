"""The built-in models' folder format: `config.json` (the config dataclass) + `model.safetensors`."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

from torch import Tensor, nn


def save_folder(path: str | Path, config: Any, weights: dict[str, Tensor]) -> None:
    """Writes `config` (a dataclass) and `weights` (moved to CPU, contiguous) into `path`."""
    from safetensors.torch import save_file

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(asdict(config), indent=1))
    save_file({k: v.detach().cpu().contiguous() for k, v in weights.items()}, str(path / "model.safetensors"))


def read_config(path: str | Path, model_name: str) -> dict[str, Any]:
    """The saved config of a folder, with a clear error when `path` is not one of `model_name`'s."""
    file = Path(path) / "config.json"
    if not file.is_file():
        raise FileNotFoundError(
            f"{path} holds no config.json: not a {model_name} folder (see save_pretrained)"
        )
    return json.loads(file.read_text())


def load_weights(model: nn.Module, path: str | Path) -> nn.Module:
    """Loads `path/model.safetensors` into `model` (strict) and returns it."""
    from safetensors.torch import load_file

    model.load_state_dict(load_file(str(Path(path) / "model.safetensors")))
    return model
