"""Straight-through Gumbel-softmax: discrete image tokens that pass gradients (UniRL end-to-end).

``y @ E`` (E the image-token embedding matrix) then feeds the understanding pass with exactly
the embeddings of the sampled tokens, while the answer loss reaches the generation logits.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor


def gumbel_noise(shape: Sequence[int], generator: torch.Generator | None = None,
                 device: torch.device | str | None = None) -> Tensor:
    """Standard Gumbel noise `-log(-log U)`, float32 `shape`: `argmax(logits + g)` samples from
    `softmax(logits)`. Drawn on the generator's device and moved to `device`, so a CPU generator
    seeds sampling on a GPU the same way."""
    where = generator.device if generator is not None else device
    u = torch.rand(tuple(shape), generator=generator, device=where, dtype=torch.float32)
    # rand is in [0, 1): clamping away 0 keeps g finite (1 - 2^-24 still gives a finite -log U).
    return (-(-u.clamp_min(torch.finfo(torch.float32).tiny).log()).log()).to(device or where)


def straight_through_gumbel(
    logits: Tensor,
    tau: float = 1.0,
    generator: torch.Generator | None = None,
    hard: bool = True,
) -> tuple[Tensor, Tensor]:
    """Sample ``index = argmax(logits + g)``, ``g ~ Gumbel(0, 1)``, with a relaxed gradient.

    Args:
        logits: [..., V] unnormalised log-probs.
        tau: temperature of the relaxation ``y_soft = softmax((logits + g) / tau)``.
        generator: optional ``torch.Generator`` for reproducible noise; noise is drawn on the
            generator's device and moved to ``logits``' device.
        hard: if True, ``y`` is exactly ``one_hot(index)`` in the forward pass and carries the
            gradient of ``y_soft`` (straight-through); if False, ``y = y_soft``.

    Returns:
        ``(y, index)``: y [..., V] in ``logits``' dtype, index [...] long (argmax of y_soft).
    """
    if tau <= 0:
        raise ValueError(f"tau must be > 0, got {tau}")
    z = logits.float()
    g = gumbel_noise(z.shape, generator, z.device)
    y_soft = ((z + g) / tau).softmax(-1)
    index = y_soft.argmax(-1)
    if not hard:
        return y_soft.to(logits.dtype), index
    y_hard = F.one_hot(index, z.shape[-1]).to(y_soft.dtype)
    # (y_soft - y_soft.detach()) is exactly 0 forward, so y is exactly one-hot; backward it is
    # the identity on y_soft. (The usual y_hard - y_soft.detach() + y_soft is only ~one-hot.)
    y = y_hard + (y_soft - y_soft.detach())
    return y.to(logits.dtype), index
