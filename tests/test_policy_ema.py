"""PolicyEMA: the average follows the EMA formula over optimiser steps, validation and the saved
policy see it, and training itself (the live weights) is untouched."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch
from torch import nn

from unirl_lightning.callbacks import PolicyEMA


class TinyRegression(pl.LightningModule):
    """A linear `policy` (and a frozen `reference`, which the EMA must leave alone) fit by SGD."""

    def __init__(self):
        super().__init__()
        self.policy = nn.Linear(3, 2)
        self.reference = nn.Linear(3, 2).requires_grad_(False)
        self.val_seen: list[torch.Tensor] = []

    def training_step(self, batch, batch_idx):
        x, y = batch
        return ((self.policy(x) - y) ** 2).mean()

    def validation_step(self, batch, batch_idx):
        if batch_idx == 0:
            self.val_seen.append(self.policy.weight.detach().clone())

    def configure_optimizers(self):
        return torch.optim.SGD(self.policy.parameters(), lr=0.3)


class LiveRecorder(pl.Callback):
    """Records the live weight after every optimiser step (placed before the EMA)."""

    def __init__(self):
        self.steps, self.weights = [], []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step > (self.steps[-1] if self.steps else 0):
            self.steps.append(trainer.global_step)
            self.weights.append(pl_module.policy.weight.detach().clone())


def _data(n=24):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 3, generator=g)
    y = x @ torch.randn(3, 2, generator=g)
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=2)


def _fit(callbacks, accumulate=1, val_every=None):
    torch.manual_seed(0)
    model = TinyRegression()
    reference = model.reference.weight.detach().clone()
    trainer = pl.Trainer(accelerator="cpu", max_epochs=1, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, callbacks=callbacks,
                         accumulate_grad_batches=accumulate, num_sanity_val_steps=0,
                         val_check_interval=val_every, limit_val_batches=1 if val_every else 0)
    loaders = (_data(), _data(4)) if val_every else (_data(),)
    trainer.fit(model, *loaders)
    assert torch.equal(model.reference.weight, reference)
    return model


def _expected_ema(start, weights, decay, warmup, update_every=1):
    avg = start.clone()
    for n, w in enumerate(weights[update_every - 1::update_every]):
        d = min(decay, (1 + n) / (10 + n)) if warmup else decay
        avg = d * avg + (1 - d) * w
    return avg


@pytest.mark.parametrize("warmup", [True, False])
@pytest.mark.parametrize("accumulate,update_every", [(1, 1), (2, 1), (1, 3)])
def test_average_follows_the_ema_formula_over_optimiser_steps(warmup, accumulate, update_every):
    torch.manual_seed(0)
    start = TinyRegression().policy.weight.detach().clone()
    rec = LiveRecorder()
    model = _fit([rec, PolicyEMA(decay=0.8, warmup=warmup, update_every=update_every)], accumulate=accumulate)
    assert rec.steps == list(range(1, 12 // accumulate + 1))  # one record per optimiser step
    expected = _expected_ema(start, rec.weights, 0.8, warmup, update_every)
    torch.testing.assert_close(model.policy.weight, expected)  # the trained module ends on the average
    assert not torch.allclose(model.policy.weight, rec.weights[-1])  # ... which is not the last iterate


def test_training_is_unchanged_and_validation_sees_the_average():
    plain, with_ema = LiveRecorder(), LiveRecorder()
    _fit([plain], val_every=4)
    torch.manual_seed(0)
    start = TinyRegression().policy.weight.detach().clone()
    model = _fit([with_ema, PolicyEMA(decay=0.7, warmup=False)], val_every=4)
    # swapping in and out for validation is exact
    for a, b in zip(plain.weights, with_ema.weights, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert len(model.val_seen) == 3  # after steps 4, 8, 12
    for i, seen in enumerate(model.val_seen):
        torch.testing.assert_close(seen, _expected_ema(start, with_ema.weights[: 4 * (i + 1)], 0.7, False))


def test_start_step_holds_the_average_on_the_live_weights_until_then():
    rec = LiveRecorder()
    model = _fit([rec, PolicyEMA(decay=0.5, warmup=False, start_step=8)])
    expected = _expected_ema(rec.weights[7], rec.weights[8:], 0.5, False)
    torch.testing.assert_close(model.policy.weight, expected)


def test_bad_settings_fail_naming_the_field():
    with pytest.raises(ValueError, match="decay"):
        PolicyEMA(decay=1.0)
    with pytest.raises(ValueError, match="update_every"):
        PolicyEMA(update_every=0)
    with pytest.raises(ValueError, match="attributes"):
        _fit([PolicyEMA(attributes=["text_policy"])])


def test_checkpoint_round_trip_keeps_the_average():
    ema = PolicyEMA(decay=0.6)
    ema._average = [torch.ones(2), torch.zeros(3)]
    ema.num_updates = 5
    other = PolicyEMA(decay=0.6)
    other.load_state_dict(ema.state_dict())
    assert other.num_updates == 5 and [t.tolist() for t in other._restored] == [[1.0, 1.0], [0.0, 0.0, 0.0]]
