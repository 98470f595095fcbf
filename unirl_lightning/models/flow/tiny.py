"""The built-in flow model for the synthetic world.

A tiny SD3 transformer over a 4x4 grid of latent *cells*, each 8x8 px cell holding a whole object
(one of 4 shapes x 10 colours) or background, with a learned word-level text encoder. Its world is
rendered on an 8-px placement grid (``WorldConfig(grid=8)``) so every object fills exactly one
cell: pixel latents and 4x4-patch latents (objects split across latents) do not learn in CPU
minutes (DESIGN.md section 4).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import Tensor, nn

from unirl_lightning.models.flow.base import Prompt, TextCondition
from unirl_lightning.models.flow.sd3 import SD3FlowPolicy
from unirl_lightning.models.folder import load_weights, read_config, save_folder
from unirl_lightning.models.lora import merge_lora
from unirl_lightning.worlds.render import WorldConfig
from unirl_lightning.worlds.shapes import shape_mask
from unirl_lightning.worlds.tokenizer import PatchTokenizer
from unirl_lightning.worlds.vocab import BACKGROUND, COLORS, PALETTE, SHAPES
from unirl_lightning.worlds.words import WordTokenizer, world_words


@dataclass
class TinyFlowConfig:
    """The built-in flow model: SD3 transformer size, text encoder, latent cells, schedule shift.

    The latent is a `(1 + 4 + 10, canvas/cell, canvas/cell)` grid: per cell an object flag, the
    shape one-hot and the colour one-hot, as +-`latent_scale` (background: all minus).
    """

    num_layers: int = 4
    num_heads: int = 4
    head_dim: int = 32
    text_dim: int = 64
    text_len: int = 12
    #: init std of the text encoder's position embeddings; 1.0 matches the word embeddings' N(0, 1),
    #: so word order (which colour / relation goes with which shape) is visible after the LayerNorm.
    #: At 0.02 the encoder is a bag of words and bindings are guessed (benchmarks/flow_grpo.md,
    #: "The flow model's text encoder and image positions").
    text_position_std: float = 1.0
    #: transformer layers in the text encoder (contextual token states and an order-aware pooled
    #: vector); 0 = embeddings only, the pooled vector a bag of words
    text_layers: int = 1
    #: spread of the image cells' 2-D sincos positions (SD3's table at positions 0, k, 2k, ...):
    #: at 1 (SD3's own, made for 64+ patches) two neighbouring cells of the 4x4 grid differ by 1.5
    #: of norm 8, too faint for the relations between cells (position, counting without touching)
    image_position_spread: float = 4.0
    #: the image position table is a parameter (starts at the sincos table) rather than a buffer
    image_position_learned: bool = True
    shift: float = 1.0
    canvas: int = 32
    cell: int = 8
    latent_scale: float = 1.0
    words: list[str] = field(default_factory=world_words)

    def __post_init__(self) -> None:
        if self.canvas % self.cell:
            raise ValueError(f"canvas ({self.canvas}) must be a multiple of cell ({self.cell})")

    @property
    def world(self) -> WorldConfig:
        """The world this model draws: one `cell`-px object per cell, a free cell between objects."""
        return WorldConfig(canvas=self.canvas, sizes=(self.cell,), grid=self.cell, gap=1)

    @property
    def sizes(self) -> tuple[int, ...]:
        return (self.cell,)


#: How a folder whose config lacks a `TinyFlowConfig` field loads (that field's value for it, which
#: is not the field's default): no text layers, SD3's own fixed image positions.
FOLDER_DEFAULTS_BEFORE_FIELDS: dict[str, Any] = {
    "text_layers": 0, "image_position_spread": 1.0, "image_position_learned": False}


class WordTextEncoder(nn.Module):
    """Learned word + position embeddings over a closed vocabulary -> `TextCondition`.

    Prompts are right-padded / truncated to `text_len` words; the unconditional prompt is a
    learned [NULL] sequence. Token states: LayerNorm of word + position embeddings after `layers`
    transformer layers (padding masked); pooled = MLP(masked mean of those states), or of the
    word embeddings alone when `layers` is 0 (then a bag of words: it cannot bind a colour to
    a shape, and the MMDiT's joint attention learns no binding from the token states either;
    benchmarks/flow_grpo.md).
    """

    PAD, NULL, UNK = 0, 1, 2

    def __init__(
        self, words: Sequence[str], dim: int, text_len: int, position_std: float = 1.0, layers: int = 0
    ):
        super().__init__()
        self.tokenizer = WordTokenizer(words)
        self.text_len = text_len
        self.embed = nn.Embedding(len(self.tokenizer) + 3, dim)  # N(0, 1) rows
        # Joint attention has no text positions of its own: these are the only word-order signal.
        self.pos = nn.Parameter(torch.randn(text_len, dim) * position_std)
        self.layers = nn.ModuleList(
            nn.TransformerEncoderLayer(
                dim, max(dim // 32, 1), 4 * dim, dropout=0.0, batch_first=True, norm_first=True
            )
            for _ in range(layers)
        )
        self.norm = nn.LayerNorm(dim)
        self.pool = nn.Sequential(nn.Linear(dim, dim), nn.SiLU(), nn.Linear(dim, dim))

    def ids(self, prompts: Sequence[Prompt]) -> Tensor:
        """long `[B, text_len]`."""
        rows = []
        for p in prompts:
            # word ids shift by 3 past the specials; unknown words (-1) land on UNK (2)
            ids = (
                [self.NULL] * self.text_len
                if p is None
                else [i + 3 for i in self.tokenizer.encode(p, unk_id=-1)]
            )
            ids = ids[: self.text_len]
            rows.append(ids + [self.PAD] * (self.text_len - len(ids)))
        return torch.tensor(rows, dtype=torch.long, device=self.pos.device)

    def forward(self, prompts: Sequence[Prompt]) -> TextCondition:
        ids = self.ids(prompts)
        tok = self.embed(ids)
        real = (ids != self.PAD).unsqueeze(-1).to(tok.dtype)
        h = tok + self.pos
        # An empty prompt (a text policy may write one) keeps its first slot unmasked: a row with
        # every key masked is NaN on PyTorch's fused inference path (eval, no grad), e.g. in the
        # frozen reference, and that NaN reached the velocity penalty and every weight.
        pad = ids == self.PAD
        pad[:, 0] &= ~pad.all(1)
        for layer in self.layers:
            h = layer(h, src_key_padding_mask=pad)
        h = self.norm(h)
        # without layers the pooled vector is the bag of word embeddings
        source = h if len(self.layers) else tok
        return TextCondition(h, self.pool((source * real).sum(1) / real.sum(1).clamp(min=1)))


class CellCodec(nn.Module):
    """Scenes <-> cell latents. Encoding is exact for scenes rendered on the cell grid; decoding
    snaps each cell's vector to the nearest code (L2) and paints that cell's rendered patch."""

    def __init__(self, cfg: TinyFlowConfig):
        super().__init__()
        self.tokenizer = PatchTokenizer(cfg.world)  # codes: background + one per (colour, shape)
        self.side = cfg.canvas // cfg.cell
        patches = self.tokenizer._patches  # uint8 [K, 3, cell, cell]
        table = -torch.ones(len(patches), 1 + len(SHAPES) + len(COLORS))
        bg = torch.tensor(BACKGROUND, dtype=torch.uint8).view(3, 1, 1)
        for ci, color in enumerate(COLORS):
            fg = torch.tensor(PALETTE[color], dtype=torch.uint8).view(3, 1, 1)
            for si, shape in enumerate(SHAPES):
                patch = torch.where(shape_mask(shape, cfg.cell), fg, bg)
                k = int((patches == patch).flatten(1).all(1).nonzero()[0])
                table[k, 0] = table[k, 1 + si] = table[k, 1 + len(SHAPES) + ci] = 1.0
        self.register_buffer("codes", table * cfg.latent_scale, persistent=False)  # [K, C]

    @property
    def channels(self) -> int:
        return self.codes.shape[1]

    def tokens_to_latents(self, tokens: Tensor) -> Tensor:
        """long `[B, L]` -> `[B, C, side, side]`."""
        lat = self.codes[tokens.to(self.codes.device)]  # [B, L, C]
        return lat.transpose(1, 2).reshape(tokens.shape[0], self.channels, self.side, self.side)

    def code_distances(self, latents: Tensor) -> Tensor:
        """`[B, C, side, side]` -> `[B, L, K]` L2 distance of each cell's vector to each code."""
        flat = latents.float().flatten(2).transpose(1, 2)  # [B, L, C]
        return torch.cdist(flat, self.codes.unsqueeze(0).expand(flat.shape[0], -1, -1))

    def latents_to_tokens(self, latents: Tensor) -> Tensor:
        """`[B, C, side, side]` -> nearest code ids long `[B, L]`."""
        return self.code_distances(latents).argmin(-1)

    def encode(self, images: Tensor) -> Tensor:
        return self.tokens_to_latents(self.tokenizer.encode(images.cpu()))

    def decode(self, latents: Tensor) -> Tensor:
        return self.tokenizer.decode(self.latents_to_tokens(latents).cpu())

    def snap_distance(self, latents: Tensor) -> Tensor:
        """`[B, C, side, side]` -> `[B]` mean L2 distance of each cell to its nearest code, in units of
        the distance between two codes that differ in one attribute (so 0.5 = half way to a wrong cell)."""
        return self.code_distances(latents).amin(-1).mean(-1) / (2 * self.codes.abs().max() * 2**0.5)


class TinyFlowModel(SD3FlowPolicy):
    """The built-in flow policy: a tiny `SD3Transformer2DModel` (patch 1) over cell latents.

    About 2M parameters at the defaults; one step of batch 64 takes tens of milliseconds.
    """

    def __init__(self, config: TinyFlowConfig | None = None, **overrides):
        cfg = config or TinyFlowConfig(**overrides)
        super().__init__(shift=cfg.shift)
        from diffusers import SD3Transformer2DModel

        self.config = cfg
        self.codec = CellCodec(cfg)
        self.text_encoder = WordTextEncoder(
            cfg.words, cfg.text_dim, cfg.text_len, cfg.text_position_std, cfg.text_layers
        )
        side, inner = cfg.canvas // cfg.cell, cfg.num_heads * cfg.head_dim
        self.transformer = SD3Transformer2DModel(
            sample_size=side,
            patch_size=1,
            in_channels=self.codec.channels,
            out_channels=self.codec.channels,
            num_layers=cfg.num_layers,
            attention_head_dim=cfg.head_dim,
            num_attention_heads=cfg.num_heads,
            joint_attention_dim=cfg.text_dim,
            caption_projection_dim=inner,
            pooled_projection_dim=cfg.text_dim,
            pos_embed_max_size=side,
        )
        self._set_image_positions(cfg, inner, side)

    def _set_image_positions(self, cfg: TinyFlowConfig, inner: int, side: int) -> None:
        """Replace the PatchEmbed's sincos buffer by the spread (and optionally learned) table; the
        state-dict key stays `transformer.pos_embed.pos_embed`, so folders load either way."""
        from diffusers.models.embeddings import get_2d_sincos_pos_embed

        patch = self.transformer.pos_embed
        table = (
            get_2d_sincos_pos_embed(
                inner,
                side,
                base_size=side,
                interpolation_scale=1.0 / cfg.image_position_spread,
                output_type="pt",
            )
            .float()
            .unsqueeze(0)
        )  # [1, side*side, inner]
        del patch.pos_embed
        if cfg.image_position_learned:
            patch.pos_embed = nn.Parameter(table)
        else:
            patch.register_buffer("pos_embed", table)

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        side = self.config.canvas // self.config.cell
        return (self.codec.channels, side, side)

    @property
    def world(self) -> WorldConfig:
        return self.config.world

    def encode_text(self, prompts: Sequence[Prompt]) -> TextCondition:
        return self.text_encoder(prompts)

    def encode_images(self, images: Tensor) -> Tensor:
        return self.codec.encode(images).to(self.device)

    def decode(self, latents: Tensor) -> Tensor:
        return self.codec.decode(latents)

    def off_manifold(self, latents: Tensor) -> Tensor:
        """Mean distance of the latent cells to the nearest code (`CellCodec.snap_distance`)."""
        return self.codec.snap_distance(latents)

    @property
    def text_trainable(self) -> bool:
        return any(p.requires_grad for p in self.text_encoder.parameters())

    def save_pretrained(self, path: str | Path, state_dict: dict[str, Tensor] | None = None) -> None:
        """config.json + model.safetensors; LoRA adapters are merged into plain weights."""
        state_dict = state_dict if state_dict is not None else self.state_dict()
        save_folder(path, self.config, merge_lora(state_dict, self.lora_scaling or 1.0))

    @classmethod
    def from_pretrained(cls, path: str | Path, **overrides) -> "TinyFlowModel":
        saved = {**FOLDER_DEFAULTS_BEFORE_FIELDS, **read_config(path, cls.__name__), **overrides}
        return load_weights(cls(TinyFlowConfig(**saved)), path)
