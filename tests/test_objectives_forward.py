"""DiffusionNFT and AWM objectives pinned to their formulas and to the limits their papers state."""

import pytest
import torch

from unirl_lightning.objectives import (
    adaptive_x0_loss,
    awm_loss,
    awm_weights,
    diffusion_nft_loss,
    ghuber_fm_loss,
    nft_optimality,
    noised,
)


@pytest.fixture
def batch():
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(6, 2, 3, 3, generator=g), torch.randn(6, 2, 3, 3, generator=g)
    t = torch.rand(6, generator=g) * 0.9 + 0.05
    v = torch.randn(6, 2, 3, 3, generator=g).requires_grad_()
    adv = torch.randn(6, generator=g) * 4
    return x0, noise, t, v, adv


def test_reward_maps():
    adv = torch.tensor([-12.0, -5.0, -1.0, 0.0, 2.5, 7.0])
    assert torch.allclose(nft_optimality(adv), torch.tensor([0.0, 0.0, 0.4, 0.5, 0.75, 1.0]))
    assert torch.allclose(awm_weights(adv), torch.tensor([-1.0, -1.0, -0.2, 0.0, 0.5, 1.0]))


def test_forward_process_and_x0_space_loss(batch):
    x0, noise, t, v, _ = batch
    x_t, target = noised(x0, noise, t)
    tc = t.view(-1, 1, 1, 1)
    assert torch.allclose(x_t, (1 - tc) * x0 + tc * noise) and torch.allclose(target, noise - x0)
    # the paper's form: x0_hat = x_t - t v, loss = mean (x0_hat - x0)^2 / mean |x0_hat - x0|
    x0_hat = x_t - tc * v
    err = (x0_hat - x0).flatten(1)
    expected = err.square().mean(1) / err.abs().mean(1)
    assert torch.allclose(adaptive_x0_loss(v, target, t), expected, rtol=1e-5)


@pytest.mark.parametrize("beta", [0.1, 1.0, 2.5])
def test_on_policy_nft_gradient_is_the_clipped_advantage_times_the_fm_gradient(batch, beta):
    x0, noise, t, v, adv = batch
    _, target = noised(x0, noise, t)
    r = nft_optimality(adv)
    (g_nft,) = torch.autograd.grad(5.0 * diffusion_nft_loss(v, v.detach(), target, t, r, beta).sum(), v)
    weighted = adv.clamp(-5, 5) * adaptive_x0_loss(v, target, t)
    (g_awm_like,) = torch.autograd.grad(weighted.sum(), v)
    assert torch.allclose(g_nft, g_awm_like, atol=1e-5)


def test_nft_limits(batch):
    x0, noise, t, v, _ = batch
    _, target = noised(x0, noise, t)
    half = torch.full((6,), 0.5)
    (g,) = torch.autograd.grad(diffusion_nft_loss(v, v.detach(), target, t, half, 0.7).sum(), v)
    assert g.abs().max() < 1e-6  # no preference: no gradient at the old policy
    old = torch.randn_like(v)
    ones = torch.ones(6)
    # r = 1, beta = 1: plain (adaptively weighted) flow matching on the samples, whatever the old policy
    assert torch.allclose(diffusion_nft_loss(v, old, target, t, ones, 1.0), adaptive_x0_loss(v, target, t))
    # r = 0, beta = 1: the reflected policy 2 v_old - v fits the samples
    zeros = torch.zeros(6)
    reflected = adaptive_x0_loss(2 * old - v, target, t)
    assert torch.allclose(diffusion_nft_loss(v, old, target, t, zeros, 1.0), reflected)


def test_ghuber_loss(batch):
    x0, noise, t, v, _ = batch
    _, target = noised(x0, noise, t)
    m = (v - target).flatten(1).square().mean(1)
    assert torch.allclose(ghuber_fm_loss(v, target, t, power=1.0), t * m, rtol=1e-5)
    p, d = 0.25, 1e-10
    assert torch.allclose(ghuber_fm_loss(v, target, t, p), t * ((m + d) ** p - d**p) / p, rtol=1e-5)
    (g,) = torch.autograd.grad(ghuber_fm_loss(v, target, t, p).sum(), v)
    chained = t * (m.detach() + d) ** (p - 1) * (v - target).flatten(1).square().mean(1)
    (gm,) = torch.autograd.grad(chained.sum(), v)
    assert torch.allclose(g, gm, rtol=1e-4, atol=1e-7)


def test_awm_with_unit_weights_is_the_pretraining_loss_and_weights_scale_it(batch):
    x0, noise, t, v, adv = batch
    _, target = noised(x0, noise, t)
    ones = torch.ones(6)
    plain = (v - target).flatten(1).square().mean(1)
    assert torch.allclose(awm_loss(v, target, t, ones, power=None), plain)
    w = awm_weights(adv)
    assert torch.allclose(awm_loss(v, target, t, w), w * ghuber_fm_loss(v, target, t))
    # a positive weight lowers that sample's flow-matching error along the negative gradient
    (g,) = torch.autograd.grad(awm_loss(v, target, t, w).sum(), v)
    step = v.detach() - 1e-3 * g
    def mse(x):
        return (x - target).flatten(1).square().mean(1)

    assert bool(((mse(step) < mse(v.detach())) == (w > 0)).all())


def test_bad_arguments():
    v = torch.zeros(2, 3)
    with pytest.raises(ValueError, match="beta must be > 0"):
        diffusion_nft_loss(v, v, v, torch.ones(2), torch.ones(2), beta=0.0)
    with pytest.raises(ValueError, match="power"):
        ghuber_fm_loss(v, v, torch.ones(2), power=0.0)
    with pytest.raises(ValueError, match="shapes differ"):
        adaptive_x0_loss(v, torch.zeros(2, 4), torch.ones(2))
