import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture
def tiny_config():
    """A very small built-in model for fast tests."""
    from unirl_lightning.models.tiny import TinyConfig

    return TinyConfig(d_model=32, n_layers=2, n_heads=2, mask_steps=4)
