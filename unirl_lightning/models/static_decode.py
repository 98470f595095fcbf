"""Static-shape token decoding: a preallocated KV cache and a sampling loop whose per-token step
`torch.compile` can capture whole (one graph per rollout shape; CUDA graphs with
`mode="reduce-overhead"` on GPU).

Why: a dynamic cache grows by concatenation and every step rebuilds masks and position ids in
Python, so small or GPU-bound decoders spend their time in overhead, not in matmuls. Here every
tensor a step touches has the same shape and address at every step; the position is a tensor, so
one compiled graph serves all steps.

Each decoder supplies two things: a prefill (eager, once per rollout) that writes the prompt into
the cache and returns the logits of the first image token, and a step `(token, position, noise) ->
(token, log-prob)` that feeds the previous token at `position`, reads the guided logits and samples
with the given Gumbel noise. The noise is drawn outside the step from the caller's generator, so the
static path draws the same stream as the dynamic one.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from unirl_lightning.objectives.gumbel import gumbel_noise

#: how a policy decodes image tokens: growing cache (eager), static cache (eager), static cache compiled
DECODE_MODES: tuple[str, ...] = ("dynamic", "static", "compiled")


def check_decode_mode(mode: str) -> str:
    if mode not in DECODE_MODES:
        raise ValueError(f"decode={mode!r}: choose one of {', '.join(DECODE_MODES)}")
    return mode


class StaticKVCache:
    """Keys and values of every layer in preallocated `[R, H, T, E]` buffers.

    `update(key, value, layer_idx, cache_position=...)` writes the new `[R, H, S, E]` states at
    `cache_position` (long `[S]`) and returns the whole buffers: the caller masks positions not yet
    written. The signature is transformers' `Cache.update`, so transformers' attention layers write
    into it; `layer(i)` gives a per-layer view for blocks that take their cache directly.
    """

    def __init__(self, layers: int, rows: int, heads: int, length: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device | str):
        shape = (rows, heads, length, head_dim)
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(layers)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(layers)]
        for t in (*self.keys, *self.values):
            # fixed addresses: CUDA graphs replay in place instead of copying or re-recording
            torch._dynamo.mark_static_address(t)

    @property
    def signature(self) -> tuple:
        k = self.keys[0]
        return (len(self.keys), *k.shape, k.dtype, k.device)

    def update(self, key: Tensor, value: Tensor, layer_idx: int, *args, cache_position: Tensor | None = None,
               **kwargs) -> tuple[Tensor, Tensor]:
        if cache_position is None:  # transformers passes its layer kwargs as `kwargs=...`
            cache_position = kwargs.get("kwargs", {}).get("cache_position")
        if cache_position is None:
            raise ValueError("StaticKVCache.update needs cache_position (long [S])")
        self.keys[layer_idx].index_copy_(2, cache_position, key.to(self.keys[layer_idx].dtype))
        self.values[layer_idx].index_copy_(2, cache_position, value.to(self.values[layer_idx].dtype))
        return self.keys[layer_idx], self.values[layer_idx]

    def layer(self, index: int) -> "StaticLayerCache":
        return StaticLayerCache(self, index)


class StaticLayerCache:
    """One layer of a `StaticKVCache`: `update(key, value, positions)`."""

    def __init__(self, cache: StaticKVCache, index: int):
        self.cache, self.index = cache, index

    def update(self, key: Tensor, value: Tensor, positions: Tensor) -> tuple[Tensor, Tensor]:
        return self.cache.update(key, value, self.index, cache_position=positions)


def reuse_cache(old: StaticKVCache | None, layers: int, rows: int, heads: int, length: int, head_dim: int,
                dtype: torch.dtype, device: torch.device | str) -> StaticKVCache:
    """`old` when it has the requested layout (CUDA graphs keep its addresses), else a new cache."""
    want = (layers, rows, heads, length, head_dim, dtype, torch.device(device))
    if old is not None and old.signature == want:
        return old
    return StaticKVCache(layers, rows, heads, length, head_dim, dtype, device)


def attention_mask(keys_ok: Tensor, positions: Tensor) -> Tensor:
    """bool `[R, 1, S, T]`: query at `positions[s]` sees key `t <= positions[s]` where `keys_ok`
    (`[R, T]`, False at padding), and always itself (a row with no key would be NaN)."""
    t = torch.arange(keys_ok.shape[1], device=keys_ok.device)
    q = positions[:, None]
    causal = (t[None, :] <= q)[None] & keys_ok[:, None, :]
    return (causal | (t[None, :] == q)[None])[:, None]


def sample_token(logits: Tensor, noise: Tensor, temperature: float) -> tuple[Tensor, Tensor]:
    """Guided logits `[B, K]`, Gumbel noise `[B, K]` -> token long `[B]`, its log-prob `[B]`
    (Gumbel-max: an exact draw from softmax(logits); greedy at temperature 0)."""
    tok = (logits + noise).argmax(-1) if temperature > 0 else logits.argmax(-1)
    return tok, torch.log_softmax(logits, -1).gather(-1, tok[:, None]).squeeze(-1)


Step = Callable[[Tensor, Tensor, Tensor], tuple[Tensor, Tensor]]


def decode_tokens(first_logits: Tensor, step: Step, length: int, start: int, temperature: float,
                  generator: torch.Generator | None, return_gumbel: bool
                  ) -> tuple[Tensor, Tensor, Tensor | None]:
    """The sampling loop: token 0 from `first_logits` `[B, K]`, token l from `step(token l-1,
    position start + l - 1, noise)`. Returns tokens long `[B, L]`, log-probs `[B, L]`, and the Gumbel
    noise `[B, L, K]` when asked (zeros when greedy)."""
    B, K = first_logits.shape
    device = first_logits.device
    tokens = torch.empty(B, length, dtype=torch.long, device=device)
    logps = torch.empty(B, length, device=device)
    noises = []

    def draw() -> Tensor:
        if temperature > 0:
            return gumbel_noise((B, K), generator, device)
        return torch.zeros(B, K, device=device)

    g = draw()
    tok, lp = sample_token(first_logits, g, temperature)
    for l in range(length):
        tokens[:, l], logps[:, l] = tok, lp
        if return_gumbel:
            noises.append(g)
        if l + 1 < length:
            g = draw()
            # clone: a CUDA-graph replay overwrites its previous outputs
            tok, lp = (t.clone() for t in step(tok, torch.tensor(start + l, device=device), g))
    return tokens, logps, torch.stack(noises, 1) if return_gumbel else None


def static_step_of(policy) -> Step:
    """`policy._static_step`, or (decode="compiled") its compiled version, made once and kept on the
    policy as `_compiled_step`."""
    if policy.decode != "compiled":
        return policy._static_step
    if policy._compiled_step is None:
        policy._compiled_step = compile_step(policy._static_step, policy.compile_mode, policy.device)
    return policy._compiled_step


def compile_step(fn: Step, mode: str | None, device: torch.device) -> Step:
    """`torch.compile(fn)` as one graph: CUDA graphs (`reduce-overhead`) on GPU unless `mode` says
    otherwise, inductor's default elsewhere."""
    if mode is None:
        mode = "reduce-overhead" if device.type == "cuda" else "default"
    return torch.compile(fn, fullgraph=True, dynamic=False, mode=mode)
