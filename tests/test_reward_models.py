"""Model-scored rewards on tiny random real architectures: the contract (shape, range, determinism,
batching, dtype), each formula against its definition, and the semantics that need no weights."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
pytest.importorskip("transformers")
pytest.importorskip("PIL")

from unirl_lightning.rewards import (  # noqa: E402
    AestheticReward,
    CLIPScoreReward,
    OCRReward,
    PickScoreReward,
    VLMJudgeReward,
    combine_rewards,
)
from unirl_lightning.rewards.base import RolloutContext  # noqa: E402
from unirl_lightning.rewards.models import (  # noqa: E402
    AestheticHead,
    edit_distance,
    ocr_accuracy,
    requested_text,
)
from unirl_lightning.testing.rewards import tiny_clip, tiny_ocr  # noqa: E402

PROMPTS = ["a photo of a red circle", "two squares", 'a sign that says "open 24"', "a blue cross", "a cat"]


def _ctx(n: int = 5, seed: int = 0) -> RolloutContext:
    images = torch.randint(
        0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed)
    )
    return RolloutContext(
        specs=[{"prompt": PROMPTS[i % len(PROMPTS)]} for i in range(n)], rollout=None, images=images
    )


@pytest.fixture(scope="module")
def clip():
    return tiny_clip()


def _contract(reward, ctx: RolloutContext, low: float = 0.0, high: float = 1.0) -> torch.Tensor:
    """Shape, float dtype on the CPU, range, determinism and batching invariance; returns the rewards."""
    out = reward(ctx)
    assert out.shape == (len(ctx.specs),) and out.dtype == torch.float32 and out.device.type == "cpu"
    assert torch.isfinite(out).all() and (out >= low).all() and (out <= high).all()
    torch.testing.assert_close(reward(ctx), out, rtol=0, atol=0)
    size, reward.batch_size = reward.batch_size, 2
    torch.testing.assert_close(reward(ctx), out, rtol=1e-5, atol=1e-5)
    reward.batch_size = size
    return out


def _unit_embeddings(model, processor, ctx):
    pixels = processor(images=list(ctx.images), return_tensors="pt")["pixel_values"]
    tokens = processor(text=[s["prompt"] for s in ctx.specs], padding=True, return_tensors="pt")
    img = model.get_image_features(pixel_values=pixels)
    txt = model.get_text_features(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"])
    img, txt = (getattr(x, "pooler_output", x) for x in (img, txt))
    return torch.nn.functional.normalize(img, dim=-1), torch.nn.functional.normalize(txt, dim=-1)


class _TensorFeatures(torch.nn.Module):
    """A CLIP model whose get_*_features return tensors (transformers 4), as torchmetrics 1.9 reads them."""

    def __init__(self, model):
        super().__init__()
        self.model, self.config = model, model.config

    def get_image_features(self, *args, **kwargs):
        out = self.model.get_image_features(*args, **kwargs)
        return getattr(out, "pooler_output", out)

    def get_text_features(self, *args, **kwargs):
        out = self.model.get_text_features(*args, **kwargs)
        return getattr(out, "pooler_output", out)


def test_clip_score_is_torchmetrics_clip_score_over_100(clip):
    from torchmetrics.multimodal import CLIPScore

    model, processor = clip
    reward, ctx = CLIPScoreReward(models=clip), _ctx()
    out = _contract(reward, ctx)
    for i in range(len(ctx.specs)):  # torchmetrics' metric averages a batch: one sample at a time
        metric = CLIPScore(model_name_or_path=lambda: (_TensorFeatures(model), processor))
        metric.update(ctx.images[i : i + 1], [ctx.specs[i]["prompt"]])
        assert float(metric.compute()) / 100 == pytest.approx(float(out[i]), abs=1e-4)
    img, txt = _unit_embeddings(model, processor, ctx)
    torch.testing.assert_close(out, (img * txt).sum(-1).clamp(min=0).detach(), rtol=1e-4, atol=1e-5)


def test_clip_score_reads_the_prompt_and_is_zero_for_opposed_embeddings(clip):
    reward, ctx = CLIPScoreReward(models=clip), _ctx()
    other = RolloutContext(specs=[{"prompt": "zzz qqq"}] * len(ctx.specs), rollout=None, images=ctx.images)
    assert not torch.allclose(reward(ctx), reward(other))
    embed = reward.embed
    reward.embed = lambda images, texts: (lambda i, t: (i, -i))(*embed(images, texts))  # cos = -1
    assert torch.equal(reward(ctx), torch.zeros(len(ctx.specs)))


def test_pick_score_is_scaled_cosine_over_normalize(clip):
    model, processor = clip
    reward, ctx = PickScoreReward(models=clip, normalize=26.0), _ctx()
    out = _contract(reward, ctx, low=-1.0, high=1.0)
    img, txt = _unit_embeddings(model, processor, ctx)
    expected = model.logit_scale.exp() * (img * txt).sum(-1) / 26.0
    torch.testing.assert_close(out, expected.detach(), rtol=1e-4, atol=1e-5)


def test_aesthetic_head_has_the_published_layout_and_loads_its_file(clip, tmp_path):
    head = AestheticHead(16)
    assert list(head.state_dict()) == [f"layers.{i}.{p}" for i in (0, 2, 4, 6, 7) for p in ("weight", "bias")]
    torch.save(head.state_dict(), tmp_path / "head.pth")
    from safetensors.torch import save_file

    save_file(head.state_dict(), tmp_path / "head.safetensors")
    model, processor = clip
    for path in ("head.pth", "head.safetensors"):
        reward = AestheticReward(head_path=str(tmp_path / path), models=clip)
        torch.testing.assert_close(reward.head.layers[0].weight, head.layers[0].weight)
    ctx = _ctx()
    out = _contract(reward, ctx, low=-10.0, high=10.0)
    img, _ = _unit_embeddings(model, processor, ctx)
    torch.testing.assert_close(out, (head.eval()(img) / 10).detach(), rtol=1e-4, atol=1e-5)
    renamed = RolloutContext(specs=[{"prompt": "anything"}] * 5, rollout=None, images=ctx.images)
    torch.testing.assert_close(reward(renamed), out)  # the prompt is not read
    with pytest.raises(ValueError, match="head_path"):
        AestheticReward(models=clip)


def test_bfloat16_rewards_follow_float32(clip):
    ctx = _ctx()
    full = CLIPScoreReward(models=tiny_clip())(ctx)
    half = CLIPScoreReward(models=tiny_clip(), dtype="bfloat16")
    assert next(half.model.parameters()).dtype == torch.bfloat16
    torch.testing.assert_close(half(ctx), full, rtol=0.05, atol=0.03)
    with pytest.raises(ValueError, match="dtype"):
        CLIPScoreReward(models=clip, dtype="float8")


def test_ocr_text_and_accuracy():
    assert requested_text('a sign that says "open 24"') == "open 24"
    assert requested_text("a neon sign \u201cHELLO\u201d at night") == "HELLO"
    assert requested_text("a cat") is None
    assert (
        edit_distance("kitten", "sitting") == 3
        and edit_distance("", "abc") == 3
        and edit_distance("a", "a") == 0
    )
    assert ocr_accuracy("Open 24", "open24") == 1.0
    assert ocr_accuracy("opex 24", "open 24") == pytest.approx(1 - 1 / 6)
    assert ocr_accuracy("completely different", "ab") == 0.0


def test_ocr_reward_reads_only_prompts_that_ask_for_text():
    reward, ctx = OCRReward(models=tiny_ocr(), max_new_tokens=6, no_text_reward=0.5), _ctx()
    out = _contract(reward, ctx)
    asked = [i for i, s in enumerate(ctx.specs) if requested_text(s["prompt"])]
    assert asked == [2] and all(out[i] == 0.5 for i in range(5) if i not in asked)
    read = reward.read(ctx.images[asked])
    assert out[2] == pytest.approx(ocr_accuracy(read[0], "open 24"))
    reward.read = lambda images: ["open 2"] * len(images)  # one character short
    assert reward(ctx)[2] == pytest.approx(1 - 1 / 6)


@pytest.fixture(scope="module")
def judge():
    from unirl_lightning.testing.janus import tiny_janus_components
    from unirl_lightning.worlds.words import world_words

    model, processor = tiny_janus_components(
        words=world_words() + ["yes", "no", "does", "show", "answer", "or"]
    )
    fmt = "<|User|>: <image_placeholder>\n{question}\n\n<|Assistant|>:"
    return VLMJudgeReward(models=(model, processor), prompt_format=fmt)


def test_vlm_judge_is_the_yes_probability_of_the_next_token(judge):
    ctx = _ctx()
    out = _contract(judge, ctx)
    # by hand, one sample alone: softmax over the "yes" / "no" logits after the prompt
    proc = judge.processor
    inputs = proc(text=[judge.text(ctx.specs[1]["prompt"])], images=[ctx.images[1]], return_tensors="pt")
    with torch.no_grad():
        logits = judge.model(**inputs).logits[0, -1]
    yes, no = (proc.tokenizer(w, add_special_tokens=False)["input_ids"][0] for w in ("yes", "no"))
    assert float(out[1]) == pytest.approx(float(logits[[yes, no]].softmax(-1)[0]), abs=1e-5)


def test_vlm_judge_needs_a_format_without_a_chat_template(judge):
    bare = VLMJudgeReward(models=(judge.model, judge.processor))
    with pytest.raises(ValueError, match="prompt_format"):
        bare(_ctx())
    with pytest.raises(ValueError, match="same token"):
        VLMJudgeReward(models=(judge.model, judge.processor), yes="no", no="no")


def test_reward_time_is_logged_per_term(clip):
    _, logs = combine_rewards([CLIPScoreReward(models=clip, name="clip")], _ctx())
    assert logs["time/reward/clip"] > 0 and "reward/clip" in logs
