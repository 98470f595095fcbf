"""Straight-through Gumbel-softmax: discrete image tokens that pass gradients (UniRL end-to-end).

``y @ E`` (E the image-token embedding matrix) then feeds the understanding pass with exactly
the embeddings of the sampled tokens, while the answer loss reaches the generation logits.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


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
    device = generator.device if generator is not None else logits.device
    z = logits.float()
    u = torch.rand(z.shape, generator=generator, device=device, dtype=torch.float32).to(z.device)
    # rand is in [0, 1): clamping away 0 keeps g finite.
    g = -(-u.clamp_min(torch.finfo(torch.float32).tiny).log()).log()
    y_soft = ((z + g) / tau).softmax(-1)
    index = y_soft.argmax(-1)
    if not hard:
        return y_soft.to(logits.dtype), index
    y_hard = F.one_hot(index, z.shape[-1]).to(y_soft.dtype)
    # (y_soft - y_soft.detach()) is exactly 0 forward, so y is exactly one-hot; backward it is
    # the identity on y_soft. (The usual y_hard - y_soft.detach() + y_soft is only ~one-hot.)
    y = y_hard + (y_soft - y_soft.detach())
    return y.to(logits.dtype), index
