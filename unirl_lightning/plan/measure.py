"""Measured activation memory: the bytes autograd saves for backward during a forward, each storage
once (what the plan's activation estimate predicts), and the peak allocation of a forward + backward."""

from __future__ import annotations

from typing import Callable, Iterable

import torch
from torch import Tensor, nn


def saved_activation_bytes(fn: Callable[[], Tensor], params: Iterable[nn.Parameter]) -> tuple[Tensor, int]:
    """Runs `fn` (a forward with gradients) and returns (its output, the bytes of the tensors autograd
    saved for backward, each storage once), leaving out the parameters themselves and their
    autocast copies (weights are counted as parameters, not activations)."""
    params = list(params)
    param_ptrs = {p.untyped_storage().data_ptr() for p in params}
    weight_shapes = {tuple(p.shape) for p in params}
    storages: dict[int, int] = {}

    def pack(t: Tensor) -> Tensor:
        if t.device.type != "meta":
            ptr = t.untyped_storage().data_ptr()
            is_weight_copy = t.dtype != torch.float32 and tuple(t.shape) in weight_shapes
            if ptr not in param_ptrs and not is_weight_copy:
                storages[ptr] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, sum(storages.values())
