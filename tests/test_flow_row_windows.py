"""Per-row SDE windows: `FlowPolicy.sample(sde_windows=)` and FlowGRPO's per-group / per-task windows."""

import copy

import lightning as L
import pytest
import torch

from unirl_lightning.data import OnPolicyDataModule
from unirl_lightning.data.datamodule import PromptBatch
from unirl_lightning.models.flow import TinyFlowConfig, TinyFlowModel
from unirl_lightning.modules import flow_grpo as flow_grpo_module
from unirl_lightning.modules.flow_grpo import FlowGRPO
from unirl_lightning.objectives import noise_aware_step_weights
from grad_capture import LatentMeanReward, capture_backward_grads

PROMPTS = ["a photo of a red circle", "a photo of two squares", "a photo of a blue triangle"]


def _tiny() -> TinyFlowModel:
    torch.manual_seed(0)
    return TinyFlowModel(TinyFlowConfig(num_layers=1, num_heads=2, head_dim=8, text_dim=16))


def _grouped(policy, windows_per_group):
    prompts = [p for p in PROMPTS for _ in range(3)]
    groups = torch.tensor([4, 4, 4, 0, 0, 0, 2, 2, 2])
    x0 = torch.randn(3, *policy.latent_shape, generator=torch.Generator().manual_seed(0)).repeat_interleave(
        3, 0
    )
    windows = torch.tensor(windows_per_group).repeat_interleave(3, 0)
    return prompts, groups, x0, windows


def test_one_window_per_row_equals_the_batch_window_bit_for_bit():
    """Rows that all carry the same window take the batch-window path: the same random stream."""
    policy = _tiny()
    prompts, groups, x0, _ = _grouped(policy, [[3, 5]] * 3)
    same = torch.tensor([[3, 5]] * 9)
    for g in (None, groups):
        batch = policy.sample(
            prompts,
            num_steps=8,
            noise_level=0.9,
            sde_window=(3, 5),
            latents=x0,
            groups=g,
            generator=torch.Generator().manual_seed(1),
        )
        rows = policy.sample(
            prompts,
            num_steps=8,
            noise_level=0.9,
            sde_windows=same,
            latents=x0,
            groups=g,
            generator=torch.Generator().manual_seed(1),
        )
        assert torch.equal(batch.latents, rows.latents) and torch.equal(batch.log_probs, rows.log_probs)
        assert batch.row_mask is None and rows.row_mask[:, 3:5].all() and rows.row_mask.sum() == 18
        assert rows.trained_steps == [3, 4] and rows.steps_per_row == 2


def test_rows_take_sde_steps_only_inside_their_own_window_and_rescore_there():
    policy = _tiny()
    prompts, groups, x0, windows = _grouped(policy, [[1, 3], [3, 5], [5, 8]])  # [5, 8): 7 is the last, ODE
    batches = []
    policy.transformer.register_forward_pre_hook(
        lambda m, args, kwargs: batches.append(kwargs["hidden_states"].shape[0]), with_kwargs=True
    )
    grouped = policy.sample(
        prompts,
        num_steps=8,
        noise_level=0.9,
        sde_windows=windows,
        latents=x0,
        groups=groups,
        generator=torch.Generator().manual_seed(1),
    )
    # one row per group until its window opens; group A opens at 1, B at 3, C at 5
    assert batches == [3, 5, 5, 7, 7, 9, 9, 9]
    expected = torch.zeros(9, 8, dtype=torch.bool)
    expected[0:3, 1:3] = expected[3:6, 3:5] = expected[6:9, 5:7] = True
    assert torch.equal(grouped.row_mask, expected)
    assert grouped.trained_steps == [1, 2, 3, 4, 5, 6] and grouped.steps_per_row == 2
    assert (grouped.log_probs[~expected] == 0).all() and (grouped.log_probs[expected] != 0).all()
    for j in range(8):
        at = grouped.rows_at(j)
        assert torch.equal(at, expected[:, j].nonzero().flatten())
        if len(at):
            part = grouped.select(at)
            torch.testing.assert_close(
                policy.step_log_prob(part, j).log_prob, part.log_probs[:, j], rtol=0, atol=1e-5
            )
    # each group's rows agree up to its window and split inside it; the ODE prefix matches the full batch's
    full = policy.sample(
        prompts,
        num_steps=8,
        noise_level=0.9,
        sde_windows=windows,
        latents=x0,
        generator=torch.Generator().manual_seed(1),
    )
    for first, start in ((0, 1), (3, 3), (6, 5)):
        rows = slice(first, first + 3)
        assert (grouped.latents[rows, : start + 1] == grouped.latents[first, : start + 1]).all()
        assert not torch.equal(grouped.latents[first, start + 1], grouped.latents[first + 1, start + 1])
        torch.testing.assert_close(
            grouped.latents[rows, : start + 1], full.latents[rows, : start + 1], rtol=0, atol=1e-6
        )
    sub = grouped.select([4, 0])
    assert torch.equal(sub.row_mask, expected[[4, 0]])


@pytest.mark.parametrize("regularizer", ["velocity_mse", "latent_kl", "exact_kl"])
def test_packed_row_step_pairs_rescore_and_penalise_as_each_step_does(regularizer):
    """`pairs_log_prob` over (row, own step) pairs, in one batch, equals `step_log_prob` step by step:
    the rollout's own log-probs (ratio 1), the velocities, and each regulariser's per-row penalty."""
    policy = _tiny()
    prompts, groups, x0, windows = _grouped(policy, [[1, 3], [3, 5], [0, 2]])
    rollout = policy.sample(
        prompts,
        num_steps=8,
        noise_level=0.9,
        sde_windows=windows,
        latents=x0,
        groups=groups,
        generator=torch.Generator().manual_seed(1),
    )
    rows, steps = rollout.row_mask.nonzero(as_tuple=True)
    reference = copy.deepcopy(policy)
    with torch.no_grad():
        for param in reference.parameters():
            param.add_(0.05 * torch.randn_like(param))
    module = FlowGRPO(
        policy, rewards=[LatentMeanReward()], warm_start=None, num_steps=8, regularizer=regularizer
    )
    packed = policy.pairs_log_prob(rollout, rows, steps)
    packed_ref = reference.pairs_log_prob(rollout, rows, steps)
    penalty = module._penalty(packed, packed_ref, rollout, steps)
    assert penalty.shape == (len(rows),) and bool((penalty > 0).all())
    for j in rollout.trained_steps:
        at = rollout.rows_at(j)
        part, here = rollout.select(at), steps == j
        one, one_ref = policy.step_log_prob(part, j), reference.step_log_prob(part, j)
        torch.testing.assert_close(packed.log_prob[here], part.log_probs[:, j], rtol=0, atol=1e-5)
        torch.testing.assert_close(packed.velocity[here], one.velocity, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(
            penalty[here], module._penalty(one, one_ref, part, j), rtol=1e-5, atol=1e-8
        )
    with pytest.raises(ValueError, match="different noise levels"):
        policy.pairs_log_prob(rollout, torch.tensor([0, 0]), torch.tensor([1, 7]))  # 7 is the last, ODE step


def test_per_row_window_errors_name_the_row_and_the_fix():
    policy = _tiny()
    prompts, groups, x0, windows = _grouped(policy, [[1, 3], [3, 5], [5, 7]])
    mixed = windows.clone()
    mixed[1] = torch.tensor([2, 4])
    with pytest.raises(ValueError, match="share their SDE window"):
        policy.sample(prompts, num_steps=8, sde_windows=mixed, latents=x0, groups=groups)
    with pytest.raises(ValueError, match=r"sde_windows row 2: \[5, 9\]"):
        policy.sample(prompts, num_steps=8, sde_windows=torch.tensor([[1, 3]] * 2 + [[5, 9]] + [[1, 3]] * 6))
    with pytest.raises(ValueError, match="one window per row"):
        policy.sample(prompts, num_steps=8, sde_windows=windows[:4])
    with pytest.raises(ValueError, match="not both"):
        policy.sample(prompts, num_steps=8, sde_window=(1, 3), sde_windows=windows)


def _batch(tags: list[str], group_size: int = 2) -> PromptBatch:
    specs = [{"prompt": f"a photo of a {t}", "tag": t} for t in tags for _ in range(group_size)]
    return PromptBatch(specs=specs, group_ids=torch.arange(len(tags)).repeat_interleave(group_size) * 3 + 1)


def test_group_windows_are_drawn_per_group_inside_each_tasks_range():
    module = FlowGRPO(
        _tiny(),
        warm_start=None,
        num_steps=10,
        sde_window_size=2,
        sde_window_by_task={"counting": [0, 4], "colors": [6, 10]},
    )
    batch = _batch(["counting", "colors", "two_object", "counting"] * 50)
    torch.manual_seed(0)
    windows = module.group_windows(batch)
    assert windows.shape == (400, 2) and ((windows[:, 1] - windows[:, 0]) == 2).all()
    assert torch.equal(windows[0::2], windows[1::2])  # a group's rows share their window
    starts = {t: windows[i * 2 :: 8, 0] for i, t in enumerate(["counting", "colors", "two_object"])}
    starts["counting"] = torch.cat([starts["counting"], windows[6::8, 0]])
    assert set(starts["counting"].tolist()) == {0, 1, 2}  # [0, 4): starts 0..2
    assert set(starts["colors"].tolist()) == {6, 7}  # [6, 10): the last step (9) never trains
    assert set(starts["two_object"].tolist()) == set(range(8))  # the default range, every step but the last
    assert module._coverable_steps() == list(range(9))
    per_group = FlowGRPO(_tiny(), warm_start=None, num_steps=6, sde_window_size=1, sde_window_per_group=True)
    assert len(set(per_group.group_windows(_batch(["colors"] * 16))[:, 0].tolist())) > 1


def test_per_group_window_options_fail_clearly_before_any_compute():
    with pytest.raises(ValueError, match="set sde_window_size too"):
        FlowGRPO(_tiny(), warm_start=None, sde_window_per_group=True)
    with pytest.raises(ValueError, match=r"sde_window_by_task.count: unknown task"):
        FlowGRPO(_tiny(), warm_start=None, sde_window_size=2, sde_window_by_task={"count": [0, 4]})
    with pytest.raises(ValueError, match=r"sde_window_by_task.colors: \[8, 9\).*widen it"):
        FlowGRPO(
            _tiny(), warm_start=None, num_steps=10, sde_window_size=2, sde_window_by_task={"colors": [8, 10]}
        )


def test_per_group_windows_train_each_row_on_its_own_steps(tmp_path, monkeypatch):
    """The gradient of one FlowGRPO step with per-group windows equals the formula: minus the sum over
    rows and the steps of each row's own window of w_j A_r grad log p_rj, over (rows x steps per row)."""
    module = FlowGRPO(
        _tiny(),
        rewards=[LatentMeanReward()],
        warm_start=None,
        num_steps=6,
        noise_level=1.0,
        sde_window_size=2,
        sde_window_per_group=True,
        step_weighting="noise_std",
        regularizer="none",
        track_reference=False,
        micro_batch_size=4,
        same_latent=True,
        lr=1e-3,
    )
    start_policy = copy.deepcopy(module.policy)
    seen = {}
    make_rollouts, rank_advantages = module.make_rollouts, flow_grpo_module.rank_advantages

    def recording_rollouts(batch):
        ctx = make_rollouts(batch)
        seen["rollout"] = ctx.rollout
        return ctx

    def recording_advantages(*args, **kwargs):
        seen["adv"], zero = rank_advantages(*args, **kwargs)
        return seen["adv"], zero

    monkeypatch.setattr(module, "make_rollouts", recording_rollouts)
    monkeypatch.setattr(flow_grpo_module, "rank_advantages", recording_advantages)
    param = module.policy.transformer.proj_out.weight
    grads = capture_backward_grads(module, param)
    torch.manual_seed(3)
    trainer = L.Trainer(
        max_steps=1,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        limit_val_batches=0,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(
        module, datamodule=OnPolicyDataModule(num_train=60, num_val=12, prompts_per_step=4, group_size=3)
    )
    rollout, adv = seen["rollout"], seen["adv"]
    assert (
        rollout.row_mask is not None and len(rollout.trained_steps) > 2
    )  # the groups drew different windows
    weights = dict(
        zip(
            range(5),
            noise_aware_step_weights(
                rollout.sigmas, torch.ones(6), list(range(5)), normalize_over=list(range(5))
            ).tolist(),
        )
    )
    total = torch.zeros_like(param)
    ref_param = start_policy.transformer.proj_out.weight
    for r in range(len(rollout)):
        for j in rollout.row_mask[r].nonzero().flatten().tolist():
            ref_param.grad = None
            logp = start_policy.step_log_prob(rollout.select([r]), j).log_prob
            (-weights[j] * adv[r] * logp.sum()).backward()
            total += ref_param.grad
    total /= len(rollout) * rollout.steps_per_row
    torch.testing.assert_close(torch.stack(grads).sum(0), total, rtol=1e-4, atol=1e-8)
    assert total.abs().sum() > 0
