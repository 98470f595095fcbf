"""Classifier-free guidance, the one formula every policy family uses for rollouts and re-scoring
alike (whatever the rollout used, the training log-probs must use the same, or ratios drift)."""

from __future__ import annotations

from einops import rearrange
from torch import Tensor


def cfg_combine(cond: Tensor, uncond: Tensor, scale: float) -> Tensor:
    """`uncond + scale * (cond - uncond)` (Janus' and SD3's form; Show-o's `(1 + g) c - g u` is scale 1 +
    g)."""
    return uncond + scale * (cond - uncond)


def guided_logits(logits: Tensor, cfg_scale: float, temperature: float) -> Tensor:
    """Logits `[2B, ..., K]` with rows `[cond; uncond]` (`[B, ..., K]`, conditional only, when
    `cfg_scale == 1`) -> float32 guided logits `[B, ..., K]` divided by `temperature` (0: greedy,
    left unscaled)."""
    logits = logits.float()
    if cfg_scale != 1.0:
        cond, uncond = rearrange(logits, "(two b) ... -> two b ...", two=2)
        logits = cfg_combine(cond, uncond, cfg_scale)
    return logits / temperature if temperature > 0 else logits
