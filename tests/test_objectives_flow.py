"""Flow SDE step, log-probs and flow regularisers, pinned to diffusers and to the formulas."""

from __future__ import annotations

import math

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from torch.testing import assert_close

from unirl_lightning.objectives import (
    SDE_KINDS,
    exact_latent_kl,
    latent_kl,
    noise_aware_step_weights,
    sde_sigma_t,
    sde_step,
    transition_std,
    velocity_mse,
)

SHAPE = (3, 4, 5, 6)  # [B, C, H, W]


def _inputs(seed: int = 0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(SHAPE, generator=g).to(dtype), torch.randn(SHAPE, generator=g).to(dtype)


def _col(x) -> torch.Tensor:
    """A float or [B] tensor as [B, 1, 1, 1]."""
    return torch.as_tensor(x, dtype=torch.float32).reshape(-1, 1, 1, 1)


# ----------------------------------------------------------------------------- Euler parity


@pytest.mark.parametrize("kind", ["sde", "dance"])
@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_noise_level_zero_is_diffusers_euler_at_every_step(shift, kind):
    scheduler = FlowMatchEulerDiscreteScheduler(shift=shift)
    scheduler.set_timesteps(10)
    sigmas = scheduler.sigmas
    assert sigmas[0].item() == 1.0  # the first step sits at s == 1, where the guard acts
    x, _ = _inputs(1)
    ours = x.clone()
    g = torch.Generator().manual_seed(2)
    for i, t in enumerate(scheduler.timesteps):
        v = torch.randn(SHAPE, generator=g)
        expected = scheduler.step(v, t, x).prev_sample
        # sigma as python floats on even steps, as [B] tensors on odd ones
        s, s_next = sigmas[i].item(), sigmas[i + 1].item()
        if i % 2:
            s, s_next = sigmas[i].expand(SHAPE[0]), sigmas[i + 1].expand(SHAPE[0])
        ours, log_prob, mean, std = sde_step(v, x, s, s_next, noise_level=0.0, kind=kind,
                                             generator=torch.Generator().manual_seed(i))
        assert_close(ours, expected, rtol=0, atol=0)
        assert_close(mean, expected, rtol=0, atol=0)
        assert torch.equal(std, torch.zeros(SHAPE[0], 1, 1, 1))
        assert torch.equal(log_prob, torch.zeros(SHAPE[0]))  # deterministic step: 0 by convention
        x = expected


def test_cps_at_noise_level_zero_is_euler_up_to_rounding():
    x, v = _inputs(3)
    euler = x + v * (0.3 - 0.5)
    prev, _, _, std = sde_step(v, x, 0.5, 0.3, noise_level=0.0, kind="cps")
    assert_close(prev, euler)
    assert (std == 0).all()


# ----------------------------------------------------------------------------- formulas


def test_sde_mean_std_match_flow_grpo_form_with_guard_at_one():
    x, v = _inputs(4)
    a = 0.7
    sigma = torch.tensor([1.0, 0.6, 0.2])
    sigma_next = torch.tensor([0.9, 0.5, 0.0])
    _, _, mean, std = sde_step(v, x, sigma, sigma_next, noise_level=a)
    s, sn = _col(sigma), _col(sigma_next)
    dt = sn - s
    sigma_t = a * torch.sqrt(s / (1 - torch.where(s == 1, sn, s)))  # s == 1: use 1 - s_next
    assert_close(sigma_t[0].squeeze(), torch.tensor(a * math.sqrt(1 / 0.1)))
    # Flow-GRPO's algebraic arrangement of the same mean
    expected = x * (1 + sigma_t**2 / (2 * s) * dt) + v * (1 + sigma_t**2 * (1 - s) / (2 * s)) * dt
    assert_close(mean, expected)
    assert_close(std, sigma_t * torch.sqrt(-dt))
    assert_close(sde_sigma_t(s, sn, a), sigma_t)


def test_dance_formula():
    x, v = _inputs(5)
    a, s, sn = 0.4, 0.8, 0.6
    _, _, mean, std = sde_step(v, x, s, sn, noise_level=a, kind="dance")
    dt = sn - s
    assert_close(mean, x + (v + a**2 / (2 * s) * (x + (1 - s) * v)) * dt)
    assert_close(std, torch.full((SHAPE[0], 1, 1, 1), a * math.sqrt(-dt)))


def test_cps_formula():
    x, v = _inputs(6)
    a = 0.7
    sigma, sigma_next = torch.tensor([1.0, 0.5, 0.3]), torch.tensor([0.8, 0.3, 0.0])
    prev, log_prob, mean, std = sde_step(v, x, sigma, sigma_next, noise_level=a, kind="cps",
                                         generator=torch.Generator().manual_seed(0))
    s, sn = _col(sigma), _col(sigma_next)
    std_ref = sn * math.sin(a * math.pi / 2)
    x0_hat, x1_hat = x - s * v, x + (1 - s) * v
    assert_close(std, std_ref)
    assert_close(mean, x0_hat * (1 - sn) + x1_hat * torch.sqrt(sn**2 - std_ref**2))
    assert prev.shape == mean.shape == SHAPE
    assert log_prob.shape == (3,) and std.shape == (3, 1, 1, 1)
    assert log_prob[2].item() == 0.0  # last step: s_next = 0, std = 0
    assert torch.equal(prev[2], mean[2])


# ----------------------------------------------------------------------------- log-probs


@pytest.mark.parametrize("kind", SDE_KINDS)
def test_log_prob_is_the_gaussian_density(kind):
    x, v = _inputs(7)
    sigma, sigma_next = torch.tensor([1.0, 0.7, 0.4]), torch.tensor([0.9, 0.5, 0.1])
    prev, log_prob, mean, std = sde_step(v, x, sigma, sigma_next, noise_level=0.8, kind=kind,
                                         generator=torch.Generator().manual_seed(1))
    normal = torch.distributions.Normal(mean, std.expand_as(mean))
    assert_close(log_prob, normal.log_prob(prev).mean(dim=(1, 2, 3)))
    _, log_sum, _, _ = sde_step(v, x, sigma, sigma_next, noise_level=0.8, kind=kind, prev_sample=prev,
                                reduce="sum")
    assert_close(log_sum, normal.log_prob(prev).sum(dim=(1, 2, 3)))
    assert_close(log_sum, log_prob * math.prod(SHAPE[1:]))


@pytest.mark.parametrize("kind", SDE_KINDS)
def test_log_prob_at_the_mean(kind):
    x, v = _inputs(8)
    _, _, mean, std = sde_step(v, x, 0.6, 0.5, noise_level=0.7, kind=kind)
    _, log_prob, _, _ = sde_step(v, x, 0.6, 0.5, noise_level=0.7, kind=kind, prev_sample=mean)
    assert_close(log_prob, (-std.log() - 0.5 * math.log(2 * math.pi)).reshape(-1))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rescoring_the_sampled_step_reproduces_its_log_prob(dtype):
    x, v = _inputs(9, dtype)
    prev, log_prob, _, _ = sde_step(v, x, 0.9, 0.8, generator=torch.Generator().manual_seed(3))
    assert prev.dtype == dtype
    v_train = v.float().requires_grad_()  # training recomputes v (here: the same values) with grad
    _, log_prob2, _, _ = sde_step(v_train, x, 0.9, 0.8, prev_sample=prev)
    assert torch.equal(log_prob2.detach(), log_prob)  # on-policy ratio exactly 1
    log_prob2.sum().backward()
    assert v_train.grad.abs().sum() > 0


def test_generator_reproducibility_and_zero_noise_gradients():
    x, v = _inputs(10)
    a = sde_step(v, x, 0.5, 0.4, generator=torch.Generator().manual_seed(0))[0]
    b = sde_step(v, x, 0.5, 0.4, generator=torch.Generator().manual_seed(0))[0]
    c = sde_step(v, x, 0.5, 0.4, generator=torch.Generator().manual_seed(1))[0]
    assert torch.equal(a, b) and not torch.equal(a, c)
    v = v.requires_grad_()
    _, log_prob, _, _ = sde_step(v, x, 0.5, 0.4, noise_level=0.0)
    log_prob.sum().backward()
    assert torch.equal(v.grad, torch.zeros_like(v))  # finite (no NaN) and no signal


def test_float16_inputs_are_computed_in_float32():
    x16, v16 = _inputs(11, torch.float16)
    prev16 = sde_step(v16, x16, 0.7, 0.6, generator=torch.Generator().manual_seed(0))[0]
    prev, log_prob, mean, std = sde_step(v16, x16, 0.7, 0.6, prev_sample=prev16)
    assert prev.dtype == torch.float16
    assert log_prob.dtype == mean.dtype == std.dtype == torch.float32
    ref = sde_step(v16.float(), x16.float(), 0.7, 0.6, prev_sample=prev16.float())
    assert torch.equal(mean, ref[2]) and torch.equal(log_prob, ref[1])


def test_sde_marginals_match_the_flow():
    """With the exact velocity of a point-mass data distribution at c, every kind keeps the
    marginal x_s ~ N((1-s)*c, s^2) up to discretisation error: the drift correction has the right
    sign and size (dropping it, halving or doubling it gives errors of 0.26 or more here)."""
    c, n = 2.0, 20000
    sigmas = torch.linspace(1.0, 0.0, 41)
    for kind, a in (("sde", 0.7), ("dance", 0.5), ("cps", 0.7)):
        g = torch.Generator().manual_seed(0)
        x = torch.randn(1, n, generator=g)  # one sample of n i.i.d. dims
        for i in range(len(sigmas) - 2):  # the last step (to s = 0) is not trained
            s, sn = sigmas[i].item(), sigmas[i + 1].item()
            x = sde_step((x - c) / s, x, s, sn, noise_level=a, kind=kind, generator=g)[0]
            # Euler-Maruyama is coarse where sigma_t blows up (s -> 1 for "sde", s -> 0 for "dance")
            if 0.2 <= sn <= 0.9:
                assert abs(x.mean().item() - (1 - sn) * c) < 0.1, (kind, i)
                assert abs(x.std().item() / sn - 1) < 0.1, (kind, i)


def test_sde_step_errors():
    x, v = _inputs(12)
    with pytest.raises(ValueError, match="sde, dance, cps"):
        sde_step(v, x, 0.5, 0.4, kind="ode")
    with pytest.raises(ValueError, match="mean, sum"):
        sde_step(v, x, 0.5, 0.4, reduce="max")
    with pytest.raises(ValueError, match="velocity shape"):
        sde_step(v[:2], x, 0.5, 0.4)
    with pytest.raises(ValueError, match="prev_sample shape"):
        sde_step(v, x, 0.5, 0.4, prev_sample=x[:, :2])
    with pytest.raises(ValueError, match="sigma_next must be"):
        sde_step(v, x, 0.5, torch.tensor([0.4, 0.3]))
    with pytest.raises(ValueError, match="noise_level"):
        sde_step(v, x, 0.5, 0.4, kind="cps", noise_level=1.5)


# ----------------------------------------------------------------------------- step weights


@pytest.mark.parametrize("kind", SDE_KINDS)
def test_transition_std_is_sde_steps_std(kind):
    x, v = _inputs(13)
    sigma, sigma_next = torch.tensor([1.0, 0.7, 0.4]), torch.tensor([0.9, 0.5, 0.1])
    _, _, _, std = sde_step(v, x, sigma, sigma_next, noise_level=0.6, kind=kind)
    assert_close(transition_std(sigma, sigma_next, 0.6, kind), std.reshape(-1))


def test_noise_aware_step_weights_even_out_the_per_step_policy_gradient():
    """Weights = std / mean std; weighted, every step's mean-log-prob gradient w.r.t. the velocity
    has the size |dmean/dv| (1.5 |dt| for sde at a = 1, |dt| at the guarded s == 1 step), while
    unweighted it grows ~sqrt((1-s)/s) toward the last steps."""
    scheduler = FlowMatchEulerDiscreteScheduler(shift=1.0)
    scheduler.set_timesteps(10)
    sigmas, levels, steps = scheduler.sigmas, torch.ones(10), list(range(9))
    weights = noise_aware_step_weights(sigmas, levels, steps)
    s, sn = sigmas[:9], sigmas[1:10]
    std = torch.sqrt(s / (1 - torch.where(s == 1, sn, s))) * torch.sqrt(s - sn)
    assert_close(weights, std / std.mean())
    assert_close(weights.mean(), torch.tensor(1.0))
    assert_close(noise_aware_step_weights(sigmas, levels, steps, power=2.0), std**2 / std.square().mean())
    window = noise_aware_step_weights(sigmas, levels, [2, 7], normalize_over=steps)
    assert_close(window, std[[2, 7]] / std.mean())
    x, v = _inputs(14)
    eps = torch.randn(SHAPE, generator=torch.Generator().manual_seed(3))
    sizes, raw = [], []
    for j, w in zip(steps, weights):
        vj = v.clone().requires_grad_(True)
        _, _, mean, std_j = sde_step(vj, x, sigmas[j], sigmas[j + 1], noise_level=1.0)
        target = (mean + std_j * eps).detach()
        _, log_prob, _, _ = sde_step(vj, x, sigmas[j], sigmas[j + 1], noise_level=1.0, prev_sample=target)
        (grad,) = torch.autograd.grad(log_prob.sum(), vj)
        raw.append(grad.norm())
        dmean_dv = (sigmas[j] - sigmas[j + 1]) * (1.0 if j == 0 else 1.5)
        sizes.append(w * grad.norm() / dmean_dv)
    sizes = torch.stack(sizes)
    assert_close(sizes, sizes[0].expand(9), rtol=1e-4, atol=0)  # even after weighting
    assert raw[8] / raw[1] > 5  # uneven before: the last trained step dominates
    ode_levels = levels.clone()
    ode_levels[4] = 0.0
    with pytest.raises(ValueError, match="deterministic step"):
        noise_aware_step_weights(sigmas, ode_levels, steps)


# ----------------------------------------------------------------------------- regularisers


@pytest.mark.parametrize("steps", [(1.0, 0.9), (0.6, 0.5), (0.1, 0.0)])
def test_exact_latent_kl_closed_form_equals_direct(steps):
    s, sn = steps
    x, v = _inputs(13)
    v_ref = v + 0.1 * torch.randn(SHAPE, generator=torch.Generator().manual_seed(0))
    a = 0.7
    _, _, mean, std = sde_step(v, x, s, sn, noise_level=a)
    _, _, ref_mean, ref_std = sde_step(v_ref, x, s, sn, noise_level=a)
    assert torch.equal(std, ref_std)
    direct = ((mean - ref_mean) ** 2 / (2 * std**2)).sum(dim=(1, 2, 3))
    closed = exact_latent_kl(v, v_ref, s, sn, a)
    assert_close(closed, direct, rtol=1e-4, atol=1e-6)
    # [B] sigmas give the same values per sample
    batched = exact_latent_kl(v, v_ref, torch.full((3,), s), torch.full((3,), sn), a)
    assert_close(batched, closed)
    # and it is the latent_kl form with the transition std, summed instead of averaged
    assert_close(latent_kl(mean, ref_mean, std) * math.prod(SHAPE[1:]), direct)


def test_latent_kl_flow_grpo_form():
    x, v = _inputs(14)
    mean, ref_mean = x, x + 0.05 * v
    std = torch.tensor([0.3, 0.5, 0.7])
    expected = ((mean - ref_mean) ** 2).mean(dim=(1, 2, 3)) / (2 * std**2)
    assert_close(latent_kl(mean, ref_mean, std), expected)
    assert_close(latent_kl(mean, ref_mean, std.reshape(3, 1, 1, 1)), expected)
    assert_close(latent_kl(mean, ref_mean, 0.3), ((mean - ref_mean) ** 2).mean(dim=(1, 2, 3)) / (2 * 0.3**2))
    assert torch.equal(latent_kl(mean, mean, std), torch.zeros(3))


def test_velocity_mse():
    x, v = _inputs(15)
    assert torch.equal(velocity_mse(v, v), torch.zeros(3))
    assert_close(velocity_mse(v, x), ((v - x) ** 2).mean(dim=(1, 2, 3)))
    half = velocity_mse(v.half(), x.half())
    assert half.dtype == torch.float32
    v = v.requires_grad_()
    ref = x.requires_grad_()
    velocity_mse(v, ref).sum().backward()
    assert v.grad.abs().sum() > 0 and ref.grad is None  # the reference is frozen


def test_regularizer_errors():
    x, v = _inputs(16)
    with pytest.raises(ValueError, match="ref_velocity shape"):
        velocity_mse(v, x[:2])
    with pytest.raises(ValueError, match="noise_level"):
        exact_latent_kl(v, x, 0.5, 0.4, 0.0)
