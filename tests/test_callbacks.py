"""GenEvalCallback: scores generated images and writes scalars, a grid and prompts to TensorBoard."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from unirl_lightning.callbacks.geneval_logging import GenEvalCallback
from unirl_lightning.callbacks.image_grid import make_grid
from unirl_lightning.evaluation.judge import score_images
from unirl_lightning.evaluation import Detection

SPECS = [
    {"tag": "single_object", "include": [{"class": "dog", "count": 1}], "prompt": "a photo of a dog"},
    {"tag": "counting", "include": [{"class": "cat", "count": 2}], "prompt": "a photo of two cats"},
    {
        "tag": "colors",
        "include": [{"class": "car", "count": 1, "color": "red"}],
        "prompt": "a photo of a red car",
    },
]


class MarkerDetector:
    """Sees the spec's objects in images whose first pixel is bright, nothing in the others."""

    def __call__(self, images, classes=None):
        out = []
        for img in images:
            bright = int(img[0, 0, 0]) > 128
            out.append(
                [Detection(c, 0.95, (0, 0, 4, 4), "red") for c in ("dog", "car", "cat", "cat")]
                if bright
                else []
            )
        return out


class FixedImages(GenEvalCallback):
    """Two images per spec: the first of each pair bright (correct), the second dark (wrong)."""

    def generate(self, pl_module, specs):
        assert not pl_module.training and not torch.is_grad_enabled()
        images = torch.zeros(2 * len(specs), 3, 8, 8, dtype=torch.uint8)
        images[::2] = 255
        return images

    def understand(self, pl_module, images, specs):
        return torch.ones(len(images), dtype=torch.bool)


class TinyModule(pl.LightningModule):
    def __init__(self):
        super().__init__()
        self.layer = torch.nn.Linear(2, 1)

    def training_step(self, batch, batch_idx):
        return self.layer(batch[0]).pow(2).mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)

    def train_dataloader(self):
        return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randn(8, 2)), batch_size=2)


def test_callback_logs_scalars_and_images(tmp_path):
    callback = FixedImages(SPECS, MarkerDetector(), every_n_steps=1)
    trainer = pl.Trainer(
        max_steps=2,
        logger=TensorBoardLogger(tmp_path, name="tb"),
        callbacks=[callback],
        accelerator="cpu",
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(TinyModule())
    events = EventAccumulator(trainer.logger.log_dir, size_guidance={"images": 0, "scalars": 0, "tensors": 0})
    events.Reload()
    tags = events.Tags()
    for key in (
        "geneval/overall",
        "geneval/single_object",
        "geneval/prompt_correct_rate",
        "geneval/partial",
        "imbalance/overall",
    ):
        assert key in tags["scalars"], tags["scalars"]
    overall = events.Scalars("geneval/overall")
    assert [e.step for e in overall] == [1, 2] and overall[-1].value == pytest.approx(0.5)
    assert events.Scalars("geneval/prompt_correct_rate")[-1].value == 0.0  # every prompt has a wrong image
    assert events.Scalars("imbalance/overall")[-1].value == 0.0
    assert "geneval/samples" in tags["images"]
    assert len(events.Images("geneval/samples")) == 2
    assert any("geneval/prompts" in t for t in tags["tensors"])  # add_text is stored as a tensor summary
    assert [r.correct for r in callback.last_results] == [True, False] * 3
    assert "geneval/overall" in trainer.callback_metrics


def test_generate_must_be_overridden():
    cb = GenEvalCallback(SPECS, MarkerDetector())
    with pytest.raises(NotImplementedError, match="subclass GenEvalCallback"):
        cb.generate(TinyModule(), SPECS)


def test_helpers():
    grid = make_grid(torch.full((5, 3, 4, 6), 7, dtype=torch.uint8), pad=1, upscale=1)
    assert grid.shape == (3, 2 * 5 + 1, 3 * 7 + 1) and grid.dtype == torch.uint8
    assert (grid[:, 1:5, 1:7] == 7).all() and (grid[:, 0] == 255).all()
    big = make_grid(torch.full((2, 3, 4, 4), 7, dtype=torch.uint8), nrow=2, pad=0, upscale=3)
    assert big.shape == (3, 12, 24) and (big == 7).all()
    results = score_images(torch.full((1, 3, 8, 8), 255, dtype=torch.uint8), SPECS[:1], MarkerDetector())
    assert results[0].correct
    with pytest.raises(ValueError, match="one spec per image"):
        score_images(torch.zeros(2, 3, 8, 8, dtype=torch.uint8), SPECS[:1], MarkerDetector())
