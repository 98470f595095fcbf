"""UniGRPO: text policies (built-in and transformers), the reasoning task, the joint recipe, the CLI."""

from pathlib import Path

import lightning as L
import pytest
import torch

from grad_capture import LatentMeanReward, PoisonedLatentMean, capture_backward_grads
from unirl_lightning.data.datamodule import PromptBatch
from unirl_lightning.data.reasoning import (
    WARM_START_HELD_OUT,
    ReasoningDataModule,
    corrupt_answer,
    generate_reasoning_specs,
    reasoning_words,
    riddle_answer,
    split_reasoning_specs,
)
from unirl_lightning.data.specs import validate_spec
from unirl_lightning.models.flow import TinyFlowConfig, TinyFlowModel
from unirl_lightning.worlds.words import split_words, world_words
from unirl_lightning.models.text.policies import HFTextPolicy, TinyTextConfig, TinyTextPolicy, text_matches
from unirl_lightning.modules.unigrpo import UniGRPO
from unirl_lightning.modules.warm_start import greedy_accuracy, train_text_supervised

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


# ---- helpers ----------------------------------------------------------------------------------
def _tiny_text(**overrides) -> TinyTextPolicy:
    torch.manual_seed(0)
    return TinyTextPolicy(TinyTextConfig(d_model=32, n_layers=1, n_heads=2, **overrides))


def _tiny_flow() -> TinyFlowModel:
    torch.manual_seed(1)
    return TinyFlowModel(TinyFlowConfig(num_layers=1, num_heads=2, head_dim=8, text_dim=16))


def _word_tokenizer():
    """A word-level fast tokenizer over the reasoning task's words, built locally (no Hub)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(["[PAD]", "[UNK]", "[EOS]", *reasoning_words()])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]", eos_token="[EOS]"
    )


def _hf_text(arch: str) -> HFTextPolicy:
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    tok = _word_tokenizer()
    torch.manual_seed(0)
    common = dict(vocab_size=len(tok), pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    if arch == "llama":
        model = LlamaForCausalLM(
            LlamaConfig(
                hidden_size=32,
                intermediate_size=64,
                num_hidden_layers=2,
                num_attention_heads=2,
                num_key_value_heads=1,
                max_position_embeddings=64,
                bos_token_id=None,
                **common,
            )
        )
    else:  # GPT-2 has dropout by default: the wrapper must switch it off
        model = GPT2LMHeadModel(
            GPT2Config(
                n_embd=32, n_layer=2, n_head=2, n_positions=64, bos_token_id=tok.eos_token_id, **common
            )
        )
    return HFTextPolicy(model=model, tokenizer=tok, allowed_words=world_words())


def _riddles(n=6, seed=0):
    specs = generate_reasoning_specs(n, seed)
    return specs, [s["reasoning_prompt"] for s in specs]


def _trainer(steps, callbacks=()):
    return L.Trainer(
        max_steps=steps,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        limit_val_batches=1,
        val_check_interval=steps,
        check_val_every_n_epoch=None,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        callbacks=list(callbacks),
    )


def _data(P=2, G=3):
    return ReasoningDataModule(num_train=60, num_val=12, prompts_per_step=P, group_size=G, val_batch_size=12)


def _module(**kwargs) -> UniGRPO:
    args = dict(warm_start=None, text_warm_start=None, num_steps=3, max_new_tokens=10, lr=3e-3, text_lr=3e-3)
    return UniGRPO(_tiny_text(), _tiny_flow(), **{**args, **kwargs})


def _snapshot(module: torch.nn.Module) -> dict:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def _changed(before: dict, module: torch.nn.Module) -> list[str]:
    return [k for k, v in module.state_dict().items() if not torch.equal(before[k], v)]


class _Record(L.Callback):
    def __init__(self):
        self.rows = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.rows.append({k: float(v) for k, v in trainer.callback_metrics.items()})


# ---- text policies ----------------------------------------------------------------------------
@pytest.mark.parametrize(
    "make,temperature",
    [(_tiny_text, 1.0), (_tiny_text, 0.7), (lambda: _hf_text("llama"), 1.0), (lambda: _hf_text("gpt2"), 0.7)],
    ids=["tiny", "tiny-t0.7", "hf-llama", "hf-gpt2"],
)
def test_rollout_logprobs_equal_teacher_forced(make, temperature):
    policy = make().train()  # train mode: dropout must not make the two passes differ
    _, prompts = _riddles()
    gen = torch.Generator().manual_seed(0)
    out = policy.generate(prompts, max_new_tokens=8, temperature=temperature, generator=gen)
    assert out.tokens.shape == out.logprobs.shape == out.mask.shape and out.tokens.shape[0] == 6
    assert (
        out.mask[:, 0].all() and (out.logprobs[~out.mask] == 0).all() and (out.logprobs[out.mask] < 0).all()
    )
    logp = policy.logprobs(prompts, out)
    assert logp.requires_grad
    torch.testing.assert_close(logp.detach(), out.logprobs, rtol=0, atol=1e-5)
    # every written word is one the flow model's text encoder knows
    known = set(world_words())
    assert all(set(split_words(t)) <= known for t in out.texts)


def test_generation_is_seeded_and_stops_at_eos():
    policy = _tiny_text()
    _, prompts = _riddles()
    a = policy.generate(prompts, max_new_tokens=6, generator=torch.Generator().manual_seed(3))
    b = policy.generate(prompts, max_new_tokens=6, generator=torch.Generator().manual_seed(3))
    assert a.texts == b.texts and torch.equal(a.tokens, b.tokens)
    # a policy taught to stop right away writes EOS first: empty texts, one scored token each
    with torch.no_grad():
        policy.head.weight.zero_()
        policy.head.weight[policy.eos_id] = 1.0
        policy.ln_f.bias.fill_(1.0)
    out = policy.generate(prompts, max_new_tokens=6, temperature=0.0)
    assert out.texts == [""] * 6 and out.tokens.shape[1] == 1 and out.mask.all()


def test_supervised_warm_start_learns_riddles():
    policy = _tiny_text()
    specs = generate_reasoning_specs(200, 0, tasks=["colors"])
    losses = train_text_supervised(
        policy,
        [(s["reasoning_prompt"], s["prompt"]) for s in specs],
        steps=25,
        batch_size=16,
        lr=1e-2,
        log_every=0,
    )
    assert sum(losses[-5:]) / 5 < 0.4 * losses[0]
    assert 0.0 <= greedy_accuracy(policy, specs[:8]) <= 1.0


# ---- the reasoning task -----------------------------------------------------------------------
def test_reasoning_generator_is_deterministic_and_maps_riddles_to_specs():
    a, b = generate_reasoning_specs(60, 7), generate_reasoning_specs(60, 7)
    assert a == b and a != generate_reasoning_specs(60, 8)
    assert {s["tag"] for s in a} == {
        "single_object",
        "two_object",
        "counting",
        "colors",
        "position",
        "color_attr",
    }
    for s in a:
        validate_spec(s)
        assert s["reasoning_prompt"] != s["prompt"]
    words = set(reasoning_words())
    assert all(set(s["reasoning_prompt"].split()) <= words for s in a)
    by_riddle = {s["reasoning_prompt"]: s for s in generate_reasoning_specs(3000, 0)}
    counting = by_riddle["a photo of as many circles as a triangle has corners"]
    assert (
        counting["include"] == [{"class": "circle", "count": 3}]
        and counting["prompt"] == "a photo of three circles"
    )
    color = by_riddle["a photo of a square the color of grass"]
    assert color["include"] == [{"class": "square", "count": 1, "color": "green"}]
    pos = by_riddle["a photo of a cross left of the shape with four corners"]
    assert pos["prompt"] == "a photo of a cross left of a square"
    assert pos["include"] == [
        {"class": "square", "count": 1},
        {"class": "cross", "count": 1, "position": ["left of", 0]},
    ]
    assert riddle_answer("the color of coal") == "black" and riddle_answer("two plus two {P}") == 4


def test_split_holds_out_riddles_and_exclusion_works():
    train, val = split_reasoning_specs(300, 60, seed=0)
    assert len(train) == 300 and 0 < len(val) <= 60
    assert not {s["reasoning_prompt"] for s in train} & {s["reasoning_prompt"] for s in val}
    held = generate_reasoning_specs(300, 0, exclude_riddles=WARM_START_HELD_OUT)
    assert not {s["riddle"] for s in held} & set(WARM_START_HELD_OUT)
    import random

    rng = random.Random(0)
    for s in held[:50]:
        wrong = corrupt_answer(s, rng)
        assert not text_matches(wrong, s["prompt"]) and len(wrong.split()) == len(s["prompt"].split())


# ---- the recipe -------------------------------------------------------------------------------
def test_shared_advantage_reaches_both_policies_on_policy_ratio_one_velocity_mse_zero_at_start():
    module = _module(micro_batch_size=4, beta=0.1, beta_text=0.05)  # 6 rows: two micro-batches
    text_before, flow_before = _snapshot(module.text_policy), _snapshot(module.policy)
    record = _Record()
    trainer = _trainer(2, [record])
    trainer.fit(module, datamodule=_data(P=2, G=3))
    first, last = record.rows[0], record.rows[-1]
    # mu = 1: every micro-batch is scored before the single optimiser step, so both ratios are 1 (up to
    # float rounding: a micro-batch of 4 re-scores rows sampled in a batch of 6; text is sampled with a KV
    # cache)
    assert abs(first["image/ratio_mean"] - 1.0) < 1e-6 and first["image/approx_kl"] < 1e-12
    assert abs(first["text/ratio_mean"] - 1.0) < 1e-5
    assert first["image/clip_frac"] == 0.0 and first["text/clip_frac"] == 0.0
    # The reference is an exact copy, so the velocity MSE and the text KL are 0 up to float32 round-off:
    # the reference (eval mode, no gradient) runs the text encoder's nn.TransformerEncoderLayer on
    # PyTorch's fused fast path, the training policy on the unfused one, equal up to a few ulps (~1e-7
    # relative), so a mean square of ~1e-14 (1.3e-15 measured); one update at lr 3e-3 (below) gives > 1e-3.
    for key in ("image/velocity_mse", "image/reg_velocity_mse", "text/kl"):
        assert 0.0 <= first[key] < 1e-12, (key, first[key])
    assert last["image/velocity_mse"] > 1e-9 and last["text/kl"] > 1e-9
    for key in ("reward/total", "reward/std", "text/exact_prompt", "train/zero_std_frac", "text/len"):
        assert key in last
    # one advantage, both streams: parameters of both policies moved
    changed_text, changed_flow = (
        _changed(text_before, module.text_policy),
        _changed(flow_before, module.policy),
    )
    assert any(k.startswith("blocks.") for k in changed_text)
    assert any(k.startswith("transformer.") for k in changed_flow)
    # the frozen references stay at the initial weights
    assert not _changed(text_before, module.text_reference) and not _changed(flow_before, module.reference)
    assert "val/geneval/overall" in trainer.logged_metrics and "val/text_exact" in trainer.logged_metrics


def test_image_steps_follow_step_weighting():
    """UniGRPO's image loss takes FlowGRPO's `step_weighting`: per-step backward = uniform one x weight."""
    from unirl_lightning.objectives import noise_aware_step_weights

    runs = {}
    for weighting in ("uniform", "noise_std"):
        module = _module(
            train_text=False,
            rewards=[LatentMeanReward()],
            step_weighting=weighting,
            regularizer="none",
            track_reference=False,
            noise_level=1.0,
            micro_batch_size=6,
        )
        grads = capture_backward_grads(module, module.policy.transformer.proj_out.weight)
        torch.manual_seed(5)
        _trainer(1).fit(module, datamodule=_data(P=2, G=3))
        runs[weighting] = grads
    weights = noise_aware_step_weights(_tiny_flow().sigmas(3), torch.ones(3), [0, 1])
    assert len(runs["uniform"]) == len(runs["noise_std"]) == 2
    for w, g_uniform, g_weighted in zip(weights, runs["uniform"], runs["noise_std"]):
        assert g_uniform.abs().sum() > 0
        torch.testing.assert_close(g_weighted, w * g_uniform, rtol=1e-4, atol=1e-9)


def test_train_text_false_leaves_the_text_policy_unchanged():
    module = _module(train_text=False)
    text_before, flow_before = _snapshot(module.text_policy), _snapshot(module.policy)
    record = _Record()
    _trainer(1, [record]).fit(module, datamodule=_data())
    assert not _changed(text_before, module.text_policy) and _changed(flow_before, module.policy)
    assert module.text_reference is None and not any(k.startswith("text/ratio") for k in record.rows[-1])
    assert "text/exact_prompt" in record.rows[-1]


def test_rollouts_per_update_accumulates_both_streams_before_one_step():
    record = _Record()
    module = _module(rollouts_per_update=2)
    text_before, flow_before = _snapshot(module.text_policy), _snapshot(module.policy)
    trainer = _trainer(1, [record])  # max_steps counts optimiser steps: 2 rollouts, 1 update
    trainer.fit(module, datamodule=_data())
    assert len(record.rows) == 2 and trainer.global_step == 1
    second = record.rows[1]
    assert (
        abs(second["image/ratio_mean"] - 1.0) < 1e-6 and abs(second["text/ratio_mean"] - 1.0) < 1e-5
    )  # no step yet
    assert _changed(text_before, module.text_policy) and _changed(flow_before, module.policy)


def test_warmup_and_lr_decay_drive_both_policies_learning_rates():
    record = _Record()
    module = _module(warmup_steps=1, lr_decay="linear", lr_min_ratio=0.5)
    _trainer(3, [record]).fit(module, datamodule=_data())
    opt = module.optimizers().optimizer
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([3e-3 * 0.5, 3e-3 * 0.5])  # at the floor
    assert [r["train/lr"] for r in record.rows] == pytest.approx([3e-3, 3e-3 * 0.75, 3e-3 * 0.5])


def test_validation_scores_eval_repeats_images_per_greedy_text():
    module = _module(eval_repeats=3)
    judged, judge = [], module.judge
    module.judge = lambda images, specs: (judged.append([s["prompt"] for s in specs]), judge(images, specs))[
        1
    ]
    trainer = _trainer(1)
    trainer.validate(module, datamodule=_data())
    prompts = judged[0]
    assert len(prompts) == 36 and all(len(set(prompts[i : i + 3])) == 1 for i in range(0, 36, 3))
    m = trainer.callback_metrics
    assert 0.0 <= float(m["val/text_exact"]) <= 1.0 and "val/off_manifold" in m


def test_oracle_condition_and_checks():
    module = _module(image_condition="prompt")
    batch = _data()
    batch.setup()
    texts, text = module.write(batch.val_specs[:4])
    assert text is None and texts == [s["prompt"] for s in batch.val_specs[:4]]
    with pytest.raises(ValueError, match="text_temperature"):
        _module(text_temperature=0.0)
    with pytest.raises(ValueError, match="does not know"):
        UniGRPO(
            _tiny_text(output_words=[*world_words(), "grass"]),
            _tiny_flow(),
            warm_start=None,
            text_warm_start=None,
        )
    with pytest.raises(ValueError, match="train_tied_groups"):
        _module(train_tied_groups=False)
    with pytest.raises(ValueError, match="UniGRPO draws one window"):
        _module(sde_window_size=2, sde_window_per_group=True)


def test_same_latent_gives_each_group_one_initial_noise():
    from unirl_lightning.data.datamodule import PromptBatch

    module, data = _module(same_latent=True), _data()
    data.setup()
    specs = [s for s in data.val_specs[:2] for _ in range(3)]
    x0 = module.make_rollouts(
        PromptBatch(specs=specs, group_ids=torch.tensor([5, 5, 5, 8, 8, 8]))
    ).rollout.latents[:, 0]
    assert torch.equal(x0[0], x0[2]) and torch.equal(x0[3], x0[5]) and not torch.equal(x0[0], x0[3])


def test_print_config_parses(capsys):
    from unirl_lightning.cli import cli_main

    with pytest.raises(SystemExit) as exit_info:
        cli_main(["fit", "--config", str(CONFIGS / "unigrpo.yaml"), "--print_config"])
    assert exit_info.value.code in (0, None)
    import yaml

    cfg = yaml.safe_load(capsys.readouterr().out)
    assert cfg["model"]["class_path"] == "unirl_lightning.modules.UniGRPO"
    assert "cfg_scale" not in cfg["model"]["init_args"]  # no CFG in UniGRPO
    cli = cli_main(
        [
            "--config",
            str(CONFIGS / "unigrpo.yaml"),
            "--model.init_args.warm_start",
            "null",
            "--model.init_args.text_warm_start",
            "null",
        ],
        run=False,
    )
    assert isinstance(cli.model, UniGRPO) and isinstance(cli.datamodule, ReasoningDataModule)
    cli = cli_main(
        ["--config", str(CONFIGS / "unigrpo.yaml"), "--config", str(CONFIGS / "unigrpo_awm.yaml"),
         "--model.init_args.warm_start", "null", "--model.init_args.text_warm_start", "null"],
        run=False,
    )
    hp = cli.model.hparams
    assert hp.image_objective == "awm" and cli.model._awm_range == (1, 9) and hp.text_lr == 3e-4


def test_samples_with_bad_rewards_add_nothing_to_either_policys_gradient():
    """NaN / inf rewards on two rows: both policies' gradients (surrogates, velocity MSE, text KL) equal
    those of the same rollouts with the two rows removed; the step goes on and counts them."""
    good = [0, 2, 3, 5]
    runs, logged = {}, {}
    for removed in (False, True):
        module = _module(rewards=[PoisonedLatentMean(poison=not removed)], micro_batch_size=8, beta=0.5,
                         beta_text=0.5)
        torch.manual_seed(3)
        with torch.no_grad():  # references apart from the policies: the penalties have gradients at once
            for p in [*module.reference.parameters(), *module.text_reference.parameters()]:
                p.add_(0.05 * torch.randn_like(p))
        if removed:
            step = module.training_step

            def without_bad_rows(batch, batch_idx, step=step):
                specs, ids = [batch.specs[i] for i in good], batch.group_ids[good]
                return step(PromptBatch(specs, ids, batch.rollout.select(good)), batch_idx)

            module.training_step = without_bad_rows
        text_param = module.text_policy.blocks[0].qkv.weight
        grads = {
            "flow": capture_backward_grads(module, module.policy.transformer.proj_out.weight),
            "text": capture_backward_grads(module, text_param),
        }
        record = _Record()
        torch.manual_seed(5)
        _trainer(1, [record]).fit(module, datamodule=_data(P=2, G=3))
        runs[removed], logged[removed] = grads, record.rows[0]
    for name in ("flow", "text"):
        assert len(runs[False][name]) == len(runs[True][name]) == 3  # text, then 2 image steps
        total = torch.stack(runs[False][name]).sum(0)
        assert total.abs().sum() > 0
        torch.testing.assert_close(total, torch.stack(runs[True][name]).sum(0), rtol=1e-4, atol=1e-9)
    assert logged[False]["train/bad_rewards"] == 2.0 and logged[False]["train/skipped_steps"] == 0.0
    assert logged[False]["reward/total"] == pytest.approx(logged[True]["reward/total"])


def test_a_batch_with_every_reward_nan_trains_neither_policy_and_the_run_goes_on():
    module = _module(rewards=[PoisonedLatentMean(everywhere=True)])
    before = _snapshot(module)
    record = _Record()
    with pytest.warns(UserWarning, match="every sample: the step trains nothing"):
        _trainer(2, [record]).fit(module, datamodule=_data())
    assert module.global_step == 2 and not _changed(before, module)
    assert [r["train/empty_batches"] for r in record.rows] == [1.0, 2.0]
    assert [r["train/bad_rewards"] for r in record.rows] == [6.0, 6.0] and module.bad_rewards == 12


def test_a_text_warm_start_of_another_architecture_fails_naming_folder_and_fields(tmp_path):
    TinyTextPolicy(TinyTextConfig(d_model=16, n_layers=1, n_heads=2)).save_pretrained(tmp_path / "text")
    module = _module(text_warm_start=str(tmp_path / "text"))
    expected = (
        "model.text_warm_start: .* holds another architecture than this run's TinyTextPolicy: "
        r"fields that differ: d_model \(folder: 16, this run: 32\)"
    )
    with pytest.raises(ValueError, match=expected):
        module.setup("fit")


# ---- image_objective="awm" ----------------------------------------------------------------------
def test_awm_image_loss_is_awms_sample_loss_plus_velocity_mse_over_live_pairs():
    """UniGRPO's AWM image loss on a rollout equals the formula: re-noise each final latent at
    `awm_timesteps` stratified grid times (same RNG), AWM's per-pair loss (`AdvantageWeightedMatching
    .sample_loss`, no EMA) + beta x velocity MSE to the reference, summed over live rows' pairs / all
    pairs; a dead row adds nothing."""
    from unirl_lightning.modules.awm import AdvantageWeightedMatching
    from unirl_lightning.modules.forward_rl import timestep_indices
    from unirl_lightning.objectives import noised, velocity_mse

    module = _module(image_objective="awm", num_steps=5, awm_timesteps=2, awm_adv_clip=2.0, beta=0.3)
    assert module._awm_range == (1, 5)  # [1, T - T // 10)
    awm = AdvantageWeightedMatching(_tiny_flow(), warm_start=None, num_steps=5, ema_beta=0.0,
                                    adv_clip=2.0, power=0.25, timesteps_per_sample=2)
    with torch.no_grad():  # a reference that differs from the policy: the penalty is not zero
        for p in module.reference.parameters():
            p.add_(0.05 * torch.randn_like(p))
    prompts = ["a photo of a red square", "a photo of two circles", "a photo of a blue cross"]
    rollout = module.policy.sample(prompts, num_steps=5, noise_level=0.7,
                                   generator=torch.Generator().manual_seed(0))
    adv = torch.tensor([1.5, -3.0, 0.4])
    live = torch.tensor([True, False, True])
    torch.manual_seed(7)
    loss, stats = module._awm_image_loss(rollout, adv, live)

    torch.manual_seed(7)
    index = timestep_indices(3, 2, 1, 5, "stratified")
    pairs = torch.arange(3).repeat_interleave(2)
    x0 = rollout.latents[:, -1][pairs]
    t = rollout.sigmas[index.flatten()]
    x_t, target = noised(x0, torch.randn_like(x0), t)
    cond = module.policy.encode_text([prompts[r] for r in pairs.tolist()])
    v = module.policy.velocity(x_t, t, cond)
    per_pair, _ = awm.sample_loss(v, x_t, target, t, adv[pairs], cond)
    with torch.no_grad():
        per_pair = per_pair + 0.3 * velocity_mse(v, module.reference.velocity(x_t, t, cond))
    expected = torch.where(live[pairs], per_pair, 0.0).sum() / 6
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-7)
    assert stats["velocity_mse"] > 0 and 0 < stats["weight_abs"] <= 1


def test_awm_image_objective_trains_both_policies_with_one_advantage():
    module = _module(image_objective="awm", noise_level=0.0, num_steps=4, awm_timesteps=2)
    text_before, flow_before = _snapshot(module.text_policy), _snapshot(module.policy)
    record = _Record()
    _trainer(1, [record]).fit(module, datamodule=_data(P=2, G=3))
    assert _changed(text_before, module.text_policy) and _changed(flow_before, module.policy)
    row = record.rows[-1]
    assert "image/awm_loss" in row and "image/ratio_mean" not in row and "text/ratio_mean" in row


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(image_objective="nft"), "image_objective"),
        (dict(image_objective="awm", awm_timesteps=9), "awm_timesteps"),
        (dict(image_objective="awm", awm_timestep_range=[2, 9]), "awm_timestep_range"),
        (dict(image_objective="awm", awm_timesteps=1, regularizer="latent_kl"), "velocity_mse or none"),
        (dict(image_objective="awm", awm_timesteps=1, awm_adv_clip=0.0), "awm_adv_clip"),
    ],
)
def test_awm_image_objective_settings_are_checked(kwargs, match):
    with pytest.raises(ValueError, match=match):
        _module(**kwargs)
