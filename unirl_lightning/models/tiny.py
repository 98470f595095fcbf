"""The built-in unified model: a small decoder-only transformer over words and world image tokens.

Show-o-like: one vocabulary, causal over text, autoregressive or masked (bidirectional,
MaskGIT) over the image block, CFG through condition dropout, a KV cache for autoregressive
decoding. Every sequence has one fixed layout, so positions mean the same thing in both tasks:

    generation:     [GEN] text(left-padded to T) [SOI] image(L)
    understanding:  [UND] text(left-padded to T) [SOI] image(L) [EOI] answer... [EOS]
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from unirl_lightning.models.base import (
    AnswerRollout,
    ImageInput,
    ImageOrder,
    ImageRollout,
    UnifiedPolicy,
)
from unirl_lightning.models.folder import load_weights, read_config, save_folder
from unirl_lightning.models.static_decode import (
    StaticKVCache,
    StaticLayerCache,
    attention_mask,
    check_decode_mode,
    decode_tokens,
    reuse_cache,
    sample_token,
    static_step_of,
)
from unirl_lightning.objectives import guided_logits, gumbel_noise
from unirl_lightning.worlds.render import WorldConfig
from unirl_lightning.worlds.tokenizer import PatchTokenizer
from unirl_lightning.worlds.words import WordTokenizer, world_words

SPECIALS = ("[PAD]", "[GEN]", "[UND]", "[SOI]", "[EOI]", "[MASK]", "[UNK]", "[EOS]")
PAD, GEN, UND, SOI, EOI, MASK, UNK, EOS = range(len(SPECIALS))


@dataclass
class TinyConfig:
    """Size and behaviour of the built-in model. Defaults fit a 2-core CPU (about 1M parameters)."""

    d_model: int = 128
    n_layers: int = 4
    n_heads: int = 4
    mlp_ratio: int = 4
    dropout: float = 0.0
    text_len: int = 12
    max_answer_len: int = 10
    image_order: ImageOrder = "autoregressive"
    mask_steps: int = 8
    canvas: int = 32
    sizes: tuple[int, ...] = (8,)
    #: Placement grid and patch size of the world, in px. 8 = one whole object per patch: 16
    #: tokens an image, so a 2-core CPU learns coherent shapes in minutes (4 -> 64 tokens of quarters).
    grid: int = 8
    #: How image tokens are embedded and scored. "table": one free vector per code (input and
    #: output). "codebook": that vector plus an MLP of the code's pixels (Janus embeds its image
    #: tokens through the VQ codebook the same way), so codes share what they look like: a colour
    #: word learnt on squares transfers to circles, and codes rare in training are still drawn right.
    image_embedding: str = "codebook"
    words: list[str] = field(default_factory=world_words)

    def __post_init__(self) -> None:
        if self.image_embedding not in ("table", "codebook"):
            raise ValueError(f"image_embedding must be 'table' or 'codebook', got {self.image_embedding!r}")
        if self.image_order not in ("autoregressive", "masked"):
            raise ValueError(f"image_order must be 'autoregressive' or 'masked', got {self.image_order!r}")
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model ({self.d_model}) must be divisible by n_heads ({self.n_heads})")
        self.sizes = tuple(self.sizes)


class CachedBlock(nn.Module):
    """Pre-norm transformer block whose attention can extend a KV cache (shared by the built-in
    unified model and the built-in text policy)."""

    def __init__(self, d_model: int, n_heads: int, mlp_ratio: int = 4, dropout: float = 0.0):
        super().__init__()
        self.n_heads = n_heads
        self.ln1 = nn.LayerNorm(d_model)
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.proj = nn.Linear(d_model, d_model)
        self.ln2 = nn.LayerNorm(d_model)
        self.mlp = nn.Sequential(
            nn.Linear(d_model, mlp_ratio * d_model), nn.GELU(), nn.Linear(mlp_ratio * d_model, d_model)
        )
        self.drop = nn.Dropout(dropout)

    def forward(self, x: Tensor, allowed: Tensor, cache: list[Tensor] | StaticLayerCache | None = None,
                positions: Tensor | None = None) -> Tensor:
        """x `[B, S, D]`; allowed bool `[B, 1, S, S_total]`; cache `[k, v]` of past keys, extended in
        place, or a static cache written at `positions` (long `[S]`)."""
        q, k, v = rearrange(
            self.qkv(self.ln1(x)), "b s (three h e) -> three b h s e", three=3, h=self.n_heads
        )
        if isinstance(cache, StaticLayerCache):
            k, v = cache.update(k, v, positions)
        elif cache is not None:
            if cache:
                k, v = torch.cat([cache[0], k], 2), torch.cat([cache[1], v], 2)
            cache[:] = [k, v]
        att = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed)
        x = x + self.drop(self.proj(rearrange(att, "b h s e -> b s (h e)")))
        return x + self.drop(self.mlp(self.ln2(x)))


class TinyUnifiedModel(UnifiedPolicy):
    """The built-in unified model for the synthetic world (see the module docstring for the layout)."""

    def __init__(self, config: TinyConfig | None = None, decode: str = "dynamic",
                 compile_mode: str | None = None, **overrides):
        """`decode` / `compile_mode`: how autoregressive rollouts decode, as `JanusPolicy`'s
        ("dynamic", "static" cache, "compiled" static step); masked order always decodes in full."""
        super().__init__()
        cfg = config or TinyConfig(**overrides)
        self.config = cfg
        self.decode, self.compile_mode = check_decode_mode(decode), compile_mode
        self._static_cache: StaticKVCache | None = None
        self._compiled_step = None
        self.image_order = cfg.image_order
        self.words = WordTokenizer(cfg.words)
        self.image_tokenizer = PatchTokenizer(self.world_config)
        self.word_offset = len(SPECIALS)
        self.image_offset = self.word_offset + len(self.words)
        self.vocab_size = self.image_offset + self.image_tokenizer.codebook_size
        L = self.image_tokenizer.tokens_per_image
        self.soi_pos = 1 + cfg.text_len
        self.max_len = self.soi_pos + 1 + L + 1 + cfg.max_answer_len + 1
        self.tok_emb = nn.Embedding(self.vocab_size, cfg.d_model)
        self.pos_emb = nn.Embedding(self.max_len, cfg.d_model)
        self.blocks = nn.ModuleList(
            CachedBlock(cfg.d_model, cfg.n_heads, cfg.mlp_ratio, cfg.dropout) for _ in range(cfg.n_layers)
        )
        self.ln_f = nn.LayerNorm(cfg.d_model)
        self.head = nn.Linear(cfg.d_model, self.vocab_size, bias=False)
        if cfg.image_embedding == "codebook":
            pixels = self.image_tokenizer.codes - 0.5  # [K, 3*p*p], centred
            self.register_buffer("code_pixels", pixels, persistent=False)
            self.code_in = self._code_mlp(pixels.shape[1], cfg.d_model)
            self.code_out = self._code_mlp(pixels.shape[1], cfg.d_model)
        self.apply(self._init)

    @staticmethod
    def _code_mlp(n_pixels: int, d: int) -> nn.Module:
        return nn.Sequential(nn.Linear(n_pixels, d), nn.GELU(), nn.Linear(d, d))

    @property
    def world_config(self) -> WorldConfig:
        """The synthetic world this model draws (canvas, shape sizes, placement grid)."""
        c = self.config
        return WorldConfig(canvas=c.canvas, sizes=c.sizes, grid=c.grid)

    @staticmethod
    def _init(m: nn.Module) -> None:
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=0.02)
        if isinstance(m, nn.Linear) and m.bias is not None:
            nn.init.zeros_(m.bias)

    def fsdp_units(self) -> list[nn.Module]:
        return list(self.blocks)

    # ---- sizes ------------------------------------------------------------------------
    @property
    def image_vocab_size(self) -> int:
        return self.image_tokenizer.codebook_size

    @property
    def tokens_per_image(self) -> int:
        return self.image_tokenizer.tokens_per_image

    @property
    def device(self) -> torch.device:
        return self.head.weight.device

    @property
    def _image_slice(self) -> slice:
        """Positions of the image block in every sequence."""
        return slice(self.soi_pos + 1, self.soi_pos + 1 + self.tokens_per_image)

    # ---- sequence building ------------------------------------------------------------
    def encode_text(self, texts: Sequence[str | None], task: int) -> Tensor:
        """`[B, 1 + T + 1]`: task token, text left-padded to T (None -> all padding: unconditional), [SOI]."""
        T = self.config.text_len
        rows = []
        for text in texts:
            ids = (
                []
                if text is None
                else [self.word_offset + i for i in self.words.encode(text, unk_id=UNK - self.word_offset)]
            )
            if len(ids) > T:
                raise ValueError(
                    f"text of {len(ids)} words exceeds text_len={T}: {text!r}; raise TinyConfig.text_len"
                )
            rows.append([task] + [PAD] * (T - len(ids)) + ids + [SOI])
        return torch.tensor(rows, dtype=torch.long, device=self.device)

    def encode_answers(self, answers: Sequence[str]) -> tuple[Tensor, Tensor]:
        """Answer ids + [EOS], right-padded: tokens `[B, Ta]`, mask `[B, Ta]`."""
        rows = [
            [self.word_offset + i for i in self.words.encode(a, unk_id=UNK - self.word_offset)] + [EOS]
            for a in answers
        ]
        if max(map(len, rows)) > self.config.max_answer_len + 1:
            raise ValueError(
                f"answer longer than max_answer_len={self.config.max_answer_len} words; "
                "raise it in TinyConfig"
            )
        width = max(map(len, rows))
        tokens = torch.full((len(rows), width), PAD, dtype=torch.long)
        for i, r in enumerate(rows):
            tokens[i, : len(r)] = torch.tensor(r)
        return tokens.to(self.device), (tokens != PAD).to(self.device)

    def decode_answer_ids(self, ids: Tensor) -> str:
        out = []
        for t in ids.tolist():
            if t == EOS:
                break
            if self.word_offset <= t < self.image_offset:
                out.append(t - self.word_offset)
        return self.words.decode(out)

    def _allowed(self, tokens_or_len: Tensor, total: int, past: int = 0) -> Tensor:
        """Attention mask `[B, 1, S, past + S]`: causal, image block bidirectional in masked order, no pad
        keys."""
        ids = tokens_or_len
        b, s = ids.shape[0], ids.shape[1]
        q = torch.arange(past, past + s, device=ids.device)[:, None]
        k = torch.arange(total, device=ids.device)[None, :]
        allowed = k <= q
        if self.image_order == "masked":
            img = self._image_slice
            in_img = lambda p: (p >= img.start) & (p < img.stop)  # noqa: E731
            allowed = allowed | (in_img(q) & in_img(k))
        return allowed[None, None].expand(b, 1, s, total)

    def _forward(
        self,
        tokens: Tensor,
        image_embeds: Tensor | None = None,
        cache: list[list[Tensor]] | None = None,
        past: int = 0,
    ) -> Tensor:
        """Hidden states `[B, S, D]` for `tokens` `[B, S]` starting at position `past`.

        image_embeds `[B, L, D]` replace the image block's embeddings (relaxed tokens). Padding is
        an ordinary token here: the layout is fixed, so attending to it is harmless and keeps the
        KV cache simple.
        """
        b, s = tokens.shape
        x = self._embed_tokens(tokens)
        if image_embeds is not None:
            img = self._image_slice
            x = torch.cat([x[:, : img.start - past], image_embeds.to(x.dtype), x[:, img.stop - past :]], 1)
        x = x + self.pos_emb(torch.arange(past, past + s, device=tokens.device))
        allowed = self._allowed(tokens, past + s, past)
        for i, block in enumerate(self.blocks):
            x = block(x, allowed, None if cache is None else cache[i])
        return self.ln_f(x)

    def _embed_tokens(self, tokens: Tensor) -> Tensor:
        """Token embeddings `[B, S, D]` (image codes with their pixels' MLP), without positions."""
        x = self.tok_emb(tokens)
        if self.config.image_embedding == "codebook":
            code = tokens - self.image_offset
            is_img = (code >= 0).unsqueeze(-1)
            # F.embedding, not table[code]: indexing's backward accumulates with atomic adds across CPU
            # threads (run-to-run differences); the embedding backward sums in a fixed order.
            x = x + torch.where(is_img, F.embedding(code.clamp(min=0), self.code_in(self.code_pixels)), 0.0)
        return x

    def _logits(self, h: Tensor, span: slice) -> Tensor:
        """Logits restricted to a vocabulary range (image codes or answer words + [EOS])."""
        if span == self._img_vocab:
            return F.linear(h, self.image_output_embeddings())
        return F.linear(h, self.head.weight[span])

    def image_input_embeddings(self) -> Tensor:
        """`[K, D]`: what each image code feeds the transformer."""
        table = self.tok_emb.weight[self._img_vocab]
        return table + self.code_in(self.code_pixels) if self.config.image_embedding == "codebook" else table

    def image_output_embeddings(self) -> Tensor:
        """`[K, D]`: the output vectors that score each image code."""
        table = self.head.weight[self._img_vocab]
        return table + self.code_out(self.code_pixels) if self.config.image_embedding == "codebook" else table

    @property
    def _img_vocab(self) -> slice:
        return slice(self.image_offset, self.vocab_size)

    @property
    def _ans_vocab(self) -> slice:
        return slice(EOS, self.image_offset)

    # ---- generation -------------------------------------------------------------------

    def _prefix(self, prompts: Sequence[str], cfg_scale: float) -> Tensor:
        cond = self.encode_text(prompts, GEN)
        if cfg_scale == 1.0:
            return cond
        return torch.cat([cond, self.encode_text([None] * len(prompts), GEN)])

    @torch.no_grad()
    def generate_images(
        self, prompts, *, cfg_scale=1.0, temperature=1.0, generator=None, return_gumbel=False
    ) -> ImageRollout:
        prompts = list(prompts)
        if self.image_order == "masked":
            return self._generate_masked(prompts, cfg_scale, temperature, generator, return_gumbel)
        B, L = len(prompts), self.tokens_per_image
        prefix = self._prefix(prompts, cfg_scale)
        if self.decode == "dynamic":
            cache: list[list[Tensor]] = [[] for _ in self.blocks]
            h = self._forward(prefix, cache=cache)[:, -1]

            def step(tok: Tensor, position: Tensor, noise: Tensor) -> tuple[Tensor, Tensor]:
                ids = (tok + self.image_offset)[:, None].repeat(prefix.shape[0] // B, 1)
                h = self._forward(ids, cache=cache, past=int(position))[:, -1]
                return sample_token(self._image_logits(h, cfg_scale, temperature), noise, temperature)
        else:
            h = self._static_prefill(prefix)
            self._decode_args = (float(cfg_scale), float(temperature))
            step = static_step_of(self)
        first = self._image_logits(h, cfg_scale, temperature)
        tokens, logps, gumbel = decode_tokens(first, step, L, prefix.shape[1], temperature, generator,
                                              return_gumbel)
        return ImageRollout(
            prompts=prompts,
            tokens=tokens,
            logprobs=logps,
            action_mask=torch.ones_like(tokens, dtype=torch.bool),
            cfg_scale=cfg_scale,
            temperature=temperature,
            gumbel=gumbel,
        )

    def _image_logits(self, h: Tensor, cfg_scale: float, temperature: float) -> Tensor:
        """Last hidden states `[R, D]` -> guided image-code logits `[B, K]`."""
        return guided_logits(self._logits(h, self._img_vocab), cfg_scale, temperature)

    def _static_prefill(self, prefix: Tensor) -> Tensor:
        """Write the prompt rows `[R, S]` into a static cache sized for the image -> last state `[R, D]`."""
        R, S = prefix.shape
        d = self.config.d_model
        self._static_cache = reuse_cache(
            self._static_cache, len(self.blocks), R, self.config.n_heads, S + self.tokens_per_image,
            d // self.config.n_heads, self.tok_emb.weight.dtype, self.device)
        positions = torch.arange(S, device=self.device)
        return self._static_blocks(self._embed_tokens(prefix), positions)[:, -1]

    def _static_blocks(self, x: Tensor, positions: Tensor) -> Tensor:
        """Blocks over embeddings `[R, S, D]` at `positions` (long `[S]`) through the static cache."""
        cache = self._static_cache
        x = x + self.pos_emb(positions)
        keys_ok = torch.ones(x.shape[0], cache.keys[0].shape[2], dtype=torch.bool, device=x.device)
        allowed = attention_mask(keys_ok, positions)  # causal: padding is an ordinary token here
        for i, block in enumerate(self.blocks):
            x = block(x, allowed, cache.layer(i), positions)
        return self.ln_f(x)

    def _static_step(self, tok: Tensor, position: Tensor, noise: Tensor) -> tuple[Tensor, Tensor]:
        """Feed image code `tok` `[B]` at `position` (0-dim long) -> next code `[B]`, its log-prob `[B]`;
        fixed shapes, so `torch.compile` captures it whole."""
        R, B = self._static_cache.keys[0].shape[0], tok.shape[0]
        cfg_scale, temperature = self._decode_args
        ids = (tok + self.image_offset)[:, None].repeat(R // B, 1)
        h = self._static_blocks(self._embed_tokens(ids), position.view(1))[:, -1]
        return sample_token(self._image_logits(h, cfg_scale, temperature), noise, temperature)

    def mask_schedule(self) -> list[int]:
        """Tokens still masked after each step (cosine schedule, MaskGIT), ending at 0."""
        L, T = self.tokens_per_image, self.config.mask_steps
        return [int(math.floor(L * math.cos(math.pi / 2 * (t + 1) / T))) for t in range(T)]

    def _masked_state(self, prompts_prefix: Tensor, tokens: Tensor, known: Tensor) -> Tensor:
        """Full generation sequence with unknown image positions set to [MASK]."""
        img = torch.where(known, tokens + self.image_offset, torch.full_like(tokens, MASK))
        return torch.cat([prompts_prefix, img], 1)

    def _generate_masked(self, prompts, cfg_scale, temperature, generator, return_gumbel) -> ImageRollout:
        B, L = len(prompts), self.tokens_per_image
        prefix = self._prefix(prompts, cfg_scale)
        reps = prefix.shape[0] // B
        tokens = torch.zeros(B, L, dtype=torch.long, device=self.device)
        known = torch.zeros(B, L, dtype=torch.bool, device=self.device)
        reveal = torch.zeros(B, L, dtype=torch.long, device=self.device)
        step_logps = torch.zeros(B, self.config.mask_steps, device=self.device)
        noise_all = torch.zeros(B, L, self.image_vocab_size, device=self.device) if return_gumbel else None
        for t, n_left in enumerate(self.mask_schedule()):
            seq = self._masked_state(prefix, tokens.repeat(reps, 1), known.repeat(reps, 1))
            logits = guided_logits(
                self._logits(self._forward(seq)[:, self._image_slice], self._img_vocab),
                cfg_scale,
                temperature,
            )
            g = gumbel_noise(logits.shape, generator, logits.device)
            sample = (logits + g).argmax(-1)
            logp = torch.log_softmax(logits, -1).gather(-1, sample[..., None]).squeeze(-1)
            # reveal the most confident masked positions (known ones never re-masked)
            n_reveal = int((~known[0]).sum()) - n_left
            conf = logp.masked_fill(known, float("inf"))
            idx = conf.topk(int(known[0].sum()) + n_reveal, dim=-1).indices
            new = torch.zeros_like(known).scatter_(1, idx, True) & ~known
            tokens = torch.where(new, sample, tokens)
            reveal = torch.where(new, torch.full_like(reveal, t), reveal)
            step_logps[:, t] = (logp * new).sum(-1)
            if return_gumbel:
                noise_all = torch.where(new[..., None], g, noise_all)
            known = known | new
        return ImageRollout(
            prompts=list(prompts),
            tokens=tokens,
            logprobs=step_logps,
            action_mask=torch.ones_like(step_logps, dtype=torch.bool),
            cfg_scale=cfg_scale,
            temperature=temperature,
            reveal_step=reveal,
            gumbel=noise_all,
        )

    def image_logits(self, rollout: ImageRollout) -> Tensor:
        B, L = rollout.tokens.shape
        prefix = self._prefix(rollout.prompts, rollout.cfg_scale)
        reps = prefix.shape[0] // B
        if self.image_order == "autoregressive":
            seq = torch.cat([prefix, rollout.tokens[:, :-1].repeat(reps, 1) + self.image_offset], 1)
            h = self._forward(seq)[
                :, self.soi_pos :
            ]  # outputs at [SOI] .. image[L-2] predict image[0 .. L-1]
            return guided_logits(self._logits(h, self._img_vocab), rollout.cfg_scale, rollout.temperature)
        # masked: one sequence per step, holding that step's partially revealed state; only the steps
        # some row trains (`action_mask`) are scored, the others' tokens get zero logits
        T = self.config.mask_steps
        steps = rollout.action_mask.to(self.device).any(0).nonzero().squeeze(-1)  # [k]
        k = len(steps)
        known = rollout.reveal_step[None] < steps[:, None, None]  # [k, B, L]
        tokens = rollout.tokens[None].expand(k, B, L)
        pre = prefix.view(reps, 1, B, -1).expand(reps, k, B, -1).reshape(reps * k * B, -1)
        seq = self._masked_state(
            pre, tokens.repeat(reps, 1, 1).reshape(-1, L), known.repeat(reps, 1, 1).reshape(-1, L)
        )
        logits = self._logits(self._forward(seq)[:, self._image_slice], self._img_vocab)  # [reps*k*B, L, K]
        logits = guided_logits(logits, rollout.cfg_scale, rollout.temperature).view(k, B, L, -1)
        # each token's row comes from the step that revealed it
        slot = torch.full((T,), -1, dtype=torch.long, device=self.device)
        slot[steps] = torch.arange(k, device=self.device)
        index = slot[rollout.reveal_step]  # [B, L]: the token's step among the scored ones, -1 if none
        pick = index.clamp(min=0)[None, :, :, None].expand(1, B, L, logits.shape[-1])
        return torch.where((index >= 0)[..., None], logits.gather(0, pick).squeeze(0), 0.0)

    def decode_images(self, tokens: Tensor) -> Tensor:
        return self.image_tokenizer.decode(tokens)

    def encode_images(self, images: Tensor) -> Tensor:
        """uint8 pixels `[B, 3, H, W]` -> image tokens `[B, L]` (the world's exact patch codebook)."""
        return self.image_tokenizer.encode(images).to(self.device)

    # ---- understanding ----------------------------------------------------------------
    def _understanding_prefix(
        self, images: ImageInput, questions: Sequence[str]
    ) -> tuple[Tensor, Tensor | None]:
        """Tokens `[B, 1 + T + 1 + L + 1]` ending in [EOI], plus relaxed image embeddings `[B, L, D]` or
        None."""
        head = self.encode_text(questions, UND)
        if images.dtype == torch.long:
            return torch.cat([head, images + self.image_offset, torch.full_like(head[:, :1], EOI)], 1), None
        if images.shape[-1] != self.image_vocab_size:
            raise ValueError(
                f"relaxed images must be [B, L, {self.image_vocab_size}], got {tuple(images.shape)}"
            )
        embeds = images.to(self.tok_emb.weight.dtype) @ self.image_input_embeddings()
        placeholder = images.argmax(-1) + self.image_offset
        return torch.cat([head, placeholder, torch.full_like(head[:, :1], EOI)], 1), embeds

    @torch.no_grad()
    def answer(
        self, images, questions, *, greedy=True, temperature=1.0, max_new_tokens=None, generator=None
    ) -> AnswerRollout:
        max_new = min(max_new_tokens or self.config.max_answer_len + 1, self.config.max_answer_len + 1)
        prefix, embeds = self._understanding_prefix(images, questions)
        B = prefix.shape[0]
        cache: list[list[Tensor]] = [[] for _ in self.blocks]
        h = self._forward(prefix, image_embeds=embeds, cache=cache)[:, -1]
        toks, logps = [], []
        done = torch.zeros(B, dtype=torch.bool, device=self.device)
        mask = []
        for t in range(max_new):
            logits = self._logits(h, self._ans_vocab).float() / (1.0 if greedy else temperature)
            logp_all = torch.log_softmax(logits, -1)
            pick = (
                logits.argmax(-1)
                if greedy
                else (logits + gumbel_noise(logits.shape, generator, logits.device)).argmax(-1)
            )
            tok = pick + EOS
            mask.append(~done)
            toks.append(torch.where(done, torch.full_like(tok, PAD), tok))
            logps.append(logp_all.gather(-1, pick[:, None]).squeeze(-1) * (~done))
            done = done | (tok == EOS)
            # Under FSDP every rank must run the same forwards (each gathers the shards), so a
            # rank whose answers all ended keeps decoding padding until the others are done too.
            if t + 1 == max_new or (bool(done.all()) and not getattr(self, "_fsdp_sharded", False)):
                break
            h = self._forward(toks[-1][:, None], cache=cache, past=prefix.shape[1] + t)[:, -1]
        tokens = torch.stack(toks, 1)
        return AnswerRollout(
            texts=[self.decode_answer_ids(r) for r in tokens],
            tokens=tokens,
            logprobs=torch.stack(logps, 1),
            mask=torch.stack(mask, 1),
        )

    def answer_logprobs(self, images, questions, answers) -> tuple[Tensor, Tensor]:
        if isinstance(answers, AnswerRollout):
            tokens, mask = answers.tokens, answers.mask
        else:
            tokens, mask = self.encode_answers(answers)
        prefix, embeds = self._understanding_prefix(images, questions)
        seq = torch.cat([prefix, tokens[:, :-1]], 1)
        h = self._forward(seq, image_embeds=embeds)[:, prefix.shape[1] - 1 :]
        logp = torch.log_softmax(self._logits(h, self._ans_vocab).float(), -1)
        logp = logp.gather(-1, (tokens - EOS).clamp(min=0)[..., None]).squeeze(-1)
        return logp * mask, mask

    # ---- pretraining losses (warm start) -------------------------------------------------
    def generation_loss(
        self, prompts: Sequence[str | None], image_tokens: Tensor, generator: torch.Generator | None = None
    ) -> Tensor:
        """Cross-entropy of image tokens given prompts (None = unconditional, for CFG dropout).

        Autoregressive: next-token. Masked: MaskGIT, a random cosine-schedule ratio of positions masked.
        """
        prefix = self.encode_text(prompts, GEN)
        B, L = image_tokens.shape
        if self.image_order == "autoregressive":
            h = self._forward(torch.cat([prefix, image_tokens[:, :-1] + self.image_offset], 1))[
                :, self.soi_pos :
            ]
            return F.cross_entropy(
                self._logits(h, self._img_vocab).flatten(0, 1).float(), image_tokens.flatten()
            )
        r = torch.rand(B, 1, generator=generator, device=self.device)
        n_mask = torch.clamp((L * torch.cos(math.pi / 2 * r)).ceil(), min=1)
        rank = torch.rand(B, L, generator=generator, device=self.device).argsort(-1).argsort(-1)
        masked = rank < n_mask
        h = self._forward(self._masked_state(prefix, image_tokens, ~masked))[:, self._image_slice]
        logits = self._logits(h, self._img_vocab).float()
        return F.cross_entropy(logits[masked], image_tokens[masked])

    def understanding_loss(
        self, image_tokens: Tensor, questions: Sequence[str], answers: Sequence[str]
    ) -> Tensor:
        """Mean answer-token NLL."""
        logp, mask = self.answer_logprobs(image_tokens, questions, answers)
        return -(logp.sum() / mask.sum())

    # ---- persistence ------------------------------------------------------------------
    def save_pretrained(self, path: str | Path, state_dict: dict[str, Tensor] | None = None) -> None:
        save_folder(path, self.config, state_dict if state_dict is not None else self.state_dict())

    @classmethod
    def from_pretrained(cls, path: str | Path, **overrides) -> "TinyUnifiedModel":
        saved = read_config(path, cls.__name__)
        saved.setdefault("image_embedding", "table")  # folders saved before the option existed
        return load_weights(cls(TinyConfig(**{**saved, **overrides})), path)
