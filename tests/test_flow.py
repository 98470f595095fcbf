"""Flow policies and FlowGRPO on a tiny SD3 transformer: sampling, log-probs, CFG, windows, recipes."""

import json
import math

import lightning as L
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from unirl_lightning.callbacks import PolicyEMA
from unirl_lightning.data import OnPolicyDataModule, generate_specs
from unirl_lightning.data.datamodule import PromptBatch
from unirl_lightning.models.flow import TinyFlowConfig, TinyFlowModel
from unirl_lightning.modules import flow_grpo
from unirl_lightning.modules.flow_grpo import FlowGRPO
from unirl_lightning.modules.training import warmup_then_decay
from unirl_lightning.data import FlowSceneDataModule
from unirl_lightning.modules.flow_pretrain import FlowWarmStart
from unirl_lightning.worlds import render_batch
from unirl_lightning.objectives import noise_aware_step_weights
from grad_capture import (LatentMeanReward, PoisonedLatentMean, assert_follows_advantages,
                          capture_backward_grads, flow_log_prob_change, record_rollouts)
from unirl_lightning.testing import tiny_sd3_pipeline

PROMPTS = ["a photo of a red square", "a photo of two circles", "a photo of a cross left of a triangle"]


def _tiny(**overrides) -> TinyFlowModel:
    torch.manual_seed(0)
    return TinyFlowModel(TinyFlowConfig(num_layers=1, num_heads=2, head_dim=8, text_dim=16, **overrides))


def _trainer(tmp_path, steps, callbacks=()):
    return L.Trainer(
        max_steps=steps,
        accelerator="cpu",
        devices=1,
        logger=L.pytorch.loggers.TensorBoardLogger(tmp_path),
        enable_checkpointing=False,
        limit_val_batches=1,
        val_check_interval=steps,
        check_val_every_n_epoch=None,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=list(callbacks),
    )


def _data(P=2, G=3):
    return OnPolicyDataModule(num_train=60, num_val=12, prompts_per_step=P, group_size=G, val_batch_size=6)


class _Record(L.Callback):
    """Keeps every training step's logged metrics."""

    def __init__(self):
        self.rows = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.rows.append({k: float(v) for k, v in trainer.callback_metrics.items()})


# ---- the policy ---------------------------------------------------------------------------------
def test_codec_round_trips_rendered_scenes_exactly():
    policy = _tiny()
    specs = generate_specs(24, ["square", "circle", "triangle", "cross"], seed=0)
    images, _ = render_batch(specs, list(range(24)), policy.world)
    latents = policy.encode_images(images)
    assert latents.shape == (24, *policy.latent_shape)
    assert torch.equal(policy.decode(latents), images)
    assert torch.equal(policy.decode(latents + 0.3 * torch.randn_like(latents)), images)  # snaps to codes


def test_off_manifold_proxy_is_zero_on_codes_and_grows_with_drift():
    policy = _tiny()
    specs = generate_specs(8, ["square", "circle", "triangle", "cross"], seed=1)
    latents = policy.encode_images(render_batch(specs, list(range(8)), policy.world)[0])
    assert torch.allclose(policy.off_manifold(latents), torch.zeros(8), atol=1e-6)
    # half way between two codes that differ in one attribute (one-hot swap in two channels): 0.5
    codes = policy.codec.codes
    a, b = codes[1], next(c for c in codes[2:] if (c != codes[1]).sum() == 2)
    mid = ((a + b) / 2).view(1, -1, 1, 1).expand(1, -1, *latents.shape[-2:])
    assert torch.allclose(policy.off_manifold(mid), torch.tensor([0.5]), atol=1e-5)
    noisy = [policy.off_manifold(latents + s * torch.randn_like(latents)).mean() for s in (0.1, 0.3)]
    assert 0 < noisy[0] < noisy[1]


def test_text_encoder_reads_word_order_and_encodes_rows_independently():
    """Which colour goes with which shape is word order: the default encoder (one transformer
    layer, position embeddings at the word embeddings' scale) tells the two prompts apart in
    both streams; the embeddings-only encoder's pooled vector is a bag of words."""
    a, b = "a photo of a red square and a blue circle", "a photo of a blue square and a red circle"
    enc = _tiny().text_encoder
    assert len(enc.layers) == 1 and enc.pos.std() > 0.5 * enc.embed.weight.std()
    both = enc([a, b])
    ca, cb = both.select(torch.tensor([0])), both.select(torch.tensor([1]))
    assert not torch.allclose(ca.pooled, cb.pooled, atol=1e-4)
    # the colour words swap places, yet the state at each shape word changes (contextual)
    ids = enc.ids([a])[0].tolist()
    square = ids.index(enc.ids(["square"])[0, 0].item())
    assert not torch.allclose(ca.hidden[0, square], cb.hidden[0, square], atol=1e-4)
    # rows are encoded independently (padding is masked out of attention and of the pool)
    alone, padded = enc(["a red square"]), enc(["a red square", a])
    torch.testing.assert_close(alone.hidden[0, :3], padded.hidden[0, :3])
    torch.testing.assert_close(alone.pooled[0], padded.pooled[0])
    bag = _tiny(text_layers=0).text_encoder([a, b]).pooled
    torch.testing.assert_close(bag[0], bag[1])


def test_empty_prompt_is_finite_and_the_same_on_the_fused_inference_path():
    """A text policy can write an empty prompt. Eval mode without grad takes PyTorch's fused encoder
    path (as the frozen reference does), where a row with every key masked comes out NaN unless one
    key stays unmasked."""
    torch.manual_seed(0)
    enc = TinyFlowModel(TinyFlowConfig()).text_encoder  # the default size takes the fused path
    prompts = ["", "a photo of a red square"]
    with torch.no_grad():
        train = enc.train()(prompts)
        fused = enc.eval()(prompts)
    for field in ("hidden", "pooled"):
        assert torch.isfinite(getattr(fused, field)).all()
        torch.testing.assert_close(getattr(fused, field), getattr(train, field), rtol=1e-4, atol=1e-5)


def test_image_positions_are_spread_learned_and_old_folders_keep_sd3s(tmp_path):
    """The default cell positions are SD3's sincos table at positions 0, 4, 8, 12 (neighbouring
    cells far apart, relative offsets still a function of the distance), trained with the model;
    a folder saved before the fields loads SD3's own fixed table (spread 1)."""
    import json

    from diffusers.models.embeddings import get_2d_sincos_pos_embed

    policy = _tiny()
    table = policy.transformer.pos_embed.pos_embed  # [1, 16, inner]
    assert isinstance(table, torch.nn.Parameter) and table.shape == (1, 16, 16)
    inner = table.shape[-1]
    sd3 = get_2d_sincos_pos_embed(inner, 4, base_size=4, output_type="pt").float()
    neighbours = lambda t: (t[0, 0] - t[0, 1]).norm() / t[0, 0].norm()  # noqa: E731
    assert neighbours(table) > 1.5 * neighbours(sd3.unsqueeze(0))
    torch.testing.assert_close(
        table.detach()[0],
        get_2d_sincos_pos_embed(inner, 4, base_size=4, interpolation_scale=0.25, output_type="pt").float(),
    )
    # it is trained: FlowWarmStart's loss reaches it
    x = torch.randn(2, *policy.latent_shape)
    policy.velocity(x, torch.tensor([0.5, 0.5]), policy.encode_text(PROMPTS[:2])).square().mean().backward()
    assert table.grad is not None and table.grad.abs().sum() > 0
    # an old folder: config.json without the fields -> SD3's fixed table, loaded as saved
    old = _tiny(image_position_spread=1.0, image_position_learned=False)
    torch.testing.assert_close(old.transformer.pos_embed.pos_embed[0], sd3)
    old.save_pretrained(tmp_path / "old")
    cfg = json.loads((tmp_path / "old" / "config.json").read_text())
    del cfg["image_position_spread"], cfg["image_position_learned"]
    (tmp_path / "old" / "config.json").write_text(json.dumps(cfg))
    loaded = TinyFlowModel.from_pretrained(tmp_path / "old")
    assert loaded.config.image_position_spread == 1.0 and not loaded.config.image_position_learned
    assert not isinstance(loaded.transformer.pos_embed.pos_embed, torch.nn.Parameter)
    torch.testing.assert_close(loaded.transformer.pos_embed.pos_embed[0], sd3)


@pytest.mark.parametrize("cfg_scale", [1.0, 3.0])
@pytest.mark.parametrize("kind", ["sde", "cps"])
def test_rollout_logprobs_equal_recomputed(cfg_scale, kind):
    policy = _tiny()
    rollout = policy.sample(
        PROMPTS,
        num_steps=6,
        noise_level=0.7,
        cfg_scale=cfg_scale,
        kind=kind,
        generator=torch.Generator().manual_seed(0),
    )
    assert rollout.latents.shape == (3, 7, *policy.latent_shape) and rollout.log_probs.shape == (3, 6)
    assert rollout.images.dtype == torch.uint8 and rollout.images.shape == (3, 3, 32, 32)
    for j in range(6):
        out = policy.step_log_prob(rollout, j)
        torch.testing.assert_close(out.log_prob, rollout.log_probs[:, j], rtol=0, atol=1e-5)


def test_cfg_is_the_guided_combination_and_rescoring_needs_the_same_scale():
    policy = _tiny()
    x, sigma = torch.randn(3, *policy.latent_shape), torch.full((3,), 0.5)
    cond = policy.encode_text(PROMPTS)
    with torch.no_grad():
        v_c = policy.velocity(x, sigma, cond)
        v_u = policy.velocity(x, sigma, policy.encode_text([None] * 3))
        torch.testing.assert_close(policy.velocity(x, sigma, cond, cfg_scale=4.0), v_u + 4.0 * (v_c - v_u))
    rollout = policy.sample(PROMPTS, num_steps=4, cfg_scale=4.0, generator=torch.Generator().manual_seed(1))
    wrong = policy.step_log_prob(type(rollout)(**{**rollout.__dict__, "cfg_scale": 1.0}), 1)
    assert not torch.allclose(wrong.log_prob, rollout.log_probs[:, 1])


def test_windowed_sampling_trains_only_window_steps_never_the_last():
    policy = _tiny()
    gen = torch.Generator().manual_seed(0)
    rollout = policy.sample(PROMPTS, num_steps=8, sde_window=(2, 5), generator=gen)
    assert rollout.trained_steps == [2, 3, 4]
    assert (rollout.log_probs[:, [0, 1, 5, 6, 7]] == 0).all() and (rollout.log_probs[:, 2:5] != 0).all()
    tail = policy.sample(PROMPTS, num_steps=8, sde_window=(5, 8), generator=gen)
    assert tail.trained_steps == [5, 6]
    assert policy.sample(PROMPTS, num_steps=8, generator=gen).trained_steps == list(range(7))
    with pytest.raises(ValueError):
        policy.sample(PROMPTS, num_steps=8, sde_window=(3, 9))


@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_noise_zero_sampling_equals_diffusers_euler_loop(shift):
    policy = _tiny(shift=shift)
    cond = policy.encode_text(PROMPTS)
    x0 = torch.randn(3, *policy.latent_shape, generator=torch.Generator().manual_seed(0))
    rollout = policy.sample(PROMPTS, num_steps=7, noise_level=0.0, latents=x0, decode=False)
    assert not rollout.train_mask.any() and (rollout.log_probs == 0).all()
    scheduler = FlowMatchEulerDiscreteScheduler(shift=shift)
    scheduler.set_timesteps(7)
    x = x0
    with torch.no_grad():
        for t in scheduler.timesteps:
            v = policy.velocity(x, (t / 1000).expand(3), cond)
            x = scheduler.step(v, t, x).prev_sample
    torch.testing.assert_close(rollout.latents[:, -1], x, rtol=0, atol=1e-6)


def test_save_load_round_trip(tmp_path):
    policy = _tiny()
    policy.save_pretrained(tmp_path / "m")
    loaded = TinyFlowModel.from_pretrained(tmp_path / "m")
    assert loaded.config == policy.config
    for (k, a), (_, b) in zip(policy.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), k


# ---- the recipes --------------------------------------------------------------------------------
def _snapshot(policy):
    return {k: v.detach().clone() for k, v in policy.state_dict().items()}


@pytest.mark.parametrize("cfg_scale", [1.0, 2.5])
def test_flow_grpo_on_policy_ratio_is_one(tmp_path, cfg_scale):
    """mu = 1, one micro-batch equal to the rollout batch: stored and recomputed log-probs agree."""
    module = FlowGRPO(_tiny(), warm_start=None, num_steps=4, micro_batch_size=6, cfg_scale=cfg_scale, lr=1e-3)
    trainer = _trainer(tmp_path, 1)
    trainer.fit(module, datamodule=_data(P=2, G=3))
    m = trainer.logged_metrics
    assert float(m["policy/ratio_mean"]) == 1.0 and float(m["policy/approx_kl"]) == 0.0
    assert float(m["policy/clip_frac"]) == 0.0


def test_flow_grpo_velocity_mse_zero_at_start_then_positive(tmp_path):
    policy = _tiny()
    before = _snapshot(policy)
    record = _Record()
    module = FlowGRPO(policy, warm_start=None, num_steps=4, beta=0.1, lr=3e-3)
    trainer = _trainer(tmp_path, 3, [record])
    trainer.fit(module, datamodule=_data())
    assert record.rows[0]["policy/velocity_mse"] == 0.0 and record.rows[0]["policy/reg_velocity_mse"] == 0.0
    assert record.rows[-1]["policy/velocity_mse"] > 0.0
    changed = [k for k, v in policy.state_dict().items() if not torch.equal(before[k], v)]
    assert any(k.startswith("transformer.") for k in changed) and any(
        k.startswith("text_encoder.") for k in changed
    )
    assert (
        "val/geneval/overall" in trainer.logged_metrics and "reward/geneval_partial" in trainer.logged_metrics
    )
    # the reference stays frozen at the initial weights
    ref = module.reference.state_dict()
    assert all(torch.equal(before[k], ref[k]) for k in before)


def test_non_finite_gradients_skip_the_step_instead_of_writing_nan_into_the_policy(tmp_path):
    """A NaN in the loss (here a reference that outputs NaN, as an empty prompt once made it) skips
    the optimiser step with a warning and a logged count; the policy keeps its finite weights."""
    policy = _tiny()
    before = _snapshot(policy)
    record = _Record()
    module = FlowGRPO(policy, warm_start=None, num_steps=3, beta=0.1, lr=1e-2)
    with torch.no_grad():
        module.reference.transformer.proj_out.weight.fill_(float("nan"))
    trainer = _trainer(tmp_path, 2, [record])
    with pytest.warns(UserWarning, match="non-finite gradients"):
        trainer.fit(module, datamodule=_data())
    assert [r["train/skipped_steps"] for r in record.rows] == [1.0, 2.0]
    assert all(torch.equal(before[k], v) for k, v in policy.state_dict().items())


def test_lora_flow_grpo_trains_adapters_against_the_base_model(tmp_path):
    """LoRA: only adapters train, the base (adapters off) is the reference, saving merges them."""
    policy = _tiny()
    base = TinyFlowModel(policy.config)
    base.load_state_dict(policy.state_dict())
    record = _Record()
    module = FlowGRPO(
        policy,
        warm_start=None,
        num_steps=4,
        beta=0.1,
        lr=3e-2,
        lora_rank=4,
        lora_alpha=8,
        save_to=str(tmp_path / "merged"),
    )
    assert module.reference is None  # no copy: the base model is the reference
    trainer = _trainer(tmp_path, 3, [record])
    trainer.fit(module, datamodule=_data())
    trainable = [n for n, p in policy.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_" in n for n in trainable) and not policy.text_trainable
    assert policy.lora_scaling == 2.0
    assert record.rows[0]["policy/velocity_mse"] == 0.0  # B starts at 0: the adapted model is the base
    assert record.rows[-1]["policy/velocity_mse"] > 0.0
    x = torch.randn(3, *policy.latent_shape)
    sigma = torch.full((3,), 0.6)
    with torch.no_grad():
        v_base = base.velocity(x, sigma, base.encode_text(PROMPTS))
        v_policy = policy.velocity(x, sigma, policy.encode_text(PROMPTS))
        with policy.adapters_disabled():
            v_off = policy.velocity(x, sigma, policy.encode_text(PROMPTS))
        merged = TinyFlowModel.from_pretrained(tmp_path / "merged")  # plain weights, no peft needed
        v_merged = merged.velocity(x, sigma, merged.encode_text(PROMPTS))
    torch.testing.assert_close(v_off, v_base)
    assert not torch.allclose(v_policy, v_base, atol=1e-4)
    torch.testing.assert_close(v_merged, v_policy, rtol=1e-4, atol=1e-5)


def test_merge_lora_is_base_plus_scaled_product():
    from unirl_lightning.models.lora import merge_lora

    torch.manual_seed(0)
    w, b, lora_a, lora_b = torch.randn(6, 5), torch.randn(6), torch.randn(2, 5), torch.randn(6, 2)
    state = {
        "blk.q.base_layer.weight": w,
        "blk.q.base_layer.bias": b,
        "blk.q.lora_A.default.weight": lora_a,
        "blk.q.lora_B.default.weight": lora_b,
        "norm.weight": torch.ones(5),
    }
    merged = merge_lora(state, 0.5)
    assert set(merged) == {"blk.q.weight", "blk.q.bias", "norm.weight"}
    torch.testing.assert_close(merged["blk.q.weight"], w + 0.5 * lora_b @ lora_a)
    assert merged["blk.q.bias"] is b and merge_lora({"norm.weight": b}, 0.5) == {"norm.weight": b}


def test_lora_arguments_are_checked():
    with pytest.raises(ValueError, match="lora_rank"):
        FlowGRPO(_tiny(), warm_start=None, lora_rank=-1)
    with pytest.raises(ValueError, match=r"lora_target_modules: \['no_such_layer'\]"):
        FlowGRPO(_tiny(), warm_start=None, lora_rank=2, lora_target_modules=["attn.to_q", "no_such_layer"])


# CPS's transition into the schedule's last sigma (0.001) has a std of ~1e-3, so its exact log-density
# is steep: one Adam step at lr 1e-3 overshoots it (every sample's log-prob falls); at 1e-5 an
# update stays where it follows its gradient.
@pytest.mark.parametrize(
    "regularizer,kind,lr", [("latent_kl", "sde", 1e-3), ("exact_kl", "sde", 1e-3), ("none", "cps", 1e-5)]
)
def test_flow_grpo_regularizers_and_kinds_follow_the_advantages(tmp_path, monkeypatch, regularizer, kind, lr):
    """Two passes over one rollout (mu = 2, the second clipped and regularised): re-scored after the
    update, each positive-advantage sample's trained transitions are likelier, each negative one's less."""
    policy = _tiny()
    before = _snapshot(policy)
    module = FlowGRPO(
        policy,
        rewards=[LatentMeanReward()],
        warm_start=None,
        num_steps=4,
        kind=kind,
        regularizer=regularizer,
        beta=0.04,
        num_iterations=2,
        micro_batch_size=4,
        lr=lr,
    )
    seen = record_rollouts(module, monkeypatch, flow_grpo)
    trainer = _trainer(tmp_path, 2)  # mu = 2 optimiser steps on one rollout
    trainer.fit(module, datamodule=_data())
    assert any(not torch.equal(before[k], v) for k, v in policy.state_dict().items())
    (recorded,) = seen
    assert_follows_advantages(flow_log_prob_change(policy, recorded.rollout), recorded.advantages)
    if regularizer != "none":
        assert f"policy/reg_{regularizer}" in trainer.logged_metrics


@pytest.mark.parametrize("weighting,power", [("noise_std", 1.0), ("noise_var", 2.0)])
def test_flow_grpo_step_weighting_scales_each_steps_gradient(tmp_path, weighting, power):
    """Same rollout, same weights: each trained step's backward is the uniform one times its weight."""
    runs = {}
    for name in ("uniform", weighting):
        module = FlowGRPO(
            _tiny(),
            rewards=[LatentMeanReward()],
            warm_start=None,
            num_steps=4,
            step_weighting=name,
            regularizer="none",
            track_reference=False,
            noise_level=1.0,
            micro_batch_size=6,
            lr=1e-3,
        )
        grads = capture_backward_grads(module, module.policy.transformer.proj_out.weight)
        torch.manual_seed(5)
        _trainer(tmp_path, 1).fit(module, datamodule=_data(P=2, G=3))
        runs[name] = grads
    sigmas = _tiny().sigmas(4)
    weights = noise_aware_step_weights(sigmas, torch.ones(4), [0, 1, 2], power=power)
    assert len(runs["uniform"]) == len(runs[weighting]) == 3 and weights[0] > 1.5 * weights[2]
    for w, g_uniform, g_weighted in zip(weights, runs["uniform"], runs[weighting]):
        assert g_uniform.abs().sum() > 0
        torch.testing.assert_close(g_weighted, w * g_uniform, rtol=1e-4, atol=1e-9)
    with pytest.raises(ValueError, match="step_weighting must be one of"):
        FlowGRPO(_tiny(), warm_start=None, step_weighting="linear")


class _FirstGroupTiesReward(LatentMeanReward):
    """LatentMeanReward, with the first group's three images all scored alike (zero advantage)."""

    def __call__(self, ctx):
        reward = super().__call__(ctx)
        reward[:3] = 0.5
        return reward


def test_skipping_tied_groups_leaves_the_policy_gradient_unchanged(tmp_path):
    """`train_tied_groups: False` back-propagates only the rows with a non-zero advantage: the same
    policy gradient per step, from half the rows."""
    runs, logged = {}, {}
    for tied in (True, False):
        record = _Record()
        module = FlowGRPO(
            _tiny(),
            rewards=[_FirstGroupTiesReward()],
            warm_start=None,
            num_steps=4,
            regularizer="none",
            track_reference=False,
            noise_level=1.0,
            micro_batch_size=2,
            same_latent=True,
            train_tied_groups=tied,
            lr=1e-3,
        )
        grads = capture_backward_grads(module, module.policy.transformer.proj_out.weight)
        torch.manual_seed(5)
        _trainer(tmp_path, 1, [record]).fit(module, datamodule=_data(P=2, G=3))
        runs[tied], logged[tied] = grads, record.rows[0]
    assert len(runs[True]) == 9 and len(runs[False]) == 6  # 3 steps x 3 or 2 micro-batches of 2 rows
    assert (logged[True]["train/trained_rows_frac"], logged[False]["train/trained_rows_frac"]) == (1.0, 0.5)
    assert logged[True]["train/zero_std_frac"] == logged[False]["train/zero_std_frac"] == 0.5
    per_step = {
        k: [torch.stack(v)[i::3].sum(0) for i in range(3)] for k, v in runs.items()
    }  # chunk-major order
    for full, skipped in zip(per_step[True], per_step[False]):
        assert full.abs().sum() > 0
        torch.testing.assert_close(skipped, full, rtol=1e-4, atol=1e-9)


def test_flow_grpo_window_trains_only_window_steps(tmp_path):
    record = _Record()
    module = FlowGRPO(_tiny(), warm_start=None, num_steps=6, sde_window_size=2, lr=1e-3)
    trainer = _trainer(tmp_path, 2, [record])
    trainer.fit(module, datamodule=_data())
    assert [r["train/trained_steps"] for r in record.rows] == [2.0, 2.0]
    fixed = FlowGRPO(_tiny(), warm_start=None, num_steps=6, sde_window=(3, 6))
    assert fixed.policy.sample(PROMPTS, num_steps=6, sde_window=fixed.sde_window()).trained_steps == [3, 4]


def test_random_window_weights_are_normalised_over_every_coverable_step():
    """A random one-step window (TempFlow-GRPO's branching) weighs its step against all nine the
    window can land on, so early windows outweigh late ones as in the full-trajectory weighting."""
    module = FlowGRPO(_tiny(), warm_start=None, num_steps=10, sde_window_size=1, step_weighting="noise_std")
    full = noise_aware_step_weights(module.policy.sigmas(10), torch.ones(10), list(range(9)))
    for start in (0, 4, 8):
        rollout = module.policy.sample(PROMPTS[:1], num_steps=10, sde_window=(start, start + 1))
        assert rollout.trained_steps == [start]
        torch.testing.assert_close(torch.tensor(module.step_weights(rollout)), full[start : start + 1])
    assert full[0] > 8 * full[8]


def test_random_windows_stay_inside_sde_window_and_weigh_against_its_steps():
    """Flow-GRPO-Fast's `sde_window_range`: with a size, `sde_window` bounds where windows land."""
    module = FlowGRPO(
        _tiny(),
        warm_start=None,
        num_steps=10,
        sde_window=(1, 6),
        sde_window_size=2,
        step_weighting="noise_std",
        noise_level=1.0,
    )
    torch.manual_seed(0)
    assert {module.sde_window() for _ in range(200)} == {(1, 3), (2, 4), (3, 5), (4, 6)}
    in_range = noise_aware_step_weights(module.policy.sigmas(10), torch.ones(10), [1, 2, 3, 4, 5])
    rollout = module.policy.sample(PROMPTS[:1], num_steps=10, noise_level=1.0, sde_window=(4, 6))
    torch.testing.assert_close(torch.tensor(module.step_weights(rollout)), in_range[3:5])
    default = FlowGRPO(_tiny(), warm_start=None, num_steps=10, sde_window_size=3)
    assert {default.sde_window() for _ in range(300)} == {(i, i + 3) for i in range(7)}  # never the last step
    with pytest.raises(ValueError, match=r"sde_window_size must be in 1..3 .*\[6, 9\)"):
        FlowGRPO(_tiny(), warm_start=None, num_steps=10, sde_window=(6, 10), sde_window_size=4)
    with pytest.raises(ValueError, match="sde_window must satisfy"):
        FlowGRPO(_tiny(), warm_start=None, num_steps=10, sde_window=(5, 12), sde_window_size=2)


def test_flow_grpo_accumulates_rollouts_per_update(tmp_path, monkeypatch):
    record = _Record()
    policy = _tiny()
    before = _snapshot(policy)
    module = FlowGRPO(policy, warm_start=None, num_steps=3, rollouts_per_update=2, lr=1e-3)
    seen = record_rollouts(module, monkeypatch, flow_grpo)
    trainer = _trainer(tmp_path, 1, [record])  # max_steps counts optimiser steps: 2 rollouts, 1 update
    trainer.fit(module, datamodule=_data())
    assert len(record.rows) == 2 and trainer.global_step == 1
    assert record.rows[1]["policy/ratio_mean"] == 1.0  # no update between the two rollouts
    assert any(not torch.equal(before[k], v) for k, v in policy.state_dict().items())
    # the one update ascends the objective of both rollouts together: the advantage-weighted change
    # of their log-probs is positive (each rollout's alone need not be: they share the step)
    assert [len(r.rollout) for r in seen] == [6, 6]
    assert sum(float((r.advantages * flow_log_prob_change(policy, r.rollout)).sum()) for r in seen) > 0


@pytest.mark.parametrize("decay", ["constant", "linear", "cosine"])
def test_lr_schedule_is_warmup_then_the_decay_to_its_floor(decay):
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=2.0)
    sched = warmup_then_decay(opt, 2, decay, total_steps=6, min_ratio=0.25)
    lrs = []
    for _ in range(9):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    progress = [min(max(step - 2, 0) / 4, 1.0) for step in range(9)]
    shape = {
        "constant": lambda p: 1.0,
        "linear": lambda p: 1 - p,
        "cosine": lambda p: 0.5 * (1 + math.cos(math.pi * p)),
    }[decay]
    expected = [
        2.0 * (step + 1) / 2 if step < 2 else 2.0 * (1.0 if decay == "constant" else 0.25 + 0.75 * shape(p))
        for step, p in enumerate(progress)
    ]
    assert lrs == pytest.approx(expected)
    assert lrs[-1] == pytest.approx(2.0 if decay == "constant" else 0.5)  # held at the floor after the end


def test_flow_grpo_decays_the_lr_per_optimiser_step_to_max_steps(tmp_path):
    record = _Record()
    module = FlowGRPO(_tiny(), warm_start=None, num_steps=3, num_iterations=2, lr=1e-3, lr_decay="linear")
    trainer = _trainer(tmp_path, 4, [record])  # 2 rollouts x 2 passes = 4 optimiser steps
    trainer.fit(module, datamodule=_data())
    assert trainer.global_step == 4
    assert [r["train/lr"] for r in record.rows] == pytest.approx(
        [1e-3 * 2 / 4, 0.0]
    )  # logged after each rollout's passes


def test_lr_decay_without_max_steps_fails_before_any_rollout(tmp_path):
    module = FlowGRPO(_tiny(), warm_start=None, num_steps=3, lr_decay="cosine")
    trainer = L.Trainer(
        max_epochs=1,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    module.make_rollouts = None  # any rollout would raise TypeError instead of the message below
    with pytest.raises(ValueError, match="lr_decay 'cosine' decays to trainer.max_steps"):
        trainer.fit(module, datamodule=_data())
    with pytest.raises(ValueError, match="model.lr_decay must be one of"):
        FlowGRPO(_tiny(), warm_start=None, lr_decay="step")


class _LiveParams(L.Callback):
    """The policy's trainable parameters after every optimiser step (placed before PolicyEMA)."""

    def __init__(self):
        self.states = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step > len(self.states):
            self.states.append(
                {k: p.detach().clone() for k, p in pl_module.policy.named_parameters() if p.requires_grad}
            )


def test_policy_ema_is_what_flow_grpo_saves(tmp_path):
    """The average of the trainable weights (Flow-GRPO's EMA) is saved; rollouts used the live ones."""
    policy = _tiny()
    start = {k: p.detach().clone() for k, p in policy.named_parameters()}
    live = _LiveParams()
    module = FlowGRPO(policy, warm_start=None, num_steps=3, beta=0.1, lr=3e-3, save_to=str(tmp_path / "ema"))
    trainer = _trainer(tmp_path, 3, [live, PolicyEMA(decay=0.5, warmup=False)])
    trainer.fit(module, datamodule=_data())
    saved = TinyFlowModel.from_pretrained(tmp_path / "ema").state_dict()
    assert len(live.states) == 3
    for name, value in start.items():
        expected = value
        for state in live.states:
            expected = 0.5 * expected + 0.5 * state[name]
        torch.testing.assert_close(saved[name], expected)
    moved = [k for k in start if not torch.allclose(live.states[-1][k], start[k])]
    assert moved and any(not torch.allclose(saved[k], live.states[-1][k]) for k in moved)


def test_same_latent_shares_the_initial_noise_within_groups():
    from unirl_lightning.data.datamodule import PromptBatch

    module = FlowGRPO(_tiny(), warm_start=None, num_steps=4, same_latent=True)
    specs = [{"prompt": p} for p in PROMPTS[:2] for _ in range(3)]
    ctx = module.make_rollouts(PromptBatch(specs=specs, group_ids=torch.tensor([7, 7, 7, 9, 9, 9])))
    x0 = ctx.rollout.latents[:, 0]
    assert torch.equal(x0[0], x0[2]) and torch.equal(x0[3], x0[5]) and not torch.equal(x0[0], x0[3])
    assert not torch.equal(ctx.rollout.latents[0, -1], ctx.rollout.latents[1, -1])  # SDE steps differ


def test_grouped_sampling_runs_the_ode_prefix_once_per_group_and_matches_the_full_batch():
    """Rows sharing prompt and noise take the ODE steps before the SDE window once per group; the
    states equal the ungrouped sampler's, and every later transition re-scores to its log-prob."""
    policy = _tiny()
    prompts = [p for p in PROMPTS for _ in range(3)]
    groups = torch.tensor([4, 4, 4, 0, 0, 0, 2, 2, 2])
    x0 = torch.randn(3, *policy.latent_shape, generator=torch.Generator().manual_seed(0)).repeat_interleave(
        3, 0
    )
    batches = []
    policy.transformer.register_forward_pre_hook(
        lambda m, args, kwargs: batches.append(kwargs["hidden_states"].shape[0]), with_kwargs=True
    )
    grouped = policy.sample(
        prompts,
        num_steps=8,
        noise_level=0.9,
        sde_window=(3, 5),
        latents=x0,
        groups=groups,
        generator=torch.Generator().manual_seed(1),
    )
    assert batches == [3, 3, 3] + [9] * 5
    full = policy.sample(
        prompts,
        num_steps=8,
        noise_level=0.9,
        sde_window=(3, 5),
        latents=x0,
        generator=torch.Generator().manual_seed(1),
    )
    torch.testing.assert_close(grouped.latents[:, :4], full.latents[:, :4], rtol=0, atol=1e-6)
    assert (grouped.log_probs[:, :3] == 0).all() and grouped.trained_steps == [3, 4]
    assert not torch.equal(grouped.latents[0, 4], grouped.latents[1, 4])  # the window splits the group
    for j in range(8):
        torch.testing.assert_close(
            policy.step_log_prob(grouped, j).log_prob, grouped.log_probs[:, j], rtol=0, atol=1e-5
        )
    drawn = policy.sample(prompts, num_steps=8, sde_window=(3, 5), groups=groups)  # noise drawn per group
    assert torch.equal(drawn.latents[0, 3], drawn.latents[2, 3]) and not torch.equal(
        drawn.latents[0, 3], drawn.latents[3, 3]
    )
    with pytest.raises(ValueError, match="share their prompt"):
        policy.sample(prompts, num_steps=8, sde_window=(3, 5), groups=torch.zeros(9, dtype=torch.long))
    with pytest.raises(ValueError, match="same latents"):
        policy.sample(
            prompts,
            num_steps=8,
            sde_window=(3, 5),
            groups=groups,
            latents=torch.randn(9, *policy.latent_shape),
        )
    with pytest.raises(ValueError, match="one group id per row"):
        policy.sample(prompts, num_steps=8, groups=groups[:4])


@torch.no_grad()
def _flow_matching_loss(policy: TinyFlowModel, batches: list[dict], draws: int = 16) -> float:
    """The warm start's velocity MSE on `batches`, over the same `draws` noises and levels each call."""
    gen, losses = torch.Generator().manual_seed(0), []
    for batch in batches:
        x0 = policy.encode_images(batch["images"]).repeat(draws, 1, 1, 1)
        noise, s = torch.randn(x0.shape, generator=gen), torch.rand(len(x0), generator=gen).view(-1, 1, 1, 1)
        cond = policy.encode_text(list(batch["prompts"]) * draws)
        v = policy.velocity(s * noise + (1 - s) * x0, s.flatten(), cond)
        losses.append((v - (noise - x0)).square().mean())
    return float(torch.stack(losses).mean())


def test_flow_warm_start_trains_and_saves(tmp_path, monkeypatch):
    policy = _tiny()
    before = _snapshot(policy)
    module = FlowWarmStart(
        policy, lr=1e-3, warmup_steps=1, max_steps=2, eval_num_steps=4, save_to=str(tmp_path / "ws")
    )
    batches, step = [], module.training_step
    monkeypatch.setattr(
        module, "training_step", lambda batch, batch_idx: batches.append(batch) or step(batch, batch_idx)
    )
    data = FlowSceneDataModule(batch_size=8, num_train=60, num_val=12, val_batch_size=6)
    _trainer(tmp_path, 2).fit(module, datamodule=data)
    assert any(not torch.equal(before[k], v) for k, v in policy.state_dict().items())
    initial = _tiny()
    initial.load_state_dict(before)
    assert len(batches) == 2  # the flow-matching loss on the scenes it trained on fell
    assert _flow_matching_loss(policy, batches) < _flow_matching_loss(initial, batches)
    loaded = TinyFlowModel.from_pretrained(tmp_path / "ws")
    assert torch.equal(loaded.transformer.proj_out.weight, policy.transformer.proj_out.weight)


# ---- the real-model adapter on a tiny local SD3 pipeline (no downloads) --------------------------
def test_diffusers_flow_policy_on_a_tiny_local_sd3_pipeline(tmp_path):
    from unirl_lightning.models.flow import DiffusersFlowPolicy

    tiny_sd3_pipeline(tmp_path / "pipe")
    policy = DiffusersFlowPolicy(
        str(tmp_path / "pipe"), resolution=64, torch_dtype="float32", max_sequence_length=8, drop_t5=True
    )
    assert policy.latent_shape == (4, 8, 8) and not policy.text_trainable
    rollout = policy.sample(
        ["a red square", "two circles"],
        num_steps=4,
        cfg_scale=2.0,
        generator=torch.Generator().manual_seed(0),
    )
    assert rollout.images.shape == (2, 3, 64, 64) and rollout.images.dtype == torch.uint8
    out = policy.step_log_prob(rollout, 1)
    torch.testing.assert_close(out.log_prob, rollout.log_probs[:, 1], rtol=0, atol=1e-5)
    out.log_prob.sum().backward()
    assert policy.transformer.proj_out.weight.grad is not None
    ref = policy.make_reference()
    assert ref.text_encoder is policy.text_encoder and ref.transformer is not policy.transformer
    assert not any(p.requires_grad for p in ref.transformer.parameters())
    policy.save_pretrained(tmp_path / "saved")
    loaded = DiffusersFlowPolicy.from_pretrained(tmp_path / "saved")
    assert torch.equal(loaded.transformer.proj_out.weight, policy.transformer.proj_out.weight)
    # FSDP: gathered full weights (this module's keys) are written in place of the live ones
    full = {k: v + 1 if k == "transformer.proj_out.weight" else v for k, v in policy.state_dict().items()}
    policy.save_pretrained(tmp_path / "gathered", state_dict=full)
    loaded = DiffusersFlowPolicy.from_pretrained(tmp_path / "gathered")
    assert torch.equal(loaded.transformer.proj_out.weight, policy.transformer.proj_out.weight + 1)
    # the frozen encoders and VAE (shared with the reference) stay whole; the transformer shards by blocks
    ignored = policy.fsdp_ignored_params()
    assert set(policy.vae.parameters()) <= ignored and set(policy.text_encoder.parameters()) <= ignored
    assert not ignored & set(policy.transformer.parameters())
    assert policy.fsdp_units()[-1] is policy.transformer
    # LoRA on the real SD3 transformer: adapters train, the saved folder holds merged plain weights
    policy.add_lora(4, 8.0)
    assert all(".lora_" in n for n, p in policy.named_parameters() if p.requires_grad)
    with torch.no_grad():
        for name, p in policy.transformer.named_parameters():
            if ".lora_B." in name:
                p.normal_(std=0.1)  # a trained adapter
    x, sigma = torch.randn(2, *policy.latent_shape), torch.full((2,), 0.5)
    cond = policy.encode_text(["a red square", "two circles"])
    with torch.no_grad():
        v_lora = policy.velocity(x, sigma, cond)
        with policy.adapters_disabled():
            v_base = policy.velocity(x, sigma, cond)
    assert not torch.allclose(v_lora, v_base, atol=1e-4)
    policy.save_pretrained(tmp_path / "lora")
    with torch.no_grad():
        v_loaded = DiffusersFlowPolicy.from_pretrained(tmp_path / "lora").velocity(x, sigma, cond)
    torch.testing.assert_close(v_loaded, v_lora, rtol=1e-4, atol=1e-5)


def test_auto_warm_start_is_trained_once_cached_and_loaded(tmp_path, monkeypatch):
    from unirl_lightning.modules import warm_start

    monkeypatch.setenv("UNIRL_CACHE", str(tmp_path / "cache"))
    recipe = {
        **warm_start.RECIPES["flow_warm_start"],
        "max_steps": 2,
        "batch_size": 8,
        "num_train": 60,
        "warmup_steps": 1,
    }
    monkeypatch.setitem(warm_start.RECIPES, "flow_warm_start", recipe)
    module = FlowGRPO(_tiny(), warm_start="auto", num_steps=3)
    module.setup("fit")
    folder = warm_start.warm_start_dir("flow_warm_start", module.policy)
    assert (folder / "model.safetensors").is_file()
    cached = TinyFlowModel.from_pretrained(folder)
    assert torch.equal(cached.transformer.proj_out.weight, module.policy.transformer.proj_out.weight)
    assert torch.equal(
        module.reference.transformer.proj_out.weight, module.policy.transformer.proj_out.weight
    )
    assert warm_start.ensure_flow_warm_start(module.policy) == folder  # cached: no retraining


def test_warm_start_recipes_keep_their_cache_keys():
    """The cache key hashes the recipe: a changed recipe retrains the warm start and moves every
    baseline in benchmarks/. These are the folders the published results started from."""
    from unirl_lightning.models import TinyUnifiedModel
    from unirl_lightning.modules.warm_start import VARIANTS, warm_start_dir

    assert warm_start_dir("warm_start", TinyUnifiedModel()).name == "19f4ca2ac4d3dfa5"
    masked = TinyUnifiedModel(image_order="masked")
    assert warm_start_dir("warm_start", masked).name == "b60c48255fc0b99f"  # the same recipe, masked
    named = {"mixture_first": ("19f4ca2ac4d3dfa5", "b60c48255fc0b99f"),  # the recipe itself
             "mixture": ("d86a011aff5ad5eb", "39aa48e797dabd6d"),  # None drops a key: no curriculum
             "position_first": ("3ae7bb7a9f07c708", "1f79dedaf3aa9b44")}
    for name, (autoregressive, masked_order) in named.items():
        recipe = VARIANTS["warm_start"][name]
        assert warm_start_dir("warm_start", TinyUnifiedModel(), recipe).name == autoregressive
        assert warm_start_dir("warm_start", masked, recipe).name == masked_order
    assert warm_start_dir("flow_warm_start", TinyFlowModel()).name == "851e3592ff44642e"  # mixture first
    position_first = VARIANTS["flow_warm_start"]["position_first"]
    assert warm_start_dir("flow_warm_start", TinyFlowModel(), position_first).name == "7860bf5e125ef882"


class _TiedReward(LatentMeanReward):
    """Every image scored alike: every group ties, every advantage is 0."""

    def __call__(self, ctx):
        return torch.full((len(ctx.specs),), 0.5)


@pytest.mark.parametrize("per_group_windows", [False, True])
def test_a_batch_with_every_group_tied_trains_nothing_and_the_run_goes_on(tmp_path, per_group_windows):
    """`train_tied_groups: False` with every group tied: no backward, counted, the next batches run."""
    windows = dict(sde_window_size=1, sde_window_per_group=True) if per_group_windows else {}
    record = _Record()
    module = FlowGRPO(
        _tiny(),
        rewards=[_TiedReward()],
        warm_start=None,
        num_steps=3,
        train_tied_groups=False,
        lr=1e-2,
        **windows,
    )
    before = _snapshot(module.policy)
    grads = capture_backward_grads(module, module.policy.transformer.proj_out.weight)
    _trainer(tmp_path, 3, [record]).fit(module, datamodule=_data())
    assert grads == [] and module.global_step == 3
    assert [r["train/empty_batches"] for r in record.rows] == [1.0, 2.0, 3.0]
    assert all(r["train/trained_rows_frac"] == 0.0 for r in record.rows)
    assert all(torch.equal(before[k], v) for k, v in module.policy.state_dict().items())


class _RaisesAtSecondRollout(LatentMeanReward):
    def __init__(self):
        super().__init__()
        self.calls = 0

    def __call__(self, ctx):
        self.calls += 1
        if self.calls == 2:
            raise RuntimeError("reward server went away")
        return super().__call__(ctx)


def test_a_run_that_raises_saves_its_last_completed_update(tmp_path):
    """The first update completes, the second batch's reward raises: `save_to` holds the policy after
    update 1 (not the initial weights, not a half-accumulated one) and says the run did not finish."""
    module = FlowGRPO(
        _tiny(),
        rewards=[_RaisesAtSecondRollout()],
        warm_start=None,
        num_steps=3,
        lr=1e-2,
        save_to=str(tmp_path / "policy"),
    )
    initial = _snapshot(module.policy)
    after_first = {}

    class _KeepFirstUpdate(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            after_first.update(_snapshot(pl_module.policy))
            trainer.save_checkpoint(tmp_path / "step1.ckpt")

    with pytest.raises(RuntimeError, match="reward server went away"):
        _trainer(tmp_path, 3, [_KeepFirstUpdate()]).fit(module, datamodule=_data())
    saved = TinyFlowModel.from_pretrained(tmp_path / "policy").state_dict()
    assert all(torch.equal(saved[k], after_first[k]) for k in saved)
    assert any(not torch.equal(saved[k], initial[k]) for k in saved)
    state = json.loads((tmp_path / "policy" / "training_state.json").read_text())
    assert (
        state["finished"] is False
        and state["global_step"] == 1
        and "reward server went away" in state["exception"]
    )

    # A new run is refused the interrupted run's folder before any compute; resuming writes over it.
    def again():
        return FlowGRPO(_tiny(), rewards=[LatentMeanReward()], warm_start=None, num_steps=3,
                        save_to=str(tmp_path / "policy"))

    with pytest.raises(FileExistsError, match="interrupted run .step 1"):
        _trainer(tmp_path, 2).fit(again(), datamodule=_data())
    resumed = again()
    resumed.override_checkpoint_settings = True  # the reward that raised is replaced
    _trainer(tmp_path, 2).fit(resumed, datamodule=_data(), ckpt_path=tmp_path / "step1.ckpt")
    assert not (tmp_path / "policy" / "training_state.json").exists()  # finished now
    saved = TinyFlowModel.from_pretrained(tmp_path / "policy").state_dict()
    assert all(torch.equal(saved[k], v) for k, v in _snapshot(resumed.policy).items())


@pytest.mark.parametrize("tied", [True, False])
def test_samples_with_bad_rewards_add_nothing_to_the_gradient(tmp_path, tied):
    """NaN / inf rewards on two rows: the step's gradient (policy loss and regulariser) equals that of
    the same rollout with those rows removed, and the step goes on, counted."""
    good = [0, 2, 3, 5]
    runs, logged = {}, {}
    for removed in (False, True):
        record = _Record()
        module = FlowGRPO(
            _tiny(),
            rewards=[PoisonedLatentMean(poison=not removed)],
            warm_start=None,
            num_steps=3,
            noise_level=1.0,
            beta=0.5,
            micro_batch_size=8,
            train_tied_groups=tied,
            lr=1e-3,
        )
        torch.manual_seed(3)
        with torch.no_grad():  # a reference apart from the policy: the regulariser has a gradient at once
            for p in module.reference.parameters():
                p.add_(0.05 * torch.randn_like(p))
        if removed:
            step = module.training_step

            def without_bad_rows(batch, batch_idx, step=step):
                specs, ids = [batch.specs[i] for i in good], batch.group_ids[good]
                return step(PromptBatch(specs, ids, batch.rollout.select(good)), batch_idx)

            module.training_step = without_bad_rows
        grads = capture_backward_grads(module, module.policy.transformer.proj_out.weight)
        torch.manual_seed(5)
        _trainer(tmp_path, 1, [record]).fit(module, datamodule=_data(P=2, G=3))
        runs[removed], logged[removed] = grads, record.rows[0]
    assert len(runs[False]) == len(runs[True]) == 2  # one micro-batch x 2 trained steps
    for with_bad, without in zip(runs[False], runs[True]):
        assert with_bad.abs().sum() > 0
        torch.testing.assert_close(with_bad, without, rtol=1e-4, atol=1e-9)
    assert logged[False]["train/bad_rewards"] == 2.0 and logged[True]["train/bad_rewards"] == 0.0
    assert logged[False]["train/skipped_steps"] == 0.0
    assert logged[False]["reward/total"] == pytest.approx(logged[True]["reward/total"])
    fracs = logged[False]["train/trained_rows_frac"], logged[True]["train/trained_rows_frac"]
    assert fracs[0] == pytest.approx(4 / 6 * fracs[1])


def test_a_batch_with_every_reward_nan_trains_nothing_and_the_run_goes_on(tmp_path):
    record = _Record()
    module = FlowGRPO(
        _tiny(), rewards=[PoisonedLatentMean(everywhere=True)], warm_start=None, num_steps=3, lr=1e-2
    )
    before = _snapshot(module.policy)
    grads = capture_backward_grads(module, module.policy.transformer.proj_out.weight)
    with pytest.warns(UserWarning, match="6 of 6 rewards at step 0 are NaN or inf from reward 'poisoned'"):
        _trainer(tmp_path, 3, [record]).fit(module, datamodule=_data())
    assert grads == [] and module.global_step == 3
    assert [r["train/empty_batches"] for r in record.rows] == [1.0, 2.0, 3.0]
    assert [r["train/bad_rewards_total"] for r in record.rows] == [6.0, 12.0, 18.0]
    assert all(r["train/bad_rewards"] == 6.0 and r["train/skipped_steps"] == 0.0 for r in record.rows)
    assert all(torch.equal(before[k], v) for k, v in module.policy.state_dict().items())
