"""A tester mixin that any `FlowPolicy` runs to prove it meets the interface.

    class TestMyFlowModel(FlowPolicyTesterMixin):
        def make_policy(self):
            return MyFlowModel(tiny_config)

Checks: re-scored log-probs equal the rollout's (every trained step, CFG on and off, and packed
(row, step) pairs), noise 0 is the deterministic Euler ODE of the policy's own velocity, the same
seed gives the same rollout, decoding gives images, the reference is a frozen equal copy, and
save/load round-trips.
"""

from __future__ import annotations

from pathlib import Path

import torch

from unirl_lightning.models.flow.base import FlowPolicy


class FlowPolicyTesterMixin:
    prompts = [
        "a photo of a red square",
        "a photo of two circles",
        "a photo of a blue cross left of a green circle",
    ]
    num_steps = 4
    noise_level = 0.8
    cfg_scales = (1.0, 3.0)
    #: log-probs are means over latent dims of Gaussian log-densities: float32 round-off is ~1e-6
    atol = 1e-4

    def make_policy(self) -> FlowPolicy:
        raise NotImplementedError("return a tiny instance of the flow policy under test")

    def _policy(self) -> FlowPolicy:
        torch.manual_seed(0)
        return self.make_policy().eval()

    def _sample(self, policy: FlowPolicy, seed: int = 0, **kwargs):
        args = dict(
            num_steps=self.num_steps,
            noise_level=self.noise_level,
            generator=torch.Generator().manual_seed(seed),
        )
        return policy.sample(self.prompts, **{**args, **kwargs})

    def test_rescored_log_probs_equal_the_rollouts(self):
        policy = self._policy()
        for cfg in self.cfg_scales:
            rollout = self._sample(policy, cfg_scale=cfg)
            assert rollout.trained_steps == list(range(self.num_steps - 1))  # the last step is never trained
            with torch.no_grad():
                for step in rollout.trained_steps:
                    out = policy.step_log_prob(rollout, step)
                    torch.testing.assert_close(
                        out.log_prob, rollout.log_probs[:, step], atol=self.atol, rtol=0
                    )
                rows = torch.arange(len(self.prompts))
                steps = torch.tensor(
                    [rollout.trained_steps[i % len(rollout.trained_steps)] for i in rows.tolist()]
                )
                pairs = policy.pairs_log_prob(rollout, rows, steps)
                torch.testing.assert_close(
                    pairs.log_prob, rollout.log_probs[rows, steps], atol=self.atol, rtol=0
                )

    @torch.no_grad()
    def test_noise_zero_is_the_euler_ode_of_its_velocity(self):
        policy = self._policy()
        x0 = policy.initial_noise(len(self.prompts), torch.Generator().manual_seed(3))
        rollout = self._sample(policy, noise_level=0.0, latents=x0.clone())
        cond = policy.encode_text(self.prompts)
        x = x0.to(policy.device)
        for k in range(self.num_steps):
            s, s_next = rollout.sigmas[k], rollout.sigmas[k + 1]
            v = policy.velocity(x, s.expand(len(x)), cond)
            x = x + (s_next - s) * v
            torch.testing.assert_close(rollout.latents[:, k + 1], x, atol=1e-5, rtol=1e-5)
        assert rollout.trained_steps == []  # no stochastic step: nothing to train

    def test_same_seed_same_rollout(self):
        policy = self._policy()
        a, b, c = self._sample(policy, seed=1), self._sample(policy, seed=1), self._sample(policy, seed=2)
        assert torch.equal(a.latents, b.latents) and torch.equal(a.log_probs, b.log_probs)
        assert not torch.equal(a.latents, c.latents)

    def test_decode_gives_images(self):
        policy = self._policy()
        rollout = self._sample(policy)
        images = rollout.images
        assert images.dtype == torch.uint8 and images.shape[:2] == (len(self.prompts), 3)
        torch.testing.assert_close(policy.decode(rollout.latents[:, -1]), images, atol=0, rtol=0)

    def test_reference_is_a_frozen_equal_copy(self):
        policy = self._policy()
        reference = policy.make_reference()
        assert all(not p.requires_grad for p in reference.parameters())
        assert any(p.requires_grad for p in policy.parameters())
        rollout = self._sample(policy)
        with torch.no_grad():
            ours, theirs = policy.step_log_prob(rollout, 0), reference.step_log_prob(rollout, 0)
        torch.testing.assert_close(ours.velocity, theirs.velocity, atol=1e-5, rtol=1e-5)

    def test_save_load_round_trip(self, tmp_path: Path):
        policy = self._policy()
        policy.save_pretrained(tmp_path / "policy")
        loaded = type(policy).from_pretrained(tmp_path / "policy").eval()
        ours, theirs = policy.state_dict(), loaded.state_dict()
        assert ours.keys() == theirs.keys()
        assert all(torch.equal(ours[k].cpu(), theirs[k].cpu()) for k in ours)
        a, b = self._sample(policy, seed=4), self._sample(loaded, seed=4)
        torch.testing.assert_close(a.latents, b.latents, atol=1e-5, rtol=1e-5)
