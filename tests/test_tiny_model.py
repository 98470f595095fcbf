import pytest
import torch

from unirl_lightning.models.tiny import TinyConfig, TinyUnifiedModel
from unirl_lightning.testing import PolicyTesterMixin


class TestTinyAutoregressive(PolicyTesterMixin):
    def make_policy(self):
        return TinyUnifiedModel(TinyConfig(d_model=32, n_layers=2, n_heads=2))

    def generation_parameters(self, policy):
        # the image-code rows of the output head are read only by the generation logits
        return [policy.head.weight]


class TestTinyMasked(TestTinyAutoregressive):
    def make_policy(self):
        return TinyUnifiedModel(TinyConfig(d_model=32, n_layers=2, n_heads=2, image_order="masked", mask_steps=4))


def test_masked_rollout_reveals_every_token_once():
    policy = TinyUnifiedModel(TinyConfig(d_model=32, n_layers=2, n_heads=2, image_order="masked", mask_steps=4)).eval()
    rollout = policy.generate_images(["a photo of a cross"] * 3, generator=torch.Generator().manual_seed(0))
    assert rollout.logprobs.shape == (3, 4)
    L = policy.tokens_per_image
    counts = torch.stack([(rollout.reveal_step == t).sum(1) for t in range(4)], 1)
    expected = [a - b for a, b in zip([L] + policy.mask_schedule()[:-1], policy.mask_schedule())]
    assert counts.tolist() == [expected] * 3 and sum(expected) == L


def test_masked_order_attention_is_bidirectional_in_image_block_only():
    policy = TinyUnifiedModel(TinyConfig(d_model=32, n_layers=1, n_heads=2, image_order="masked"))
    seq = torch.zeros(1, policy.soi_pos + 1 + policy.tokens_per_image + 1, dtype=torch.long)
    allowed = policy._allowed(seq, seq.shape[1])[0, 0]
    img = policy._image_slice
    assert allowed[img.start, img.stop - 1]  # first image token sees the last
    assert not allowed[0, 1]  # text stays causal
    assert not allowed[img.start, img.stop]  # nothing sees the future past the block


def test_cfg_changes_distribution_and_one_means_off():
    policy = TinyUnifiedModel(TinyConfig(d_model=32, n_layers=2, n_heads=2)).eval()
    r = policy.generate_images(["a photo of a red square"] * 2, cfg_scale=1.0, generator=torch.Generator().manual_seed(0))
    guided = type(r)(**{**r.__dict__, "cfg_scale": 4.0})
    assert not torch.allclose(policy.image_logprobs(guided), r.logprobs)


def test_text_too_long_is_a_clear_error():
    policy = TinyUnifiedModel(TinyConfig(d_model=32, n_layers=1, n_heads=2, text_len=3))
    with pytest.raises(ValueError, match="text_len"):
        policy.generate_images(["a photo of a red square"])


def test_warm_start_losses_decrease():
    from unirl_lightning.data import answer_for, generate_specs, question_for, world_vocabulary
    from unirl_lightning.worlds.render import WorldConfig, render_batch

    torch.manual_seed(0)
    policy = TinyUnifiedModel(TinyConfig(d_model=32, n_layers=2, n_heads=2))
    specs = generate_specs(16, world_vocabulary(), seed=0)
    images, _ = render_batch(specs, list(range(16)), WorldConfig())
    tokens = policy.encode_images(images)
    opt = torch.optim.AdamW(policy.parameters(), lr=3e-3)
    losses = []
    for _ in range(15):
        loss = policy.generation_loss([s["prompt"] for s in specs], tokens) + policy.understanding_loss(
            tokens, [question_for(s) for s in specs], [answer_for(s) for s in specs])
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0]
