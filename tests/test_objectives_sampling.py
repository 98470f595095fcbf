"""objectives.guidance and objectives.gumbel pinned to their formulas."""

import torch

from unirl_lightning.objectives import cfg_combine, guided_logits, gumbel_noise, straight_through_gumbel


def test_cfg_combine_is_uncond_plus_scale_times_the_difference():
    c, u = torch.randn(3, 5), torch.randn(3, 5)
    torch.testing.assert_close(cfg_combine(c, u, 4.0), u + 4.0 * (c - u))
    torch.testing.assert_close(cfg_combine(c, u, 1.0), c)  # scale 1: the conditional alone
    torch.testing.assert_close(cfg_combine(c, u, 0.0), u)


def test_guided_logits_split_cond_then_uncond_rows_and_scale_by_temperature():
    c, u = torch.randn(2, 4, 7), torch.randn(2, 4, 7)
    stacked = torch.cat([c, u]).to(torch.bfloat16)
    out = guided_logits(stacked, 3.0, 0.5)
    assert out.dtype == torch.float32 and out.shape == (2, 4, 7)
    c16, u16 = c.to(torch.bfloat16).float(), u.to(torch.bfloat16).float()
    torch.testing.assert_close(out, (u16 + 3.0 * (c16 - u16)) / 0.5)
    torch.testing.assert_close(guided_logits(c, 1.0, 2.0), c / 2.0)  # no CFG: conditional rows only
    torch.testing.assert_close(guided_logits(c, 1.0, 0.0), c)  # greedy: unscaled


def test_gumbel_max_samples_the_softmax_and_is_seeded():
    logits = torch.tensor([0.0, 1.0, -1.0, 2.0])
    n = 40_000
    g = gumbel_noise((n, 4), torch.Generator().manual_seed(0))
    freq = torch.bincount((logits + g).argmax(-1), minlength=4).float() / n
    # binomial standard error at n = 40k is <= 0.0025: 0.01 is four of them
    torch.testing.assert_close(freq, logits.softmax(-1), atol=0.01, rtol=0)
    assert torch.equal(g, gumbel_noise((n, 4), torch.Generator().manual_seed(0)))
    assert torch.isfinite(g).all()


def test_straight_through_gumbel_uses_the_same_noise():
    logits = torch.randn(5, 9)
    y, index = straight_through_gumbel(logits, generator=torch.Generator().manual_seed(3))
    g = gumbel_noise(logits.shape, torch.Generator().manual_seed(3))
    assert torch.equal(index, (logits + g).argmax(-1)) and torch.equal(y.argmax(-1), index)
