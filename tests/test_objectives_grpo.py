"""Advantages, clipped policy loss, KL estimators and straight-through Gumbel, pinned to formulas."""

from __future__ import annotations

import math
import statistics

import pytest
import torch
from torch.testing import assert_close

from unirl_lightning.objectives import (
    LOSS_TYPES,
    group_advantages,
    kl_k1,
    kl_k2,
    kl_k3,
    policy_loss,
    straight_through_gumbel,
    zero_std_fraction,
)

# ----------------------------------------------------------------------------- advantages


def _shuffled_groups(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Rewards in 4 groups of 6 with arbitrary, non-contiguous ids, in shuffled order."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.tensor([42, 7, 1000, 3]).repeat_interleave(6)
    perm = torch.randperm(ids.numel(), generator=g)
    return torch.rand(ids.numel(), generator=g, dtype=torch.float64)[perm], ids[perm]


def _hand_advantages(rewards, ids, scale, eps, unbiased):
    r, ids = rewards.tolist(), ids.tolist()
    std_fn = statistics.stdev if unbiased else statistics.pstdev
    out = []
    for ri, gi in zip(r, ids):
        group = [rj for rj, gj in zip(r, ids) if gj == gi]
        centred = ri - statistics.fmean(group)
        if scale == "group":
            out.append(centred / (std_fn(group) + eps))
        elif scale == "batch":
            out.append(centred / (std_fn(r) + eps))
        else:
            out.append(centred)
    return torch.tensor(out, dtype=torch.float64)


@pytest.mark.parametrize("unbiased", [True, False])
@pytest.mark.parametrize("scale", ["group", "batch", "none"])
def test_advantages_match_hand_loop(scale, unbiased):
    rewards, ids = _shuffled_groups()
    adv = group_advantages(rewards, ids, scale=scale, unbiased=unbiased)
    assert_close(adv, _hand_advantages(rewards, ids, scale, 1e-4, unbiased))


def test_advantages_sum_to_zero_per_group_and_float32_default():
    rewards, ids = _shuffled_groups(1)
    adv = group_advantages(rewards.float(), ids)
    assert adv.dtype == torch.float32
    for gid in ids.unique():
        assert abs(adv[ids == gid].sum().item()) < 1e-5


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
def test_zero_std_and_singleton_groups_give_exact_zero(scale):
    # group 5: all 0.1 (whose float mean is not exactly 0.1); group 9: a singleton; group 2: signal.
    rewards = torch.tensor([0.1, 0.1, 0.1, 0.7, 1.0, 0.0, 0.5])
    ids = torch.tensor([5, 5, 5, 9, 2, 2, 2])
    adv = group_advantages(rewards, ids, scale=scale)
    assert torch.isfinite(adv).all()
    assert torch.equal(adv[:4], torch.zeros(4))
    assert adv[4] > 0 > adv[5]
    # one sample, and a whole batch without signal
    assert torch.equal(group_advantages(torch.tensor([3.0]), torch.tensor([0]), scale=scale), torch.zeros(1))
    flat = group_advantages(torch.full((4,), 0.3), torch.tensor([0, 0, 1, 1]), scale=scale)
    assert torch.equal(flat, torch.zeros(4))


def test_advantages_clip_and_flow_grpo_biased_std():
    rewards = torch.tensor([0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 1.0])
    ids = torch.zeros(8, dtype=torch.long)
    # np.std (biased) as in Flow-GRPO's PerPromptStatTracker
    biased = group_advantages(rewards, ids, unbiased=False)
    assert_close(biased[-1], torch.tensor((1 - 1 / 8) / (math.sqrt(7 / 64) + 1e-4)))
    clipped = group_advantages(rewards, ids, clip=2.0, unbiased=False)
    assert clipped[-1].item() == 2.0
    assert_close(clipped[:-1], biased[:-1])


def test_zero_std_fraction():
    rewards = torch.tensor([1.0, 1.0, 0.0, 1.0, 0.5, 0.5, 2.0])
    ids = torch.tensor([0, 0, 1, 1, 2, 2, 3])  # groups 0 and 2 flat, 3 a singleton
    assert zero_std_fraction(rewards, ids) == pytest.approx(3 / 4)


@pytest.mark.parametrize("clip", [None, 1.5])
@pytest.mark.parametrize("unbiased", [True, False])
@pytest.mark.parametrize("scale", ["group", "batch", "none"])
def test_non_finite_rewards_are_left_out_of_the_advantages(scale, unbiased, clip):
    """NaN / inf rewards get advantage exactly 0, and the others' advantages are those of the batch
    without them (each group's mean and std, or the batch's std, over its finite rewards only)."""
    for seed in range(4):
        rewards, ids = _shuffled_groups(seed)
        g = torch.Generator().manual_seed(100 + seed)
        bad = torch.zeros_like(ids, dtype=torch.bool)
        # per group 0, 1, 2 or all 6 samples bad, in a seeded order of the groups
        for gid, count in zip(ids.unique()[torch.randperm(4, generator=g)], [0, 1, 2, 6]):
            rows = (ids == gid).nonzero().flatten()
            bad[rows[torch.randperm(6, generator=g)[:count]]] = True
        poisoned = rewards.clone()
        values = torch.tensor([math.nan, math.inf, -math.inf], dtype=rewards.dtype)
        poisoned[bad] = values[torch.randint(3, (int(bad.sum()),), generator=g)]
        adv = group_advantages(poisoned, ids, scale=scale, unbiased=unbiased, clip=clip)
        assert torch.equal(adv[bad], torch.zeros(int(bad.sum()), dtype=adv.dtype))
        expected = _hand_advantages(rewards[~bad], ids[~bad], scale, 1e-4, unbiased)
        if clip is not None:
            expected = expected.clamp(-clip, clip)
        assert_close(adv[~bad], expected)
        assert_close(adv[~bad], group_advantages(rewards[~bad], ids[~bad], scale=scale, unbiased=unbiased,
                                                 clip=clip))
        # the fully bad group counts as flat (no signal), like a tied one
        assert zero_std_fraction(poisoned, ids) == pytest.approx(1 / 4)


def test_every_reward_non_finite_gives_zero_advantages():
    ids = torch.tensor([0, 0, 1, 1])
    for scale in ("group", "batch", "none"):
        adv = group_advantages(torch.full((4,), math.nan), ids, scale=scale)
        assert torch.equal(adv, torch.zeros(4))
    assert zero_std_fraction(torch.tensor([math.inf, math.nan, 1.0, 1.0]), ids) == 1.0
    assert zero_std_fraction(torch.tensor([math.inf, 0.5, 1.0, 1.0]), ids) == 1.0  # a singleton and a tie
    assert zero_std_fraction(torch.tensor([math.inf, 0.5, 1.0, 2.0]), ids) == 0.5


def test_advantage_errors():
    with pytest.raises(ValueError, match="group, batch, none"):
        group_advantages(torch.zeros(2), torch.zeros(2, dtype=torch.long), scale="prompt")
    with pytest.raises(ValueError, match="group_ids shape"):
        group_advantages(torch.zeros(2), torch.zeros(3, dtype=torch.long))


# ----------------------------------------------------------------------------- policy loss


def _batch(seed: int = 0, b: int = 5, t: int = 7):
    g = torch.Generator().manual_seed(seed)
    logp = -torch.rand(b, t, generator=g, dtype=torch.float64) * 3
    old = logp + 0.4 * torch.randn(b, t, generator=g, dtype=torch.float64)  # off-policy: some clipping
    ref = logp + 0.3 * torch.randn(b, t, generator=g, dtype=torch.float64)
    adv = torch.randn(b, generator=g, dtype=torch.float64)
    mask = torch.rand(b, t, generator=g) > 0.3
    mask[0] = False  # an empty sequence exercises the count clamp
    mask[1, 0] = True
    return logp.requires_grad_(), old, ref, adv, mask


def _hand_token_losses(logp, old, ref, adv, eps_low, eps_high, beta):
    """Per-token loss by explicit scalar loops."""
    b, t = logp.shape
    out = torch.zeros(b, t, dtype=torch.float64)
    for i in range(b):
        for j in range(t):
            rho = math.exp(logp[i, j].item() - old[i, j].item())
            a = adv[i].item()
            clipped = min(max(rho, 1 - eps_low), 1 + eps_high)
            d = ref[i, j].item() - logp[i, j].item()
            out[i, j] = -min(rho * a, clipped * a) + beta * (math.exp(d) - d - 1)
    return out


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_each_loss_type_matches_hand_computation(loss_type):
    logp, old, ref, adv, mask = _batch()
    eps_low, eps_high, beta = 0.2, 0.28, 0.05
    loss, _ = policy_loss(logp, old, adv, mask, loss_type=loss_type, epsilon_low=eps_low,
                          epsilon_high=eps_high, beta=beta, ref_logp=ref, max_len=10, num_items_in_batch=40)
    tok = _hand_token_losses(logp, old, ref, adv, eps_low, eps_high, beta)
    m = mask.double()
    if loss_type == "grpo":
        per_seq = [(tok[i] * m[i]).sum() / max(m[i].sum().item(), 1) for i in range(len(tok))]
        expected = torch.stack(per_seq).mean()
    elif loss_type == "bnpo":
        expected = (tok * m).sum() / m.sum()
    elif loss_type == "dr_grpo":
        expected = (tok * m).sum() / (tok.shape[0] * 10)
    else:
        expected = (tok * m).sum() / 40
    assert_close(loss, expected)


def test_dapo_and_dr_grpo_defaults():
    logp, old, _, adv, mask = _batch(1)
    dapo, _ = policy_loss(logp, old, adv, mask, loss_type="dapo")
    bnpo, _ = policy_loss(logp, old, adv, mask, loss_type="bnpo")
    assert_close(dapo, bnpo)  # default denominator: the local token count
    dr, _ = policy_loss(logp, old, adv, mask, loss_type="dr_grpo")
    assert_close(dr * logp.numel(), bnpo * mask.sum())


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_on_policy_ratio_is_exactly_one_and_gradient_is_plain_pg(loss_type):
    logp, _, _, adv, mask = _batch(2)
    old = logp.detach().clone()  # same values, as after one rollout and one update per rollout
    loss, stats = policy_loss(logp, old, adv, mask, loss_type=loss_type)
    assert stats["ratio_mean"].item() == 1.0
    assert stats["clip_frac"].item() == 0.0
    m = mask.double()
    if loss_type == "grpo":
        full, _ = policy_loss(logp, old, adv, torch.ones_like(mask))
        assert_close(full, -adv.mean())
        seq_len = m.sum(1).clamp(min=1)
        assert_close(loss, (-adv * m.sum(1) / seq_len).mean())  # -mean(A) over non-empty rows
        expected_grad = -adv[:, None] * m / seq_len[:, None] / len(adv)  # -A * dlogp / |o| / B
    else:
        denom = {"bnpo": m.sum(), "dapo": m.sum(), "dr_grpo": torch.tensor(float(logp.numel()))}[loss_type]
        expected_grad = -adv[:, None] * m / denom
    loss.backward()
    assert_close(logp.grad, expected_grad)


def test_old_logp_given_as_the_same_tensor_still_has_gradient():
    logp, _, _, adv, mask = _batch(3)
    loss, stats = policy_loss(logp, logp, adv, mask)
    loss.backward()
    assert stats["ratio_mean"].item() == 1.0
    assert logp.grad.abs().sum() > 0


def test_clip_fractions_on_constructed_cases():
    # one token per sequence: low-clipped (A<0, rho<0.8), high-clipped (A>0, rho>1.2), the same
    # ratios with the other signs (not clipped), an unclipped one, and a masked low-clipped one.
    rho = torch.tensor([[0.5], [1.5], [0.5], [1.5], [1.1], [0.5]])
    adv = torch.tensor([-1.0, 1.0, 1.0, -1.0, 1.0, -1.0])
    mask = torch.tensor([[True], [True], [True], [True], [True], [False]])  # last would be low-clipped
    old = torch.zeros(6, 1, dtype=torch.float64)
    logp = rho.double().log()
    _, stats = policy_loss(logp, old, adv, mask, loss_type="bnpo")
    assert stats["clip_low_frac"].item() == pytest.approx(1 / 5)
    assert stats["clip_high_frac"].item() == pytest.approx(1 / 5)
    assert stats["clip_frac"].item() == pytest.approx(2 / 5)
    assert stats["ratio_mean"].item() == pytest.approx((0.5 + 1.5 + 0.5 + 1.5 + 1.1) / 5)
    # clip-higher: rho = 1.5 is inside [1 - 0.2, 1 + 0.6]
    _, stats = policy_loss(logp, old, adv, mask, epsilon_high=0.6)
    assert stats["clip_high_frac"].item() == 0.0
    # the clipped tokens carry no gradient; the unclipped ones do
    logp.requires_grad_()
    loss, _ = policy_loss(logp, old, adv, mask, loss_type="bnpo")
    loss.backward()
    assert logp.grad[0].item() == 0.0 and logp.grad[1].item() == 0.0
    assert logp.grad[2].item() != 0.0 and logp.grad[3].item() != 0.0


def test_kl_term_adds_beta_k3_and_stat():
    logp, old, ref, adv, mask = _batch(4)
    base, stats0 = policy_loss(logp, old, adv, mask, loss_type="bnpo", ref_logp=ref)
    with_kl, stats = policy_loss(logp, old, adv, mask, loss_type="bnpo", ref_logp=ref, beta=0.1)
    m = mask.double()
    k3_mean = (kl_k3(logp, ref) * m).sum() / m.sum()
    assert_close(with_kl - base, 0.1 * k3_mean)
    assert_close(stats["kl"], k3_mean.detach())
    assert_close(stats0["kl"], stats["kl"])  # the stat is reported with beta == 0 too
    _, no_ref = policy_loss(logp, old, adv, mask)
    assert no_ref["kl"].item() == 0.0 and set(no_ref) == {"clip_low_frac", "clip_high_frac",
                                                          "clip_frac", "ratio_mean", "kl"}
    assert all(not v.requires_grad and v.ndim == 0 for v in stats.values())


def test_masked_padding_garbage_does_not_leak():
    logp, old, ref, adv, mask = _batch(5)
    clean, _ = policy_loss(logp, old, adv, mask, ref_logp=ref, beta=0.1)
    dirty_old, dirty_ref = old.clone(), ref.clone()
    dirty_old[~mask], dirty_ref[~mask] = float("nan"), float("-inf")
    loss, stats = policy_loss(logp, dirty_old, adv, mask, ref_logp=dirty_ref, beta=0.1)
    assert_close(loss, clean)
    loss.backward()
    assert torch.isfinite(logp.grad).all() and (logp.grad[~mask] == 0).all()
    assert all(torch.isfinite(v) for v in stats.values())


def test_policy_loss_errors():
    logp, old, ref, adv, mask = _batch(6)
    with pytest.raises(ValueError, match=r"old_logp shape \(5, 6\)"):
        policy_loss(logp, old[:, :6], adv, mask)
    with pytest.raises(ValueError, match="mask shape"):
        policy_loss(logp, old, adv, mask[:4])
    with pytest.raises(ValueError, match="advantages shape"):
        policy_loss(logp, old, adv[:, None], mask)
    with pytest.raises(ValueError, match="grpo, bnpo, dr_grpo, dapo"):
        policy_loss(logp, old, adv, mask, loss_type="ppo")
    with pytest.raises(ValueError, match="ref_logp"):
        policy_loss(logp, old, adv, mask, beta=0.1)


# ----------------------------------------------------------------------------- KL estimators


def test_kl_estimators():
    g = torch.Generator().manual_seed(0)
    logp, ref = -3 * torch.rand(2, 1000, generator=g)
    k3 = kl_k3(logp, ref)
    assert (k3 >= 0).all()
    assert_close(k3, torch.exp(ref - logp) - (ref - logp) - 1)
    assert torch.equal(kl_k3(logp, logp), torch.zeros_like(logp))
    assert (kl_k3(logp, logp + 1e-7) >= 0).all()  # tiny differences never go negative
    assert_close(kl_k1(logp, ref), logp - ref)
    assert_close(kl_k2(logp, ref), 0.5 * (logp - ref) ** 2)


def test_k3_is_unbiased_for_categorical_kl():
    p = torch.tensor([0.5, 0.3, 0.2])
    q = torch.tensor([0.2, 0.2, 0.6])
    true_kl = (p * (p / q).log()).sum()
    # expectation under p of k3 (and of k1) equals KL(p || q)
    assert_close((p * kl_k3(p.log(), q.log())).sum(), true_kl)
    assert_close((p * kl_k1(p.log(), q.log())).sum(), true_kl)


# ----------------------------------------------------------------------------- straight-through Gumbel


def test_gumbel_forward_is_exactly_one_hot_and_gradient_flows():
    logits = torch.randn(3, 5, 16, generator=torch.Generator().manual_seed(0), requires_grad=True)
    y, index = straight_through_gumbel(logits, tau=0.7, generator=torch.Generator().manual_seed(1))
    assert index.shape == (3, 5) and index.dtype == torch.long
    assert torch.equal(y, torch.nn.functional.one_hot(index, 16).float())
    (y * torch.randn(16)).sum().backward()
    assert logits.grad is not None and logits.grad.abs().sum() > 0


def test_gumbel_index_is_argmax_of_soft_and_gradient_is_soft_gradient():
    logits = torch.randn(4, 10, generator=torch.Generator().manual_seed(2), requires_grad=True)
    w = torch.randn(10)
    y_soft, idx_soft = straight_through_gumbel(logits, tau=0.5, generator=torch.Generator().manual_seed(3),
                                               hard=False)
    assert torch.equal(idx_soft, y_soft.argmax(-1))
    assert_close(y_soft.sum(-1), torch.ones(4))
    (grad_soft,) = torch.autograd.grad((y_soft * w).sum(), logits)
    y, idx = straight_through_gumbel(logits, tau=0.5, generator=torch.Generator().manual_seed(3))
    assert torch.equal(idx, idx_soft)
    (grad_hard,) = torch.autograd.grad((y * w).sum(), logits)
    assert_close(grad_hard, grad_soft)


def test_gumbel_reproducible_and_samples_the_softmax():
    logits = torch.tensor([1.0, 0.0, -1.0, 0.5])
    a = straight_through_gumbel(logits.expand(10000, 4), generator=torch.Generator().manual_seed(4))[1]
    b = straight_through_gumbel(logits.expand(10000, 4), generator=torch.Generator().manual_seed(4))[1]
    c = straight_through_gumbel(logits.expand(10000, 4), generator=torch.Generator().manual_seed(5))[1]
    assert torch.equal(a, b) and not torch.equal(a, c)
    freq = torch.bincount(a, minlength=4).float() / a.numel()
    assert_close(freq, logits.softmax(-1), atol=0.02, rtol=0)  # ~4 standard errors


def test_gumbel_keeps_dtype():
    y, _ = straight_through_gumbel(torch.randn(2, 8, dtype=torch.bfloat16))
    assert y.dtype == torch.bfloat16 and torch.equal(y.sum(-1), torch.ones(2, dtype=torch.bfloat16))


@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dr_grpo", "dapo"])
def test_random_subset_of_reveal_steps_is_unbiased(loss_type):
    """The mean over every k-subset of action columns (what `train_step_subset` draws uniformly) of the
    subset's loss equals the full loss, dr_grpo with its length budget set to k, with KL too."""
    from itertools import combinations

    from unirl_lightning.modules.grpo import train_step_subset

    torch.manual_seed(0)
    B, A, k = 4, 6, 2
    logp, old, ref = torch.randn(B, A) - 2, torch.randn(B, A) - 2, torch.randn(B, A) - 2
    adv, full = torch.randn(B), torch.ones(B, A, dtype=torch.bool)
    kw = dict(loss_type=loss_type, beta=0.1, ref_logp=ref)
    want, _ = policy_loss(logp, old, adv, full, num_items_in_batch=full.sum(), **kw)
    losses = []
    for cols in combinations(range(A), k):
        mask = torch.zeros(B, A, dtype=torch.bool)
        mask[:, list(cols)] = True
        loss, _ = policy_loss(logp, old, adv, mask, max_len=k, num_items_in_batch=mask.sum(), **kw)
        losses.append(loss)
    torch.testing.assert_close(torch.stack(losses).mean(), want)
    drawn = train_step_subset(full, k)
    assert drawn.sum(1).tolist() == [k] * B and bool((drawn == drawn[:1]).all())
    assert train_step_subset(full, A + 1) is full
