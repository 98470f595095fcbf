"""Flux (diffusers' `FluxTransformer2DModel`) behind the flow-policy interface.

Latents stay `[B, C, H, W]` as for SD3; each velocity call packs them into Flux's 2x2-patch
tokens `[B, H/2 * W/2, 4C]` with the pipeline's position ids (text ids 0, image ids
(0, row, col)) and unpacks the prediction. The schedule is Flux's: sigmas linspace(1, 1/T, T),
shifted by the resolution-dependent mu when the scheduler uses dynamic shifting. FLUX.1-dev is
guidance-distilled: `guidance_scale` is an input of the transformer, not a second pass (keep
cfg_scale 1); FLUX.1-schnell has no guidance input.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch
from einops import rearrange
from torch import Tensor

from unirl_lightning.models.flow.base import Prompt, TextCondition
from unirl_lightning.models.flow.transformer import (
    PipelineFlowPolicy,
    TransformerFlowPolicy,
)


def pack_latents(latents: Tensor) -> Tensor:
    """`[B, C, H, W]` -> Flux tokens `[B, (H/2)(W/2), 4C]` (row-major 2x2 patches, channels outer)."""
    h, w = latents.shape[-2:]
    if h % 2 or w % 2:
        raise ValueError(f"Flux packs 2x2 latent patches: latent side must be even, got {h}x{w}")
    return rearrange(latents, "b c (h p) (w q) -> b (h w) (c p q)", p=2, q=2)


def unpack_latents(tokens: Tensor, height: int, width: int) -> Tensor:
    """Inverse of `pack_latents`: `[B, (H/2)(W/2), 4C]` -> `[B, C, H, W]`."""
    return rearrange(tokens, "b (h w) (c p q) -> b c (h p) (w q)", h=height // 2, p=2, q=2)


def image_ids(height: int, width: int, device: torch.device, dtype: torch.dtype) -> Tensor:
    """Position ids `[(H/2)(W/2), 3]` of the packed tokens of an `H x W` latent: (0, row, col)."""
    rows, cols = torch.meshgrid(torch.arange(height // 2), torch.arange(width // 2), indexing="ij")
    ids = torch.stack([torch.zeros_like(rows), rows, cols], -1).reshape(-1, 3)
    return ids.to(device=device, dtype=dtype)


def dynamic_shift(seq_len: int, config: Any) -> float:
    """Flux's mu: linear in the image token count between (base_image_seq_len, base_shift) and
    (max_image_seq_len, max_shift) of the scheduler config."""
    lo, hi = config.get("base_image_seq_len", 256), config.get("max_image_seq_len", 4096)
    s_lo, s_hi = config.get("base_shift", 0.5), config.get("max_shift", 1.15)
    return s_lo + (s_hi - s_lo) * (seq_len - lo) / (hi - lo)


class FluxFlowPolicy(TransformerFlowPolicy):
    """A flow policy whose velocity is a diffusers `FluxTransformer2DModel` (set `self.transformer`).

    Args:
        scheduler_config: the pipeline scheduler's config (dynamic shifting and its range); None
            keeps a plain `FlowMatchEulerDiscreteScheduler` (shift 1).
        guidance_scale: the distilled-guidance input of FLUX.1-dev (ignored without one).
    """

    def __init__(self, scheduler_config: dict | None = None, guidance_scale: float = 3.5):
        super().__init__()
        if scheduler_config is not None:
            from diffusers import FlowMatchEulerDiscreteScheduler

            self.scheduler = FlowMatchEulerDiscreteScheduler.from_config(scheduler_config)
        self.guidance_scale = guidance_scale

    def sigmas(self, num_steps: int) -> Tensor:
        """Flux's `[T+1]` schedule: linspace(1, 1/T, T), shifted by mu(image tokens) when dynamic, then 0."""
        cfg = self.scheduler.config
        sig = np.linspace(1.0, 1.0 / num_steps, num_steps)
        if cfg.get("use_dynamic_shifting", False):
            _, h, w = self.latent_shape
            self.scheduler.set_timesteps(sigmas=sig, mu=dynamic_shift((h // 2) * (w // 2), cfg))
        else:
            self.scheduler.set_timesteps(sigmas=sig)
        return self.scheduler.sigmas.to(self.device, torch.float32)

    def forward_velocity(self, x: Tensor, sigma: Tensor, cond: TextCondition) -> Tensor:
        b, _, h, w = x.shape
        dtype = next(self.transformer.parameters()).dtype
        guidance = None
        if self.transformer.config.guidance_embeds:
            guidance = torch.full((b,), self.guidance_scale, device=x.device, dtype=torch.float32)
        txt_ids, img_ids = self._position_ids(cond.hidden.shape[1], h, w, x.device, dtype)
        out = self.transformer(
            hidden_states=pack_latents(x).to(dtype), timestep=sigma.to(dtype), guidance=guidance,
            pooled_projections=cond.pooled.to(dtype), encoder_hidden_states=cond.hidden.to(dtype),
            txt_ids=txt_ids, img_ids=img_ids, return_dict=False,
        )[0]  # Flux reads timestep = sigma (the pipeline's t / 1000) and scales it inside
        return unpack_latents(out, h, w)

    def _position_ids(self, text_len: int, h: int, w: int, device: torch.device, dtype: torch.dtype
                      ) -> tuple[Tensor, Tensor]:
        """Text ids `[text_len, 3]` (zeros) and image ids `[(h/2)(w/2), 3]`, built once per layout:
        every step of every rollout uses the same ones."""
        key = (text_len, h, w, device, dtype)
        if getattr(self, "_ids_key", None) != key:
            self._ids_key = key
            self._ids = (torch.zeros(text_len, 3, device=device, dtype=dtype), image_ids(h, w, device, dtype))
        return self._ids


class DiffusersFluxPolicy(PipelineFlowPolicy, FluxFlowPolicy):
    """FLUX.1 (dev / schnell) from a diffusers `FluxPipeline` folder or Hub id; only the transformer
    trains (CLIP-L and T5 text encoders and the VAE frozen; "" is the unconditional prompt).

    Args:
        pretrained: local folder or Hub id of a `FluxPipeline`.
        resolution: image side in pixels (latent side = 2 * (resolution // 16)).
        torch_dtype: "float32", "bfloat16" or "float16" for every component.
        max_sequence_length: T5 tokens (<= 512).
        guidance_scale: FLUX.1-dev's distilled guidance.
    """

    text_encoder_names = ("text_encoder", "text_encoder_2")

    def __init__(self, pretrained: str, resolution: int = 512, torch_dtype: str = "bfloat16",
                 max_sequence_length: int = 512, guidance_scale: float = 3.5):
        from diffusers import FluxPipeline

        pipe = FluxPipeline.from_pretrained(pretrained, dtype=getattr(torch, torch_dtype))
        super().__init__(scheduler_config=pipe.scheduler.config, guidance_scale=guidance_scale)
        self.pretrained, self.resolution, self.torch_dtype = pretrained, resolution, torch_dtype
        self.max_sequence_length = max_sequence_length
        self.adopt_pipeline(pipe)

    def options(self) -> dict[str, Any]:
        return {"pretrained": self.pretrained, "resolution": self.resolution, "torch_dtype": self.torch_dtype,
                "max_sequence_length": self.max_sequence_length, "guidance_scale": self.guidance_scale}

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        side = 2 * (self.resolution // (self._pipe.vae_scale_factor * 2))
        return (self.transformer.config.in_channels // 4, side, side)

    @torch.no_grad()
    def encode_text(self, prompts: Sequence[Prompt]) -> TextCondition:
        texts = ["" if p is None else p for p in prompts]
        hidden, pooled, _ = self._pipe.encode_prompt(prompt=texts, prompt_2=None, device=self.device,
                                                     max_sequence_length=self.max_sequence_length)
        return TextCondition(hidden, pooled)
