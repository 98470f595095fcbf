"""DiffusionNFT and AWM recipes: the first update's gradient is the objective's on the trained pairs,
the old policy / EMA anchor follow their schedules, the rollouts come from the right policy, and bad
settings fail before any compute."""

from __future__ import annotations

import copy

import lightning as L
import pytest
import torch

from grad_capture import LatentMeanReward, capture_backward_grads
from unirl_lightning.data import OnPolicyDataModule
from unirl_lightning.models.flow import TinyFlowConfig, TinyFlowModel
from unirl_lightning.modules import AdvantageWeightedMatching, DiffusionNFT, forward_rl
from unirl_lightning.modules.forward_rl import timestep_indices
from unirl_lightning.objectives import adaptive_x0_loss, awm_loss, awm_weights


def _tiny() -> TinyFlowModel:
    torch.manual_seed(0)
    return TinyFlowModel(TinyFlowConfig(num_layers=1, num_heads=2, head_dim=8, text_dim=16))


def _fit(module, steps: int, callbacks=()) -> L.Trainer:
    trainer = L.Trainer(max_steps=steps, accelerator="cpu", devices=1, logger=False,
                        enable_checkpointing=False, limit_val_batches=0, enable_progress_bar=False,
                        enable_model_summary=False, callbacks=list(callbacks))
    data = OnPolicyDataModule(num_train=60, num_val=12, prompts_per_step=2, group_size=3)
    trainer.fit(module, datamodule=data)
    return trainer


def test_timestep_indices():
    sub = timestep_indices(50, 4, 1, 9, "subset")
    assert sub.shape == (50, 4) and sub.min() >= 1 and sub.max() < 9
    assert all(len(set(row)) == 4 for row in sub.tolist())  # distinct per sample
    strat = timestep_indices(200, 4, 1, 9, "stratified")  # strata {1,2} {3,4} {5,6} {7,8}
    for j in range(4):
        assert set(strat[:, j].tolist()) == {1 + 2 * j, 2 + 2 * j}
    with pytest.raises(ValueError, match="timesteps_per_sample"):
        timestep_indices(2, 9, 1, 9, "subset")


class _Pairs:
    """Records what the recipe trains on: each `noised` call's inputs and each step's advantages."""

    def __init__(self, monkeypatch):
        self.calls, self.advantages = [], []
        noised, rank = forward_rl.noised, forward_rl.rank_advantages

        def recording_noised(x0, noise, t):
            self.calls.append((x0.clone(), noise.clone(), t.clone()))
            return noised(x0, noise, t)

        def recording_rank(*args, **kwargs):
            adv, zero = rank(*args, **kwargs)
            self.advantages.append(adv.clone())
            return adv, zero

        monkeypatch.setattr(forward_rl, "noised", recording_noised)
        monkeypatch.setattr(forward_rl, "rank_advantages", recording_rank)


def _first_update_grad(module, monkeypatch):
    """(gradient of the first backward on one weight, what it trained on, the initial policy)."""
    start = copy.deepcopy(module.policy)
    pairs = _Pairs(monkeypatch)
    weight = module.policy.transformer.proj_out.weight
    grads = capture_backward_grads(module, weight)
    prompts: list[list[str]] = []
    make = module.make_rollouts

    def keep_prompts(batch):
        prompts.append(list(batch.prompts))
        return make(batch)

    monkeypatch.setattr(module, "make_rollouts", keep_prompts)
    _fit(module, 1)
    return grads[0], pairs, prompts[0], start


def _expected_grad(start, pairs, prompts, per_pair_loss):
    """Gradient on `proj_out.weight` of the mean over the trained (sample, time) pairs of `per_pair_loss`."""
    x0, noise, t = pairs.calls[0]
    k = len(t) // len(prompts)
    adv = pairs.advantages[0].repeat_interleave(k)
    x_t, target = (1 - t.view(-1, 1, 1, 1)) * x0 + t.view(-1, 1, 1, 1) * noise, noise - x0
    cond = start.encode_text([p for p in prompts for _ in range(k)])
    v = start.velocity(x_t, t, cond)
    loss = per_pair_loss(v, target, t, adv).sum() / len(t)
    (grad,) = torch.autograd.grad(loss, start.transformer.proj_out.weight)
    return grad


def test_diffusion_nft_first_update_is_the_clipped_advantage_weighted_fm_gradient(monkeypatch):
    """On-policy (the old policy is the policy) and at the reference, for any beta the gradient is
    `clip(A, -5, 5)` times that of the adaptive flow-matching loss (the paper's identity)."""
    module = DiffusionNFT(_tiny(), warm_start=None, rewards=[LatentMeanReward()], num_steps=4,
                          timesteps_per_sample=3, nft_beta=0.3, micro_batch_size=64, lr=1e-3)
    got, pairs, prompts, start = _first_update_grad(module, monkeypatch)
    expected = _expected_grad(
        start, pairs, prompts, lambda v, target, t, adv: adv.clamp(-5, 5) * adaptive_x0_loss(v, target, t)
    )
    assert got.abs().max() > 0
    assert torch.allclose(got, expected, rtol=1e-3, atol=1e-7)


def test_awm_first_update_is_the_weighted_ghuber_gradient(monkeypatch):
    module = AdvantageWeightedMatching(_tiny(), warm_start=None, rewards=[LatentMeanReward()], num_steps=6,
                                       noise_level=0.4, sde_window=(1, 4), timesteps_per_sample=2,
                                       timestep_range=(1, 5), timestep_sampling="stratified", lr=1e-3)
    got, pairs, prompts, start = _first_update_grad(module, monkeypatch)
    expected = _expected_grad(
        start, pairs, prompts, lambda v, target, t, adv: awm_loss(v, target, t, awm_weights(adv), 0.25)
    )
    assert got.abs().max() > 0
    assert torch.allclose(got, expected, rtol=1e-3, atol=1e-7)
    x0, noise, t = pairs.calls[0]
    grid = start.sigmas(6)
    assert set(t.tolist()) <= set(grid[1:5].tolist())  # times of the sampler's grid, in the range


class _Weights(L.Callback):
    def __init__(self):
        self.live, self.anchor = [], []

    def on_train_batch_end(self, trainer, module, *args):
        anchor = module.old_policy if isinstance(module, DiffusionNFT) else module.ema_anchor
        self.live.append(copy.deepcopy(module.policy.state_dict()))
        self.anchor.append(copy.deepcopy(anchor.state_dict()))


@pytest.mark.parametrize("recipe", ["nft", "awm"])
def test_anchor_follows_its_soft_update_schedule(recipe):
    if recipe == "nft":
        module = DiffusionNFT(_tiny(), warm_start=None, num_steps=4, timesteps_per_sample=2, eta_rate=0.3,
                              eta_max=0.5, lr=1e-2)
    else:
        module = AdvantageWeightedMatching(_tiny(), warm_start=None, num_steps=4, timesteps_per_sample=2,
                                           ema_rate=0.3, ema_max=0.5, lr=1e-2)
    start = copy.deepcopy(module.policy.state_dict())
    record = _Weights()
    _fit(module, 3, [record])
    anchor = start
    for step, (live, got) in enumerate(zip(record.live, record.anchor), start=1):
        decay = min(0.3 * step, 0.5)
        anchor = {k: decay * anchor[k] + (1 - decay) * live[k] for k in anchor}
        assert all(torch.allclose(got[k], anchor[k], atol=1e-6) for k in anchor), step
    assert not any(p.requires_grad for p in module.anchor_models()[0].parameters())
    key = "transformer.proj_out.weight"
    assert not torch.equal(record.live[-1][key], start[key])


def test_nft_rollouts_come_from_the_old_policy(monkeypatch):
    module = DiffusionNFT(_tiny(), warm_start=None, num_steps=4, timesteps_per_sample=2, lr=1e-3)
    callers = []

    def spy(policy):
        sample = policy.sample

        def recording(*args, **kwargs):
            callers.append(policy)
            return sample(*args, **kwargs)

        return recording

    original = module.make_anchors

    def anchors():
        original()
        monkeypatch.setattr(module.old_policy, "sample", spy(module.old_policy))
        monkeypatch.setattr(module.policy, "sample", spy(module.policy))

    monkeypatch.setattr(module, "make_anchors", anchors)
    _fit(module, 2)
    assert callers and all(c is module.old_policy for c in callers)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"timestep_range": (3, 12)}, "timestep_range"),
        ({"timesteps_per_sample": 11}, "timesteps_per_sample"),
        ({"timestep_sampling": "grid"}, "timestep_sampling"),
        ({"nft_beta": 0.0}, "nft_beta"),
        ({"eta_max": 1.0}, "eta_max"),
    ],
)
def test_bad_settings_fail_at_construction(kwargs, match):
    with pytest.raises(ValueError, match=match):
        DiffusionNFT(_tiny(), warm_start=None, **kwargs)


class _HalfNaN(LatentMeanReward):
    """NaN for the first `bad` samples of each batch (all of them when bad is None)."""

    def __init__(self, bad=None):
        super().__init__()
        self.bad = bad

    def __call__(self, ctx):
        r = super().__call__(ctx).clone()
        r[: self.bad] = float("nan")
        return r


def test_bad_rewards_train_nothing_and_every_bad_step_is_skipped():
    module = AdvantageWeightedMatching(_tiny(), warm_start=None, rewards=[_HalfNaN()], num_steps=4,
                                       timesteps_per_sample=2, lr=1e-2)
    start = copy.deepcopy(module.policy.state_dict())
    trainer = _fit(module, 2)
    assert trainer.global_step == 2 and module.empty_batches == 2 and module.bad_rewards == 12
    assert all(torch.equal(v, module.policy.state_dict()[k]) for k, v in start.items())
    partial = DiffusionNFT(_tiny(), warm_start=None, rewards=[_HalfNaN(2)], num_steps=4,
                           timesteps_per_sample=2, lr=1e-2)
    trainer = _fit(partial, 1)
    assert partial.bad_rewards == 2 and partial.empty_batches == 0
    assert trainer.logged_metrics["train/bad_rewards"] == 2
