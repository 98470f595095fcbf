"""The synthetic GenEval world: rendering, an exact patch tokenizer and an exact detector."""

from unirl_lightning.worlds.detector import WorldDetector
from unirl_lightning.worlds.render import WorldConfig, render, render_batch
from unirl_lightning.worlds.shapes import shape_mask
from unirl_lightning.worlds.tokenizer import PatchTokenizer

__all__ = ["WorldConfig", "render", "render_batch", "PatchTokenizer", "WorldDetector", "shape_mask"]
