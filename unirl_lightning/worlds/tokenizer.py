"""An exact patch codebook for the synthetic world (a VQ tokenizer at no training cost).

Shapes have sides that are multiples of the grid and sit on grid-aligned positions, so every
grid-aligned patch of a rendered scene is either background or one grid-aligned piece of a
single shape. Enumerating those pieces gives a finite codebook that round-trips rendered
scenes exactly; `encode` snaps any other patch to the nearest code (L2).
"""

from __future__ import annotations

import torch
from einops import rearrange

from unirl_lightning.worlds.render import WorldConfig
from unirl_lightning.worlds.shapes import shape_mask
from unirl_lightning.worlds.vocab import BACKGROUND, PALETTE, SHAPES


def _enumerate_patches(config: WorldConfig) -> torch.Tensor:
    """Distinct patches rendering can produce, background first: uint8 `[K, 3, p, p]`."""
    p = config.grid
    bg = torch.tensor(BACKGROUND, dtype=torch.uint8).view(3, 1, 1)
    patches = [bg.expand(3, p, p).clone()]
    for color, rgb in PALETTE.items():  # order: colour, shape, size, row offset, column offset
        fg = torch.tensor(rgb, dtype=torch.uint8).view(3, 1, 1)
        for shape in SHAPES:
            for size in config.sizes:
                m = shape_mask(shape, size)
                for oy in range(0, size, p):
                    for ox in range(0, size, p):
                        patches.append(torch.where(m[oy : oy + p, ox : ox + p], fg, bg))
    stacked = torch.stack(patches)
    # Deduplicate keeping first occurrences, so code ids are deterministic.
    seen: dict[bytes, int] = {}
    keep = [seen.setdefault(bytes(t.flatten().tolist()), i) == i for i, t in enumerate(stacked)]
    return stacked[torch.tensor(keep)]


class PatchTokenizer:
    """Maps scenes to grid-patch tokens and back.

    With `config.grid` = p, a `[3, H, W]` canvas becomes (H/p)*(W/p) tokens in raster order
    (64 for the default 32 px canvas and 4 px grid). Token 0 is the background patch.
    """

    def __init__(self, config: WorldConfig | None = None) -> None:
        self.config = config or WorldConfig()
        self.patch = self.config.grid
        self._patches = _enumerate_patches(self.config)  # uint8 [K, 3, p, p]
        self._codes = self._patches.flatten(1).float() / 255.0  # [K, 3*p*p] in [0, 1]
        self._code_sq = self._codes.pow(2).sum(1)  # [K]

    @property
    def codebook_size(self) -> int:
        return self._patches.shape[0]

    @property
    def grid_hw(self) -> tuple[int, int]:
        """Token grid (rows, columns)."""
        n = self.config.canvas // self.patch
        return (n, n)

    @property
    def tokens_per_image(self) -> int:
        h, w = self.grid_hw
        return h * w

    @property
    def background_token(self) -> int:
        return 0

    @property
    def codes(self) -> torch.Tensor:
        """Code patches as float `[K, 3*p*p]` in [0, 1] (channel, row, column order per patch)."""
        return self._codes.clone()

    def _check_images(self, images: torch.Tensor) -> None:
        c = self.config.canvas
        if not isinstance(images, torch.Tensor) or images.dtype != torch.uint8 or images.dim() != 4 \
                or tuple(images.shape[1:]) != (3, c, c):
            got = (images.dtype, tuple(images.shape)) if isinstance(images, torch.Tensor) else type(images)
            raise ValueError(f"images must be uint8 [N, 3, {c}, {c}], got {got}")

    def patchify(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 `[N, 3, H, W]` -> float `[N, L, 3*p*p]` in [0, 1], raster order."""
        self._check_images(images)
        return rearrange(images.float().div_(255.0), "n c (gh p) (gw q) -> n (gh gw) (c p q)", p=self.patch,
                         q=self.patch)

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 `[N, 3, H, W]` -> LongTensor `[N, L]`, each patch's nearest code by L2."""
        x = self.patchify(images)
        codes = self._codes.to(x.device)
        # ||x - c||^2 without the constant ||x||^2 term; exact codes are far apart, so float32 suffices.
        dist = self._code_sq.to(x.device) - 2.0 * x @ codes.T  # [N, L, K]
        return dist.argmin(-1)

    def decode(self, tokens: torch.Tensor) -> torch.Tensor:
        """LongTensor `[N, L]` -> uint8 `[N, 3, H, W]`."""
        L = self.tokens_per_image
        ok = isinstance(tokens, torch.Tensor) and tokens.dim() == 2 and tokens.shape[1] == L
        if not ok or tokens.dtype.is_floating_point or tokens.dtype.is_complex or tokens.dtype == torch.bool:
            got = (tokens.dtype, tuple(tokens.shape)) if isinstance(tokens, torch.Tensor) else type(tokens)
            raise ValueError(f"tokens must be an integer tensor [N, {self.tokens_per_image}], got {got}")
        if tokens.numel() and (int(tokens.min()) < 0 or int(tokens.max()) >= self.codebook_size):
            lo, hi = int(tokens.min()), int(tokens.max())
            raise ValueError(f"token ids must lie in [0, {self.codebook_size}), got values in [{lo}, {hi}]")
        x = self._patches.to(tokens.device)[tokens.long()]  # [N, L, 3, p, p]
        return rearrange(x, "n (gh gw) c p q -> n c (gh p) (gw q)", gh=self.grid_hw[0])
