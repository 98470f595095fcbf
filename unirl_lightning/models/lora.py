"""LoRA adapters on a flow transformer (peft, through diffusers' adapter API).

With LoRA the frozen base model *is* the reference: the regulariser's reference pass runs with the
adapters disabled, so no second copy of the transformer is held (as TRL does with peft). Saved
policies are plain weights, the adapters merged in: W = W_base + (alpha / r) * B @ A.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator, Sequence

from torch import Tensor, nn

#: SD3's joint-attention projections (image and text streams), the modules Flow-GRPO adapts.
SD3_LORA_TARGETS: tuple[str, ...] = (
    "attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0",
    "attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj", "attn.to_add_out",
)


def add_lora(transformer: nn.Module, rank: int, alpha: float | None = None,
             targets: Sequence[str] | None = None) -> float:
    """Freezes `transformer` (a diffusers model) and adds a trainable rank-`rank` LoRA adapter
    ("default") on `targets` (None: those of `SD3_LORA_TARGETS` it has; a single-block model's
    last block has no `to_add_out`); B starts at zero, so the adapted model starts equal to the
    base. Returns the adapter's scaling alpha / r."""
    if rank < 1:
        raise ValueError(f"model.lora_rank must be >= 1 (0 = full fine-tuning), got {rank}")
    try:
        from peft import LoraConfig
    except ImportError as err:
        raise ImportError(
            "LoRA needs peft: pip install 'unirl-lightning[lora]' (or pip install peft)"
        ) from err
    if targets is None:
        names = [name for name, _ in transformer.named_modules()]
        targets = [t for t in SD3_LORA_TARGETS if any(n.endswith("." + t) for n in names)]
    check_lora_targets(transformer, targets)
    alpha = float(rank if alpha is None else alpha)
    transformer.requires_grad_(False)
    transformer.add_adapter(LoraConfig(r=rank, lora_alpha=alpha, target_modules=list(targets)))
    return alpha / rank


def check_lora_targets(transformer: nn.Module, targets: Sequence[str]) -> None:
    """Raises a clear error for a target (peft's suffix match on module names) that names no
    module, so a typo fails before any compute."""
    names = [name for name, _ in transformer.named_modules()]
    missing = [t for t in targets if not any(n == t or n.endswith("." + t) for n in names)]
    if missing:
        raise ValueError(
            f"model.lora_target_modules: {missing} name no module of {type(transformer).__name__} "
            f"(e.g. {SD3_LORA_TARGETS[:4]}); fix the names or leave it null for the default"
        )


@contextmanager
def adapters_disabled(transformer: nn.Module) -> Iterator[None]:
    """Runs the base model (the reference) inside the block."""
    transformer.disable_adapters()
    try:
        yield
    finally:
        transformer.enable_adapters()


def merge_lora(state: dict[str, Tensor], scaling: float) -> dict[str, Tensor]:
    """A peft state dict -> plain weights: `p.base_layer.weight + scaling * p.lora_B @ p.lora_A` under
    `p.weight`, `p.base_layer.bias` under `p.bias`, adapter tensors dropped. Works on gathered
    (FSDP) state dicts; a state dict without adapters comes back as it is."""
    if not any(".lora_A." in k for k in state):
        return state
    merged: dict[str, Tensor] = {}
    for key, value in state.items():
        if ".lora_A." in key or ".lora_B." in key:
            continue
        if ".base_layer." not in key:
            merged[key] = value
            continue
        prefix, leaf = key.split(".base_layer.")
        if leaf == "weight":
            a, b = state[f"{prefix}.lora_A.default.weight"], state[f"{prefix}.lora_B.default.weight"]
            value = (value.float() + scaling * (b.float() @ a.float())).to(value.dtype)
        merged[f"{prefix}.{leaf}"] = value
    return merged
