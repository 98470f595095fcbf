import json

import pytest
import torch

from unirl_lightning.models.tiny import TinyConfig, TinyUnifiedModel
from unirl_lightning.testing import PolicyTesterMixin


class TestTinyAutoregressive(PolicyTesterMixin):
    def make_policy(self):
        return TinyUnifiedModel(TinyConfig(d_model=32, n_layers=2, n_heads=2))

    def generation_parameters(self, policy):
        # the image-code rows of the output head (and the codebook MLP scoring image codes) are
        # read only by the generation logits
        return [policy.head.weight, *getattr(policy, "code_out", torch.nn.Identity()).parameters()]

    def round_trip_images(self, policy):
        # the world's patch codebook is exact on rendered scenes of the model's own world
        from unirl_lightning.data import generate_specs, world_vocabulary
        from unirl_lightning.worlds.render import render_batch

        specs = generate_specs(6, world_vocabulary(), seed=0)
        return render_batch(specs, list(range(len(specs))), policy.world_config)[0]


class TestTinyTableEmbedding(TestTinyAutoregressive):
    def make_policy(self):
        return TinyUnifiedModel(TinyConfig(d_model=32, n_layers=2, n_heads=2, image_embedding="table"))


class TestTinyMasked(TestTinyAutoregressive):
    def make_policy(self):
        return TinyUnifiedModel(
            TinyConfig(d_model=32, n_layers=2, n_heads=2, image_order="masked", mask_steps=4)
        )


def test_masked_rollout_reveals_every_token_once():
    policy = TinyUnifiedModel(
        TinyConfig(d_model=32, n_layers=2, n_heads=2, image_order="masked", mask_steps=4)
    ).eval()
    rollout = policy.generate_images(["a photo of a cross"] * 3, generator=torch.Generator().manual_seed(0))
    assert rollout.logprobs.shape == (3, 4)
    L = policy.tokens_per_image
    counts = torch.stack([(rollout.reveal_step == t).sum(1) for t in range(4)], 1)
    expected = [a - b for a, b in zip([L] + policy.mask_schedule()[:-1], policy.mask_schedule())]
    assert counts.tolist() == [expected] * 3 and sum(expected) == L


def test_masked_rescoring_of_a_step_subset_equals_the_full_rescoring_there():
    """`reveal_steps_per_update`: only the trained steps are re-scored, to the same log-probs."""
    from unirl_lightning.modules.grpo import train_step_subset

    policy = TinyUnifiedModel(
        TinyConfig(d_model=32, n_layers=2, n_heads=2, image_order="masked", mask_steps=4)
    ).eval()
    rollout = policy.generate_images(["a photo of a cross"] * 3, cfg_scale=3.0,
                                     generator=torch.Generator().manual_seed(0))
    full = policy.image_logprobs(rollout)
    torch.testing.assert_close(full, rollout.logprobs, atol=1e-4, rtol=0)
    torch.manual_seed(1)
    rollout.action_mask = train_step_subset(rollout.action_mask, 2)
    part = policy.image_logprobs(rollout)
    kept = rollout.action_mask
    assert kept.sum(1).tolist() == [2, 2, 2]
    torch.testing.assert_close(part[kept], full[kept], atol=1e-5, rtol=0)
    assert torch.isfinite(part).all()


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
    r = policy.generate_images(
        ["a photo of a red square"] * 2, cfg_scale=1.0, generator=torch.Generator().manual_seed(0)
    )
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
            tokens, [question_for(s) for s in specs], [answer_for(s) for s in specs]
        )
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0]


def test_codebook_embedding_shares_what_codes_look_like(tmp_path):
    """Codes are embedded and scored from their pixels too: codes with equal pixels get equal
    content vectors, the relaxed path uses the same table, and folders whose config has no
    `image_embedding` key load as the table model they hold."""
    policy = TinyUnifiedModel(TinyConfig(d_model=32, n_layers=1, n_heads=2))
    with torch.no_grad():
        policy.tok_emb.weight.zero_()
        policy.head.weight.zero_()
    pix = policy.code_pixels
    content_in, content_out = policy.image_input_embeddings(), policy.image_output_embeddings()
    assert torch.allclose(content_in, policy.code_in(pix)) and torch.allclose(
        content_out, policy.code_out(pix)
    )
    assert not torch.allclose(content_in[1], content_in[2])  # different codes, different vectors
    tokens = torch.tensor([[1, 2, 3, 0] * (policy.tokens_per_image // 4)])
    one_hot = torch.nn.functional.one_hot(tokens, policy.image_vocab_size).float()
    _, relaxed = policy._understanding_prefix(one_hot, ["what is this"])
    assert torch.allclose(relaxed[0], content_in[tokens[0]])

    table = TinyUnifiedModel(TinyConfig(d_model=32, n_layers=1, n_heads=2, image_embedding="table"))
    table.save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    del cfg["image_embedding"]
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    loaded = TinyUnifiedModel.from_pretrained(tmp_path)
    assert loaded.config.image_embedding == "table" and not hasattr(loaded, "code_in")
    with pytest.raises(ValueError, match="image_embedding"):
        TinyConfig(image_embedding="pixels")
