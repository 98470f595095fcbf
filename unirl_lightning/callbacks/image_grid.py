"""Image grids for TensorBoard: images in a grid, prompts (and verdicts) as captions."""

from __future__ import annotations

import math
from typing import Sequence

import torch


def make_grid(images: torch.Tensor, nrow: int | None = None, pad: int = 2, upscale: int = 4) -> torch.Tensor:
    """uint8 `[N, 3, H, W]` -> uint8 `[3, rows*(H*upscale+pad)+pad, cols*(W*upscale+pad)+pad]`, white gaps.

    Small world images are upscaled (nearest) so they are legible in TensorBoard.
    """
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"images must be [N, 3, H, W], got {tuple(images.shape)}")
    n = images.shape[0]
    imgs = images.repeat_interleave(upscale, -1).repeat_interleave(upscale, -2) if upscale > 1 else images
    h, w = imgs.shape[-2:]
    cols = nrow or max(1, math.ceil(math.sqrt(n)))
    rows = max(1, math.ceil(n / cols))
    grid = torch.full((3, rows * (h + pad) + pad, cols * (w + pad) + pad), 255, dtype=torch.uint8)
    for i in range(n):
        r, c = divmod(i, cols)
        grid[
            :, pad + r * (h + pad) : pad + r * (h + pad) + h, pad + c * (w + pad) : pad + c * (w + pad) + w
        ] = imgs[i]
    return grid


def log_image_grid(
    logger,
    tag: str,
    images: torch.Tensor,
    prompts: Sequence[str],
    step: int,
    correct: torch.Tensor | None = None,
) -> None:
    """Write a grid and its captions (row-major prompts, with the judge's verdict) to TensorBoard.

    No-op for loggers without a TensorBoard `SummaryWriter` (`experiment.add_image`).
    """
    writer = getattr(logger, "experiment", None)
    if writer is None or not hasattr(writer, "add_image") or len(images) == 0:
        return
    writer.add_image(tag, make_grid(images.cpu()), global_step=step)
    marks = [""] * len(prompts) if correct is None else ["✓ " if bool(c) else "✗ " for c in correct]
    caption = "\n".join(f"{i}. {m}{p}  " for i, (m, p) in enumerate(zip(marks, prompts)))
    writer.add_text(f"{tag}/prompts", caption, global_step=step)
