"""SD3 / SD3.5 through diffusers: velocity from an `SD3Transformer2DModel` (MMDiT), and a real
pipeline folder or Hub id (transformer trained; CLIP/T5 text encoders and the VAE frozen)."""

from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import Tensor

from unirl_lightning.models.flow.base import Prompt, TextCondition
from unirl_lightning.models.flow.transformer import (
    PipelineFlowPolicy,
    TransformerFlowPolicy,
)


class SD3FlowPolicy(TransformerFlowPolicy):
    """A flow policy whose velocity is a diffusers `SD3Transformer2DModel` (set `self.transformer`)."""

    def forward_velocity(self, x: Tensor, sigma: Tensor, cond: TextCondition) -> Tensor:
        dtype = next(self.transformer.parameters()).dtype
        out = self.transformer(
            hidden_states=x.to(dtype),
            encoder_hidden_states=cond.hidden.to(dtype),
            pooled_projections=cond.pooled.to(dtype),
            timestep=sigma * self.num_train_timesteps,
            return_dict=False,
        )[0]
        return out


class DiffusersFlowPolicy(PipelineFlowPolicy, SD3FlowPolicy):
    """SD3 / SD3.5 from a diffusers pipeline folder or Hub id; only the transformer trains.

    Text conditioning is the pipeline's own `encode_prompt` (CLIP-L, CLIP-G, T5; frozen; the
    unconditional prompt is "" as in SD3), decoding is its VAE with the latent scaling and shift
    factors. Tested on a tiny random SD3 pipeline built locally.

    Args:
        pretrained: local folder or Hub id of a `StableDiffusion3Pipeline`.
        resolution: image side in pixels (latent side = resolution / 8).
        torch_dtype: "float32", "bfloat16" or "float16" for every component.
        max_sequence_length: T5 tokens.
        shift: scheduler shift; None keeps the pipeline's.
        drop_t5: load without the T5 encoder (SD3 then reads zeros in its place; saves memory).
    """

    def __init__(
        self,
        pretrained: str,
        resolution: int = 512,
        torch_dtype: str = "bfloat16",
        max_sequence_length: int = 128,
        shift: float | None = None,
        drop_t5: bool = False,
    ):
        from diffusers import StableDiffusion3Pipeline

        no_t5 = {"text_encoder_3": None, "tokenizer_3": None} if drop_t5 else {}
        pipe = StableDiffusion3Pipeline.from_pretrained(
            pretrained, dtype=getattr(torch, torch_dtype), **no_t5
        )
        super().__init__(shift=pipe.scheduler.config.shift if shift is None else shift)
        self.pretrained, self.resolution, self.max_sequence_length = (
            pretrained,
            resolution,
            max_sequence_length,
        )
        self.torch_dtype, self.drop_t5 = torch_dtype, drop_t5
        self.adopt_pipeline(pipe)

    def options(self) -> dict[str, Any]:
        return {
            "pretrained": self.pretrained,
            "resolution": self.resolution,
            "torch_dtype": self.torch_dtype,
            "max_sequence_length": self.max_sequence_length,
            "shift": self.scheduler.config.shift,
            "drop_t5": self.drop_t5,
        }

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        side = self.resolution // self._pipe.vae_scale_factor
        return (self.transformer.config.in_channels, side, side)

    @torch.no_grad()
    def encode_text(self, prompts: Sequence[Prompt]) -> TextCondition:
        texts = ["" if p is None else p for p in prompts]
        hidden, _, pooled, _ = self._pipe.encode_prompt(
            prompt=texts,
            prompt_2=None,
            prompt_3=None,
            device=self.device,
            do_classifier_free_guidance=False,
            max_sequence_length=self.max_sequence_length,
        )
        return TextCondition(hidden, pooled)
