"""Analytic activation memory: bytes autograd saves for backward, per token and per layer, for the
transformer blocks of the real models, and their sums over a micro-batch with and without
activation checkpointing.

Each block's bytes are linear in its widths. The coefficients are what autograd saves in the block's
ops (read off a one-layer forward under `saved_tensors_hooks`, `benchmarks/memory_plan.md` says how)
and checked at the real widths there. Attention is taken as fused (flash / memory-efficient SDPA:
no `[S, S]` matrix kept), as on GPUs.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Stack:
    """`layers` blocks of `per_token` bytes a token, fed `input_bytes` a token (the residual stream
    checkpointing keeps per layer), plus `extra` bytes a token once (final norm, heads)."""

    layers: int
    per_token: float
    input_bytes: float
    extra: float = 0.0

    def bytes(self, tokens: int, checkpointing: bool) -> float:
        """Saved bytes over `tokens` tokens (rows x sequence). Checkpointing keeps each layer's input
        and recomputes one layer at a time in backward."""
        if checkpointing:
            return tokens * (self.layers * self.input_bytes + self.per_token + self.extra)
        return tokens * (self.layers * self.per_token + self.extra)


def llama_stack(hidden: int, intermediate: int, heads: int, layers: int, mixed: bool) -> Stack:
    """transformers' Llama decoder (RMSNorm, RoPE, SDPA, SwiGLU). `mixed`: fp32 weights under bf16
    autocast, so the residual stream and the norms are fp32; otherwise 16-bit weights throughout."""
    per_h = 34 if mixed else 24  # norms' fp32 inputs/outputs, q/k/v/o inputs, RoPE, attention in/out
    per_token = per_h * hidden + 8 * intermediate + 4 * heads + 8  # SwiGLU: gate, up, act, product
    resid = 4 if mixed else 2
    final_norm = (9 if mixed else 6.5) * hidden + 4
    return Stack(layers, per_token, resid * hidden, final_norm)


def vit_stack(hidden: int, intermediate: int, heads: int, layers: int, mixed: bool) -> Stack:
    """A pre-norm ViT encoder (SigLIP / CLIP: LayerNorm, biased attention, GELU MLP)."""
    per_token = (30 if mixed else 22) * hidden + 4 * intermediate + 4 * heads + 8
    return Stack(layers, per_token, (4 if mixed else 2) * hidden, 4 * hidden)


def mmdit_stack(dim: int, layers: int, dual_layers: int) -> Stack:
    """diffusers' SD3 joint blocks in 16-bit weights (AdaLN-Zero, joint attention with RMS qk-norm,
    GELU-tanh MLP 4x), per token of the joint sequence; dual-attention blocks (SD3.5) add a second
    self-attention on image tokens, taken here over every token (an upper bound: text is ~1/6)."""
    per = 59 * dim
    dual = 29 * dim
    mean = per + dual * dual_layers / max(layers, 1)
    return Stack(layers, mean, 2 * dim * 2, 4 * dim)


def flux_stack(dim: int, double: int, single: int) -> Stack:
    """diffusers' Flux: `double` MMDiT blocks (~60 bytes a token per unit width) and `single` parallel
    blocks (~52), averaged into one per-layer figure."""
    layers = double + single
    return Stack(layers, (60 * dim * double + 52 * dim * single) / layers, 2 * dim * 2, 4 * dim)


def vq_decoder_bytes(base: int, multipliers: list[int], res_blocks: int, grid: int, images: int) -> float:
    """Janus' VQ decoder on relaxed tokens (the end-to-end SFT path; not checkpointed): per resnet
    block about 6 feature maps (GroupNorm, SiLU and conv inputs, twice) in 16 bits, each level's
    blocks at its resolution, from `grid` up to the image."""
    total, side = 0.0, grid
    for mult in reversed(multipliers):
        total += (res_blocks + 1) * 6 * 2 * base * mult * side * side
        side *= 2
    return images * total
