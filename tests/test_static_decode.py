"""Static-cache image-token decoding: the cache and mask against their definitions, and the dynamic,
static and compiled rollouts of both autoregressive policies against each other."""

import pytest
import torch

from unirl_lightning.models.janus import JanusPolicy
from unirl_lightning.models.static_decode import StaticKVCache, attention_mask, check_decode_mode
from unirl_lightning.models.tiny import TinyConfig, TinyUnifiedModel
from unirl_lightning.testing import tiny_janus_components

# different lengths: the Janus prompts are padded
PROMPTS = ["a photo of a red square", "a photo of two blue circles left of a cube", "a photo of a cube"]


def test_cache_writes_at_positions_and_keeps_the_rest():
    torch.manual_seed(0)
    cache = StaticKVCache(2, rows=3, heads=2, length=7, head_dim=4, dtype=torch.float32, device="cpu")
    k0, v0 = torch.randn(3, 2, 4, 4), torch.randn(3, 2, 4, 4)
    cache.update(k0, v0, 1, cache_position=torch.arange(4))
    k1, v1 = torch.randn(3, 2, 1, 4), torch.randn(3, 2, 1, 4)
    keys, values = cache.layer(1).update(k1, v1, torch.tensor([5]))
    assert torch.equal(keys[:, :, :4], k0) and torch.equal(values[:, :, :4], v0)
    assert torch.equal(keys[:, :, 5:6], k1) and torch.equal(values[:, :, 5:6], v1)
    assert not keys[:, :, 4].any() and not keys[:, :, 6].any() and not cache.keys[0].any()
    # transformers' layers pass their kwargs as `kwargs=`
    cache.update(k1, v1, 0, kwargs={"cache_position": torch.tensor([6])})
    assert torch.equal(cache.keys[0][:, :, 6:7], k1)


def test_attention_mask_is_causal_over_real_keys_and_sees_itself():
    keys_ok = torch.tensor([[False, True, True, True, True], [True] * 5])
    positions = torch.tensor([0, 2, 3])
    m = attention_mask(keys_ok, positions)
    assert m.shape == (2, 1, 3, 5)
    for r in range(2):
        for i, q in enumerate(positions.tolist()):
            for t in range(5):
                want = (t <= q and bool(keys_ok[r, t])) or t == q
                assert bool(m[r, 0, i, t]) == want


def test_unknown_decode_mode_names_the_choices():
    with pytest.raises(ValueError, match="dynamic, static, compiled"):
        check_decode_mode("fast")
    with pytest.raises(ValueError, match="decode='fast'"):
        TinyUnifiedModel(TinyConfig(n_layers=1), decode="fast")


def _rollouts(policy, modes, cfg_scale, temperature=1.0):
    out = {}
    for mode in modes:
        policy.decode = mode
        g = torch.Generator().manual_seed(3)
        out[mode] = policy.generate_images(PROMPTS, cfg_scale=cfg_scale, temperature=temperature, generator=g,
                                           return_gumbel=True)
    policy.decode = "dynamic"
    return out


def _assert_same(out, reference="dynamic"):
    ref = out[reference]
    for mode, r in out.items():
        assert torch.equal(r.tokens, ref.tokens), mode
        assert torch.equal(r.gumbel, ref.gumbel), mode
        torch.testing.assert_close(r.logprobs, ref.logprobs, atol=1e-5, rtol=0)


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return TinyUnifiedModel(TinyConfig(n_layers=2)).eval()


@pytest.fixture(scope="module")
def janus():
    return JanusPolicy.from_components(*tiny_janus_components(grid=4)).eval()


@pytest.mark.parametrize("cfg_scale, temperature", [(1.0, 1.0), (5.0, 1.0), (5.0, 0.0)])
def test_static_cache_decodes_what_the_dynamic_cache_decodes(tiny, janus, cfg_scale, temperature):
    for policy in (tiny, janus):
        out = _rollouts(policy, ["dynamic", "static"], cfg_scale, temperature)
        _assert_same(out)
        # the sampled log-probs are those of the teacher-forced re-scoring
        static = out["static"]
        torch.testing.assert_close(policy.image_logprobs(static), static.logprobs, atol=1e-4, rtol=0)


def test_compiled_step_decodes_what_the_eager_step_decodes(tiny, janus):
    """Under inductor: same tokens from the same seed, log-probs within 1e-5 (2-layer models keep the
    compile short)."""
    for policy in (tiny, janus):
        _assert_same(_rollouts(policy, ["static", "compiled"], 5.0), reference="static")
        policy._compiled_step = None  # the compiled function holds graphs; free them with the test
