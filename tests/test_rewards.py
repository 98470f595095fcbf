"""Rewards: each term on rendered scenes (the world's exact detector) and the weighted combination."""

import pytest
import torch

from unirl_lightning.data import answer_for, generate_specs
from unirl_lightning.models.base import AnswerRollout
from unirl_lightning.rewards import (
    GenEvalReward,
    RolloutContext,
    SelfUnderstandingReward,
    combine_rewards,
    corl_rewards,
)
from unirl_lightning.worlds.render import render_batch
from unirl_lightning.worlds.vocab import SHAPES, TASKS


def _ctx(specs, images, answers=None):
    ans = None
    if answers is not None:
        ans = AnswerRollout(
            texts=answers,
            tokens=torch.zeros(len(answers), 1, dtype=torch.long),
            logprobs=torch.zeros(len(answers), 1),
            mask=torch.ones(len(answers), 1, dtype=torch.bool),
        )
    return RolloutContext(specs=specs, rollout=None, images=images, answers=ans)


@pytest.fixture(scope="module")
def scenes():
    specs = generate_specs(24, list(SHAPES), seed=0, task_weights={t: 1.0 for t in TASKS})
    images, _ = render_batch(specs, seeds=0)
    blank = torch.full_like(images, 128)  # the grey canvas: nothing drawn
    return specs, images, blank


@pytest.mark.parametrize("mode", ["binary", "strict", "partial"])
def test_geneval_reward_is_one_on_rendered_scenes_and_low_on_blank(scenes, mode):
    specs, images, blank = scenes
    reward = GenEvalReward(mode)
    assert torch.equal(reward(_ctx(specs, images)), torch.ones(len(specs)))
    empty = reward(_ctx(specs, blank))
    assert empty.shape == (len(specs),) and empty.max() < 1.0
    if mode != "partial":
        assert torch.equal(empty, torch.zeros(len(specs)))


def test_self_understanding_reward_grades_each_attribute(scenes):
    specs, images, _ = scenes
    reward = SelfUnderstandingReward()
    right = reward(_ctx(specs, images, [answer_for(s) for s in specs]))
    assert torch.equal(right, torch.ones(len(specs)))
    wrong = reward(_ctx(specs, images, ["nothing"] * len(specs)))
    assert wrong.max() < 1.0
    with pytest.raises(ValueError, match="needs the policy's answers"):
        reward(_ctx(specs, images))


def test_corl_combination_is_generation_plus_point_eight_understanding(scenes):
    specs, images, blank = scenes
    answers = [answer_for(s) if i % 2 else "nothing" for i, s in enumerate(specs)]
    imgs = torch.where(torch.arange(len(specs)).view(-1, 1, 1, 1) % 3 == 0, blank, images)
    ctx = _ctx(specs, imgs, answers)
    total, logs = combine_rewards(corl_rewards(), ctx)
    gen = GenEvalReward("binary")(_ctx(specs, imgs))
    und = SelfUnderstandingReward()(_ctx(specs, imgs, answers))
    torch.testing.assert_close(total, gen + 0.8 * und)
    assert logs["reward/geneval_binary"] == pytest.approx(gen.mean().item())
    assert logs["reward/self_understanding"] == pytest.approx(und.mean().item())
    for task in {s["tag"] for s in specs}:
        rows = torch.tensor([s["tag"] == task for s in specs])
        assert logs[f"reward_by_task/{task}"] == pytest.approx(total[rows].mean().item())


def test_combine_rewards_rejects_wrong_shapes_and_empty_lists(scenes):
    specs, images, _ = scenes

    class Short(GenEvalReward):
        def __call__(self, ctx):
            return torch.zeros(3)

    with pytest.raises(ValueError, match="returned shape"):
        combine_rewards([Short()], _ctx(specs, images))
    with pytest.raises(ValueError, match="at least one entry"):
        combine_rewards([], _ctx(specs, images))
