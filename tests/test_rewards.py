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


class _FailsOn(GenEvalReward):
    """GenEval, but raises on any batch holding the spec `bad` (or, `batch_only`, on batches of more than
    one sample: a failure of the batch as a whole)."""

    def __init__(self, bad: dict | None = None, batch_only: bool = False):
        super().__init__("binary", name="flaky")
        self.bad, self.batch_only = bad, batch_only

    def __call__(self, ctx):
        if self.batch_only and len(ctx.specs) > 1:
            raise MemoryError("out of memory in the reward model")
        if self.bad is not None and self.bad in ctx.specs:
            raise KeyError("unknown object")
        return super().__call__(ctx)


def test_a_reward_that_raises_is_named_with_the_prompt_that_fails(scenes):
    specs, images, _ = scenes
    with pytest.raises(RuntimeError) as info:
        combine_rewards([GenEvalReward("partial"), _FailsOn(bad=specs[5])], _ctx(specs, images))
    message = str(info.value)
    assert "reward 'flaky' (_FailsOn) raised KeyError: 'unknown object'" in message
    assert f"fails on sample 5 of {len(specs)}, prompt {specs[5]['prompt']!r}" in message
    assert isinstance(info.value.__cause__, KeyError)  # the original error, with its traceback


def test_a_reward_that_fails_only_on_whole_batches_names_the_batchs_prompts(scenes):
    specs, images, _ = scenes
    with pytest.raises(RuntimeError, match="each sample alone scores without error") as info:
        combine_rewards([_FailsOn(batch_only=True)], _ctx(specs, images))
    message = str(info.value)
    assert "raised MemoryError: out of memory in the reward model" in message
    assert all(repr(s["prompt"]) in message for s in specs[:4]) and f"and {len(specs) - 4} more" in message


def test_rollout_context_select_cuts_every_per_sample_field(scenes):
    specs, images, _ = scenes
    ctx = _ctx(specs[:6], images[:6], answers=[f"answer {i}" for i in range(6)])
    ctx.cache.update(geneval=list(range(6)), step_s=1.5, scores=torch.arange(6.0))
    sub = ctx.select([4, 1])
    assert sub.specs == [specs[4], specs[1]] and torch.equal(sub.images, images[[4, 1]])
    assert sub.answers.texts == ["answer 4", "answer 1"] and sub.answers.tokens.shape == (2, 1)
    assert sub.cache["geneval"] == [4, 1] and sub.cache["step_s"] == 1.5
    assert torch.equal(sub.cache["scores"], torch.tensor([4.0, 1.0]))


def test_non_finite_rewards_are_counted_and_kept_out_of_the_logged_means(scenes):
    specs, images, _ = scenes

    class HalfNaN(GenEvalReward):
        def __call__(self, ctx):
            r = super().__call__(ctx)
            r[::2] = float("nan")
            return r

    ctx = _ctx(specs, images)
    total, logs = combine_rewards([HalfNaN("binary", name="half")], ctx)
    assert int(torch.isnan(total).sum()) == len(specs) // 2
    assert logs["reward/half"] == pytest.approx(total[1::2].mean().item())
    assert ctx.cache["bad_reward_terms"] == {"half": len(specs) // 2}


def test_geneval_rewards_without_a_detector_judge_with_the_recipes_detector():
    from unirl_lightning.models.flow import TinyFlowModel
    from unirl_lightning.modules import FlowGRPO
    from unirl_lightning.worlds.detector import WorldDetector

    class Nothing:  # a stand-in real detector: sees nothing
        def __call__(self, images, classes=None):
            return [[] for _ in range(len(images))]

    own = GenEvalReward("binary", detector=WorldDetector(), name="own")
    module = FlowGRPO(
        TinyFlowModel(num_layers=1),
        rewards=[GenEvalReward("partial"), own],
        detector=Nothing(),
        warm_start=None,
    )
    module.setup("fit")
    assert module.rewards[0].judge is module.judge and own.judge is not module.judge
    assert isinstance(module.rewards[0].judge.detector, Nothing)
    assert isinstance(own.judge.detector, WorldDetector)  # an explicit detector stays
