"""Per-token estimators of KL(pi || pi_ref) from samples of pi (Schulman, "Approximating KL").

With d = logp_ref - logp for a token sampled from pi:
k1 = -d (unbiased, high variance, can be negative), k2 = d^2 / 2 (biased, >= 0),
k3 = exp(d) - d - 1 (unbiased, >= 0; the GRPO / TRL choice).
All take and return tensors of the same shape, e.g. [B, T].
"""

from __future__ import annotations

from torch import Tensor


def kl_k1(logp: Tensor, ref_logp: Tensor) -> Tensor:
    """k1 = logp - ref_logp, per token."""
    return logp - ref_logp


def kl_k2(logp: Tensor, ref_logp: Tensor) -> Tensor:
    """k2 = (logp - ref_logp)^2 / 2, per token."""
    return 0.5 * (logp - ref_logp).square()


def kl_k3(logp: Tensor, ref_logp: Tensor) -> Tensor:
    """k3 = exp(ref - logp) - (ref - logp) - 1, per token; >= 0, and 0 exactly when equal."""
    d = ref_logp - logp
    # expm1 keeps precision for small d (the usual regime) and rounds to >= d, so k3 >= 0.
    return d.expm1() - d
