"""A tester mixin that any `UnifiedPolicy` adapter runs to prove it meets the interface.

    class TestMyModel(PolicyTesterMixin):
        def make_policy(self):
            return MyModel(tiny_config)

Checks: rollout log-probs equal teacher-forced log-probs (with and without CFG), the same
seed gives the same rollout, decoded images are a function of each image's own tokens (and, for
an exact tokenizer, images and codes round-trip: `round_trip_images`), relaxed image tokens are
one-hot forward and carry the answer loss's gradient to the generation logits, answer log-probs
match sampling, the reference is frozen and equal, and save/load round-trips.
"""

from __future__ import annotations

import torch

from unirl_lightning.models.base import UnifiedPolicy


class PolicyTesterMixin:
    prompts = [
        "a photo of a red square",
        "a photo of two circles",
        "a photo of a blue cross and a green triangle",
    ]
    questions = [
        "What is the main item in this image?",
        "How many items in this image?",
        "What are the colors of the cross and the triangle?",
    ]
    answers = ["square", "2 circles", "The cross is blue and the triangle is green"]
    cfg_scales = (1.0, 3.0)
    atol = 1e-4

    def make_policy(self) -> UnifiedPolicy:
        raise NotImplementedError("return a tiny instance of the policy under test")

    def _policy(self) -> UnifiedPolicy:
        torch.manual_seed(0)
        return self.make_policy().eval()

    def test_rollout_logprobs_match_teacher_forced(self):
        policy = self._policy()
        for cfg in self.cfg_scales:
            gen = torch.Generator().manual_seed(0)
            rollout = policy.generate_images(self.prompts, cfg_scale=cfg, temperature=1.0, generator=gen)
            assert rollout.tokens.shape == (len(self.prompts), policy.tokens_per_image)
            assert rollout.logprobs.shape == rollout.action_mask.shape
            torch.testing.assert_close(
                policy.image_logprobs(rollout), rollout.logprobs, atol=self.atol, rtol=0
            )

    def test_same_seed_same_rollout(self):
        policy = self._policy()
        a = policy.generate_images(self.prompts, generator=torch.Generator().manual_seed(1))
        b = policy.generate_images(self.prompts, generator=torch.Generator().manual_seed(1))
        assert torch.equal(a.tokens, b.tokens)

    def test_decode_images(self):
        policy = self._policy()
        rollout = policy.generate_images(self.prompts[:2], generator=torch.Generator().manual_seed(0))
        images = policy.decode_images(rollout.tokens)
        assert images.dtype == torch.uint8 and images.ndim == 4 and images.shape[:2] == (2, 3)
        # a function of the tokens alone: the same pixels again, and row by row (up to rounding)
        assert torch.equal(policy.decode_images(rollout.tokens), images)
        alone = torch.cat([policy.decode_images(rollout.tokens[i : i + 1]) for i in range(2)])
        assert (alone.int() - images.int()).abs().max() <= 1, "an image depends on other rows of its batch"
        # and it reads them: another code at the first or the last position changes the image
        for position in (0, -1):
            other = rollout.tokens.clone()
            other[:, position] = (other[:, position] + 1) % policy.image_vocab_size
            assert (policy.decode_images(other) != images).flatten(1).any(1).all(), f"token {position} unused"
        scenes = self.round_trip_images(policy)
        if scenes is not None:  # an exact tokenizer: images and codes survive the round trip unchanged
            tokens = policy.encode_images(scenes)
            assert tokens.shape == (len(scenes), policy.tokens_per_image) and len(tokens.unique()) > 1
            assert torch.equal(policy.decode_images(tokens), scenes)
            assert torch.equal(policy.encode_images(images).to(rollout.tokens.device), rollout.tokens)

    def round_trip_images(self, policy: UnifiedPolicy) -> torch.Tensor | None:
        """Override when the policy's image tokenizer is exact (distinct codes decode to distinct
        images): uint8 images `[N, 3, H, W]` that `encode_images` represents without loss, e.g.
        rendered scenes. `test_decode_images` then checks both round trips; None skips them."""
        return None

    def test_relaxed_tokens_are_one_hot_and_carry_gradient(self):
        policy = self._policy()
        rollout = policy.generate_images(
            self.prompts, generator=torch.Generator().manual_seed(0), return_gumbel=True
        )
        relaxed = policy.relaxed_image_tokens(rollout, tau=1.0)
        assert torch.equal(relaxed.argmax(-1), rollout.tokens)
        torch.testing.assert_close(relaxed.detach().sum(-1), torch.ones(relaxed.shape[:2]))
        logp, mask = policy.answer_logprobs(relaxed, self.questions, self.answers)
        (-(logp.sum() / mask.sum())).backward()
        grads = [p.grad for p in self.generation_parameters(policy) if p.grad is not None]
        assert grads and sum(g.abs().sum() for g in grads) > 0, (
            "answer loss did not reach the generation logits"
        )

    def generation_parameters(self, policy: UnifiedPolicy):
        """Parameters that only the generation logits use (override per model); default: all."""
        return list(policy.parameters())

    def test_answer_logprobs_match_sampling(self):
        policy = self._policy()
        rollout = policy.generate_images(self.prompts, generator=torch.Generator().manual_seed(0))
        ans = policy.answer(
            rollout.tokens, self.questions, greedy=False, generator=torch.Generator().manual_seed(0)
        )
        logp, mask = policy.answer_logprobs(rollout.tokens, self.questions, ans)
        assert torch.equal(mask, ans.mask)
        torch.testing.assert_close(logp * mask, ans.logprobs * ans.mask, atol=self.atol, rtol=0)
        greedy = policy.answer(rollout.tokens, self.questions, greedy=True)
        assert len(greedy.texts) == len(self.questions)

    def test_reference_is_frozen_copy(self):
        policy = self._policy()
        ref = policy.make_reference()
        assert all(not p.requires_grad for p in ref.parameters())
        rollout = policy.generate_images(self.prompts, generator=torch.Generator().manual_seed(0))
        torch.testing.assert_close(ref.image_logprobs(rollout), policy.image_logprobs(rollout).detach())

    def test_save_load_roundtrip(self, tmp_path):
        policy = self._policy()
        policy.save_pretrained(tmp_path / "m")
        loaded = type(policy).from_pretrained(tmp_path / "m").eval()
        rollout = policy.generate_images(self.prompts, generator=torch.Generator().manual_seed(0))
        torch.testing.assert_close(loaded.image_logprobs(rollout), policy.image_logprobs(rollout))
