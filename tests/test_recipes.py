"""The recipes end to end on tiny models: they run under a real Trainer, and their updates move the
policy the way their objectives say."""

import warnings

import lightning as L
import pytest
import torch

from unirl_lightning.data import OnPolicyDataModule
from unirl_lightning.models.tiny import TinyConfig, TinyUnifiedModel
from unirl_lightning.modules import DiscreteGRPO, UniRLSFT
from grad_capture import assert_follows_advantages, record_rollouts
from unirl_lightning.rewards import RewardFunction


def _tiny(order="autoregressive"):
    torch.manual_seed(0)
    return TinyUnifiedModel(TinyConfig(d_model=32, n_layers=2, n_heads=2, image_order=order, mask_steps=4))


def _fit(module, tmp_path, steps=2, P=2, G=3):
    data = OnPolicyDataModule(num_train=60, num_val=12, prompts_per_step=P, group_size=G, val_batch_size=6)
    trainer = L.Trainer(
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
    )
    trainer.fit(module, datamodule=data)
    return trainer


def _snapshot(policy):
    return {k: v.detach().clone() for k, v in policy.state_dict().items()}


def _changed(before, policy):
    return [k for k, v in policy.state_dict().items() if not torch.equal(before[k], v)]


def _initial(state: dict) -> TinyUnifiedModel:
    """The tiny policy with the weights of a snapshot."""
    policy = _tiny()
    policy.load_state_dict(state)
    return policy


@torch.no_grad()
def _answer_nll(policy: TinyUnifiedModel, module, seen: list) -> float:
    """Mean NLL per answer token of the ground-truth answers about each recorded rollout's images."""
    losses = []
    for recorded in seen:
        questions, answers = module.qa(recorded.specs)
        logp, mask = policy.eval().answer_logprobs(recorded.rollout.tokens, questions, answers)
        losses.append(-(logp.sum() / mask.sum()))
    return float(torch.stack(losses).mean())


@pytest.mark.parametrize("end_to_end", [True, False])
def test_sft_trains_understanding_and_end_to_end_generation(tmp_path, monkeypatch, end_to_end):
    policy = _tiny()
    before = _snapshot(policy)
    module = UniRLSFT(policy, warm_start=None, end_to_end=end_to_end, lr=1e-3, score_every_n_steps=1)
    seen = record_rollouts(module, monkeypatch)
    trainer = _fit(module, tmp_path)
    changed = _changed(before, policy)
    assert "head.weight" in changed
    # the image-code rows of the head are read only by generation: they move only end to end
    rows = slice(policy.image_offset, policy.vocab_size)
    moved = not torch.equal(before["head.weight"][rows], policy.head.weight[rows])
    assert moved == end_to_end
    # the answers' NLL about the images it trained on fell
    assert len(seen) == 2
    assert _answer_nll(policy, module, seen) < _answer_nll(_initial(before), module, seen)
    metrics = trainer.logged_metrics
    assert "train/loss" in metrics and "val/geneval/overall" in metrics and "val/imbalance/overall" in metrics


def test_sft_on_correct_trains_only_the_judged_correct_own_images(tmp_path, monkeypatch):
    """`sft_on: correct`: the step's loss is the answer NLL over the images the judge passes (rows 0
    and 3 of 6 here), with the prompt's answer as label; the others add nothing."""
    from unirl_lightning.evaluation.geneval import GenEvalResult
    from unirl_lightning.evaluation.judge import GenEvalJudge

    class EveryThird(GenEvalJudge):
        def __call__(self, images, specs):
            return [GenEvalResult(i % 3 == 0, "", False, 0.0) for i in range(len(specs))]

    policy = _tiny()
    before = _snapshot(policy)
    module = UniRLSFT(policy, warm_start=None, sft_on="correct", lr=1e-3, score_every_n_steps=0)
    module.judge = EveryThird(detector=None)
    seen = record_rollouts(module, monkeypatch)
    trainer = _fit(module, tmp_path, steps=1, P=2, G=3)
    (recorded,) = seen
    questions, answers = module.qa(recorded.specs)
    with torch.no_grad():
        logp, mask = _initial(before).answer_logprobs(recorded.rollout.tokens, questions, answers)
    rows = torch.tensor([0, 3])
    expected = -(logp[rows].sum() / mask[rows].sum())
    assert float(trainer.logged_metrics["train/loss"]) == pytest.approx(float(expected), rel=1e-5)
    assert float(trainer.logged_metrics["train/sft_rows_frac"]) == pytest.approx(2 / 6)
    with pytest.raises(ValueError, match="sft_on"):
        UniRLSFT(_tiny(), warm_start=None, sft_on="right")


@pytest.mark.parametrize("order, reveal_steps", [("autoregressive", None), ("masked", None), ("masked", 2)])
def test_grpo_update_follows_the_advantages(tmp_path, monkeypatch, order, reveal_steps):
    """Two passes over one rollout (mu = 2, KL to the reference): re-scored after the update, every
    positive-advantage image and answer is likelier and every negative one less likely (masked
    order with `reveal_steps`: over the reveal steps it trained)."""
    from unirl_lightning.modules import grpo
    from unirl_lightning.rewards import GenEvalReward, RewardFunction, SelfUnderstandingReward

    class NoiseReward(RewardFunction):
        """Seeded noise: nonzero advantages whatever an untrained model draws (its real rewards tie)."""

        def __call__(self, ctx):
            return torch.rand(len(ctx.specs), generator=torch.Generator().manual_seed(len(ctx.specs)))

    policy = _tiny(order)
    before = _snapshot(policy)
    rewards = [GenEvalReward("partial"), SelfUnderstandingReward(0.8), NoiseReward(0.1)]
    module = DiscreteGRPO(
        policy,
        warm_start=None,
        rewards=rewards,
        answer_weight=0.5,
        beta=0.04,
        num_iterations=2,
        micro_batch_size=4,
        lr=1e-3,
        reveal_steps_per_update=reveal_steps,
    )
    seen = record_rollouts(module, monkeypatch, grpo)
    trainer = _fit(module, tmp_path, steps=2)  # mu = 2 optimiser steps on one rollout
    assert _changed(before, policy)
    for key in ("reward/total", "image/ratio_mean", "answer/kl", "train/zero_std_frac"):
        assert key in trainer.logged_metrics
    (recorded,) = seen
    rollout, answers, adv = recorded.rollout, recorded.made.answers, recorded.advantages
    policy.eval()
    with torch.no_grad():
        image_logp = policy.image_logprobs(rollout)
        answer_logp, mask = policy.answer_logprobs(rollout.tokens, module.qa(recorded.specs)[0], answers)
    assert torch.equal(mask, answers.mask)
    if reveal_steps:
        assert rollout.action_mask.sum(1).tolist() == [reveal_steps] * len(rollout)
    assert_follows_advantages(((image_logp - rollout.logprobs) * rollout.action_mask).sum(1), adv)
    assert_follows_advantages(((answer_logp - answers.logprobs) * mask).sum(1), adv)


def test_grpo_answer_sft_trains_understanding_only(tmp_path, monkeypatch):
    """answer_sft_weight alone: UniRL's answer NLL on the step's own images moves understanding,
    never the generation-only weights (image-code rows of the head, the code-scoring MLP), and
    lowers that NLL on the images it trained on."""
    from unirl_lightning.modules import grpo

    policy = _tiny()
    before = _snapshot(policy)
    module = DiscreteGRPO(
        policy, warm_start=None, image_weight=0.0, answer_weight=0.0, answer_sft_weight=1.0, lr=1e-3
    )
    seen = record_rollouts(module, monkeypatch, grpo)
    trainer = _fit(module, tmp_path, steps=2)
    changed = _changed(before, policy)
    rows = slice(policy.image_offset, policy.vocab_size)
    assert torch.equal(before["head.weight"][rows], policy.head.weight[rows])
    assert not any(k.startswith("code_out") for k in changed) and "tok_emb.weight" in changed
    assert float(trainer.logged_metrics["answer_sft/loss"]) > 0
    assert len(seen) == 2
    assert _answer_nll(policy, module, seen) < _answer_nll(_initial(before), module, seen)
    with pytest.raises(ValueError, match="nothing would train"):
        DiscreteGRPO(_tiny(), warm_start=None, image_weight=0.0, answer_weight=0.0)


def test_grpo_on_policy_ratio_is_one_and_kl_zero(tmp_path):
    policy = _tiny()
    module = DiscreteGRPO(policy, warm_start=None, beta=0.1, num_iterations=1, lr=0.0)
    trainer = _fit(module, tmp_path, steps=1, P=2, G=4)
    m = trainer.logged_metrics
    assert float(m["image/ratio_mean"]) == 1.0
    assert abs(float(m["image/kl"])) < 1e-6


def test_policy_geneval_callback_logs_scalars_and_grid(tmp_path):
    from unirl_lightning.callbacks import PolicyGenEvalCallback
    from benchmarks.tb_scalars import read_scalars

    policy = _tiny()
    module = UniRLSFT(policy, warm_start=None, lr=1e-3, score_every_n_steps=0)
    data = OnPolicyDataModule(num_train=60, num_val=12, prompts_per_step=2, group_size=1, val_batch_size=6)
    cb = PolicyGenEvalCallback(every_n_steps=1, samples_per_prompt=2)
    trainer = L.Trainer(
        max_steps=2,
        accelerator="cpu",
        devices=1,
        logger=L.pytorch.loggers.TensorBoardLogger(tmp_path),
        callbacks=[cb],
        enable_checkpointing=False,
        limit_val_batches=0,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(module, datamodule=data)
    trainer.logger.experiment.flush()
    scalars = read_scalars(tmp_path)
    assert "geneval/overall" in scalars and "imbalance/overall" in scalars
    assert len(cb.last_results) == 24  # 12 prompts x 2 samples


def test_grpo_answer_stream_credited_by_its_own_reward_terms(tmp_path, monkeypatch):
    """answer_reward_terms: the answer stream's advantages are the group-relative advantages of the
    named terms alone; the image stream keeps the total reward's."""
    import unirl_lightning.modules.grpo as grpo
    from unirl_lightning.objectives import group_advantages
    from unirl_lightning.rewards import RewardFunction, SelfUnderstandingReward

    class Noise(RewardFunction):
        def __call__(self, ctx):
            return torch.rand(len(ctx.specs), generator=torch.Generator().manual_seed(7))

    seen, real_loss = [], grpo.policy_loss
    monkeypatch.setattr(
        grpo,
        "policy_loss",
        lambda logp, old, adv, mask, **kw: (seen.append(adv.clone()), real_loss(logp, old, adv, mask, **kw))[
            1
        ],
    )
    captured = {}
    real_combine = grpo.combine_rewards

    def combine(rewards, ctx):
        total, logs = real_combine(rewards, ctx)
        captured.update(total=total, und=ctx.cache["reward_terms"]["self_understanding"])
        return total, logs

    monkeypatch.setattr(grpo, "combine_rewards", combine)
    module = DiscreteGRPO(
        _tiny(),
        warm_start=None,
        rewards=[Noise(name="noise"), SelfUnderstandingReward(0.8)],
        answer_weight=1.0,
        answer_reward_terms=["self_understanding"],
        micro_batch_size=64,
        lr=1e-3,
    )
    _fit(module, tmp_path, steps=1, P=2, G=4)
    ids = torch.arange(2).repeat_interleave(4)
    image_adv, answer_adv = seen[0], seen[1]
    torch.testing.assert_close(image_adv, group_advantages(captured["total"], ids))
    torch.testing.assert_close(answer_adv, group_advantages(captured["und"], ids))
    with pytest.raises(ValueError, match="answer_reward_terms.*'geneval'"):
        DiscreteGRPO(_tiny(), warm_start=None, answer_weight=1.0, answer_reward_terms=["geneval"])


def test_grpo_answer_sft_on_correct_uses_only_judged_correct_images(tmp_path):
    from unirl_lightning.evaluation.geneval import GenEvalResult
    from unirl_lightning.evaluation.judge import GenEvalJudge
    from unirl_lightning.rewards import RewardFunction

    class Noise(RewardFunction):
        def __call__(self, ctx):
            return torch.rand(len(ctx.specs))

    policy = _tiny()
    module = DiscreteGRPO(
        policy, warm_start=None, rewards=[Noise()], answer_sft_weight=1.0, answer_sft_on="correct", lr=1e-3
    )

    class EveryThird(GenEvalJudge):
        def __call__(self, images, specs):
            return [GenEvalResult(i % 3 == 0, "", False, 0.0) for i in range(len(specs))]

    module.judge = EveryThird(detector=None)  # its verdicts are fixed: no detector runs
    sizes, real = [], policy.answer_logprobs
    policy.answer_logprobs = lambda tokens, questions, answers: (
        sizes.append(len(questions)),
        real(tokens, questions, answers),
    )[1]
    trainer = _fit(module, tmp_path, steps=1, P=2, G=3)
    assert sizes[0] == 2  # rows 0 and 3 of 6 (validation's answers come after)
    assert float(trainer.logged_metrics["answer_sft/loss"]) > 0


def test_grpo_filter_zero_std_with_every_group_tied_trains_nothing_and_goes_on(tmp_path):
    """`filter_zero_std` with every group tied (a constant reward): no backward, counted, the run goes on."""
    class ConstantReward(RewardFunction):
        def __call__(self, ctx):
            return torch.ones(len(ctx.specs))

    policy = _tiny()
    before = _snapshot(policy)
    module = DiscreteGRPO(
        policy, warm_start=None, rewards=[ConstantReward()], filter_zero_std=True, beta=0.04, lr=1e-2
    )
    calls = []
    backward = module.manual_backward
    module.manual_backward = lambda loss, *a, **k: (calls.append(1), backward(loss, *a, **k))
    trainer = _fit(module, tmp_path, steps=2)
    assert calls == [] and trainer.global_step == 2 and not _changed(before, policy)
    m = trainer.logged_metrics
    assert float(m["train/empty_batches"]) == 2.0 and float(m["train/trained_rows_frac"]) == 0.0
    assert float(m["train/zero_std_frac"]) == 1.0


_REWARDS = torch.tensor([0.1, 0.7, 0.4, 0.9, 0.2, 0.5])  # differ inside each group of three


class _Poisoned(RewardFunction):
    """`_REWARDS`, with NaN on row 1 and inf on row 4 of each batch (or NaN everywhere)."""

    def __init__(self, everywhere: bool = False):
        super().__init__(name="poisoned")
        self.everywhere = everywhere

    def __call__(self, ctx):
        reward = _REWARDS[: len(ctx.specs)].clone()
        if self.everywhere:
            return torch.full_like(reward, float("nan"))
        reward[1], reward[4] = float("nan"), float("inf")
        return reward


def test_grpo_leaves_samples_with_nan_or_inf_rewards_out_and_goes_on(tmp_path, monkeypatch):
    """NaN / inf rewards: those samples get advantage 0 and are left out of every loss (the others'
    advantages are their groups' without them); counted in `train/bad_rewards`, with a warning."""
    from unirl_lightning.modules import grpo
    from unirl_lightning.objectives import group_advantages

    policy = _tiny()
    before = _snapshot(policy)
    module = DiscreteGRPO(
        policy, warm_start=None, rewards=[_Poisoned()], beta=0.04, answer_sft_weight=0.5, lr=1e-2
    )
    seen = record_rollouts(module, monkeypatch, grpo)
    kept, streams = [], module._streams
    monkeypatch.setattr(module, "_streams", lambda ctx, keep, *rest: (kept.append(keep.tolist()),
                                                                       streams(ctx, keep, *rest))[1])
    with pytest.warns(UserWarning, match=r"2 of 6 rewards at step 0 are NaN or inf from reward 'poisoned'"):
        trainer = _fit(module, tmp_path, steps=2)
    assert kept == [[0, 2, 3, 5]] * 2
    good = torch.tensor([0, 2, 3, 5])
    expected = group_advantages(_REWARDS[good], torch.tensor([0, 0, 1, 1]))
    for recorded in seen:
        assert torch.equal(recorded.advantages[[1, 4]], torch.zeros(2))
        torch.testing.assert_close(recorded.advantages[good], expected)
    m = trainer.logged_metrics
    assert float(m["train/bad_rewards"]) == 2.0 and float(m["train/bad_rewards_total"]) == 4.0
    assert module.bad_rewards == 4 and float(m["train/skipped_steps"]) == 0.0
    assert float(m["reward/total"]) == pytest.approx(_REWARDS[good].mean().item())
    assert _changed(before, policy) and all(torch.isfinite(v).all() for v in policy.state_dict().values())


def test_grpo_with_every_reward_nan_skips_the_step_and_goes_on(tmp_path):
    """Every sample's reward NaN: no backward (not even the answer SFT), counted, global_step advances."""
    policy = _tiny()
    before = _snapshot(policy)
    module = DiscreteGRPO(
        policy, warm_start=None, rewards=[_Poisoned(everywhere=True)], answer_sft_weight=0.5, lr=1e-2
    )
    calls = []
    backward = module.manual_backward
    module.manual_backward = lambda loss, *a, **k: (calls.append(1), backward(loss, *a, **k))
    with pytest.warns(UserWarning, match="every sample: the step trains nothing"):
        trainer = _fit(module, tmp_path, steps=2)
    assert calls == [] and trainer.global_step == 2 and not _changed(before, policy)
    m = trainer.logged_metrics
    assert float(m["train/empty_batches"]) == 2.0 and module.bad_rewards == 12
    assert float(m["train/bad_rewards"]) == 6.0 and float(m["train/trained_rows_frac"]) == 0.0


def test_a_reward_that_raises_in_training_names_the_reward_and_the_prompt(tmp_path):
    class Boom(RewardFunction):
        """Fails on every sample of the prompt that ends the first batch."""

        target = None

        def __call__(self, ctx):
            Boom.target = Boom.target or ctx.specs[-1]["prompt"]
            if any(s["prompt"] == Boom.target for s in ctx.specs):
                raise ZeroDivisionError("division by zero")
            return torch.zeros(len(ctx.specs))

    module = DiscreteGRPO(_tiny(), warm_start=None, rewards=[Boom(name="boom")], lr=1e-2)
    with pytest.raises(RuntimeError, match=r"reward 'boom' \(Boom\) raised ZeroDivisionError") as info:
        _fit(module, tmp_path, steps=1)
    assert f"prompt {Boom.target!r}" in str(info.value) and "fails on sample" in str(info.value)


def _error_before_training(module, tmp_path) -> str:
    """Fit `module`; returns the message of the ValueError it raised before any rollout."""
    module.make_rollouts = lambda batch: pytest.fail("a rollout ran before the warm start was checked")
    with pytest.raises(ValueError) as info:
        _fit(module, tmp_path, steps=1)
    return str(info.value)


def test_a_warm_start_of_another_size_fails_before_training_naming_folder_fields_and_fix(tmp_path):
    folder = tmp_path / "small"
    TinyUnifiedModel(TinyConfig(d_model=16, n_layers=2, n_heads=2)).save_pretrained(folder)
    message = _error_before_training(DiscreteGRPO(_tiny(), warm_start=str(folder)), tmp_path)
    assert f"model.warm_start: {folder} holds another architecture than this run's TinyUnifiedModel" in (
        message
    )
    assert "d_model (folder: 16, this run: 32)" in message and "n_layers" not in message
    assert "point model.warm_start at a folder saved from a TinyUnifiedModel" in message
    assert "set model.warm_start: null" in message


def test_a_warm_start_of_another_model_class_fails_before_training(tmp_path):
    from unirl_lightning.models.flow import TinyFlowConfig, TinyFlowModel

    folder = tmp_path / "flow"
    TinyFlowModel(TinyFlowConfig(num_layers=1, num_heads=2, head_dim=8, text_dim=16)).save_pretrained(folder)
    message = _error_before_training(DiscreteGRPO(_tiny(), warm_start=str(folder)), tmp_path)
    assert f"model.warm_start: {folder} cannot be loaded as a TinyUnifiedModel (TypeError:" in message
    assert "fields only the folder's config has: cell, head_dim, image_position_learned" in message
    assert "fields only this run's config has: d_model, dropout" in message


def test_a_warm_start_whose_weights_fit_loads_and_warns_about_differing_fields(tmp_path):
    from unirl_lightning.modules.base import load_warm_start

    source = TinyUnifiedModel(TinyConfig(d_model=32, n_layers=2, n_heads=2, mask_steps=8))
    source.save_pretrained(tmp_path / "ar")
    policy = _tiny()  # mask_steps 4
    with pytest.warns(UserWarning, match=r"\(fields that differ: mask_steps \(folder: 8, this run: 4\)\)"):
        load_warm_start(policy, tmp_path / "ar", "model.warm_start")
    assert not _changed(_snapshot(source), policy) and policy.config.mask_steps == 4
    _tiny().save_pretrained(tmp_path / "same")
    with warnings.catch_warnings():  # the same config: loads without a word
        warnings.simplefilter("error")
        load_warm_start(policy, tmp_path / "same", "model.warm_start")
    with pytest.raises(FileNotFoundError, match="model.warm_start: .* is not a folder"):
        load_warm_start(policy, tmp_path / "missing", "model.warm_start")


def test_unified_warm_start_trains_its_curriculum_phases_first(tmp_path, monkeypatch):
    """A recipe's `phases` reach the scene stream: the first steps draw position scenes alone."""
    from unirl_lightning.modules import warm_start

    monkeypatch.setenv("UNIRL_CACHE", str(tmp_path / "cache"))
    seen: list[list[str]] = []

    class Recording(warm_start.WarmStartPretrain):
        def training_step(self, batch, batch_idx):
            seen.append([s["tag"] for s in batch["specs"]])
            return super().training_step(batch, batch_idx)

    monkeypatch.setattr(warm_start, "WarmStartPretrain", Recording)
    recipe = {"max_steps": 4, "batch_size": 8, "num_train": 120, "warmup_steps": 1, "val_every": 4,
              "phases": [{"steps": 2, "task_weights": {"position": 1.0}}]}
    folder = warm_start.ensure_warm_start(_tiny(), recipe)
    assert (folder / "model.safetensors").is_file()
    assert [set(tags) for tags in seen[:2]] == [{"position"}, {"position"}]
    assert set(tag for tags in seen[2:] for tag in tags) != {"position"}
