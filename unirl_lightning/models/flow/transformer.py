"""Flow policies whose velocity is a diffusers transformer, and the mixin for real diffusers pipelines
(shared by SD3 / SD3.5 and FLUX)."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any, ContextManager, Sequence

import torch
from torch import Tensor, nn

from unirl_lightning.models.flow.base import FlowPolicy
from unirl_lightning.models.lora import adapters_disabled, add_lora, merge_lora


class TransformerFlowPolicy(FlowPolicy):
    """A flow policy whose velocity is a diffusers transformer (`self.transformer`): its blocks are
    the FSDP units, and LoRA adapters go on its attention projections."""

    transformer: nn.Module

    def fsdp_units(self) -> list[nn.Module]:
        """Each transformer block (MMDiT; Flux's single-stream ones too), then the transformer (its
        embedders and output layers)."""
        t = self.transformer
        return [*getattr(t, "transformer_blocks", []), *getattr(t, "single_transformer_blocks", []), t]

    def add_lora(self, rank: int, alpha: float | None = None, targets: Sequence[str] | None = None) -> None:
        """LoRA on the transformer's attention projections (default: those of `SD3_LORA_TARGETS` it
        has); everything else, text encoder included, freezes."""
        self.requires_grad_(False)
        self.lora_scaling = add_lora(self.transformer, rank, alpha, targets)

    def adapters_disabled(self) -> ContextManager[None]:
        return adapters_disabled(self.transformer)


class PipelineFlowPolicy:
    """Mixin of flow policies built from a diffusers pipeline: the transformer trains; the text
    encoders and the VAE are frozen, shared with the reference and kept whole under FSDP; the
    folder format is the trained transformer (diffusers format) + `flow_policy.json` naming the
    source pipeline and this wrapper's options (`options()`)."""

    transformer: nn.Module
    vae: nn.Module
    #: the pipeline's text encoder attributes this policy adopts
    text_encoder_names: tuple[str, ...] = ("text_encoder", "text_encoder_2", "text_encoder_3")

    def adopt_pipeline(self, pipe: Any) -> None:
        """Registers the pipeline's transformer, frozen VAE and text encoders as sub-modules."""
        self.transformer = pipe.transformer
        self.vae = pipe.vae.requires_grad_(False)
        for name in self.text_encoder_names:
            enc = getattr(pipe, name, None)
            if enc is not None:
                setattr(self, name, enc.requires_grad_(False))
        # The pipeline object (not a Module) shares these modules; kept for its encode_prompt.
        self.__dict__["_pipe"] = pipe

    def options(self) -> dict[str, Any]:
        """The constructor arguments `from_pretrained` re-creates this policy with."""
        raise NotImplementedError

    @property
    def text_trainable(self) -> bool:
        return False

    def fsdp_ignored_params(self) -> set[nn.Parameter]:
        """The frozen text encoders and VAE stay whole on every rank under FSDP: the pipeline calls
        them directly, and the reference shares them."""
        return {p for name, m in self.named_children() if name != "transformer" for p in m.parameters()}

    @torch.no_grad()
    def decode(self, latents: Tensor) -> Tensor:
        cfg = self.vae.config
        x = latents.to(self.vae.dtype) / cfg.scaling_factor + (cfg.shift_factor or 0.0)
        pixels = self.vae.decode(x, return_dict=False)[0]
        return ((pixels.float() / 2 + 0.5).clamp(0, 1) * 255).round().to(torch.uint8)

    @torch.no_grad()
    def encode_images(self, images: Tensor) -> Tensor:
        cfg = self.vae.config
        x = (images.to(self.device, self.vae.dtype) / 127.5 - 1)
        lat = self.vae.encode(x).latent_dist.sample()
        return ((lat - (cfg.shift_factor or 0.0)) * cfg.scaling_factor).float()

    def make_reference(self):
        """Shares the frozen text encoders and VAE; copies only the transformer."""
        ref = copy.copy(self)
        ref._modules = dict(self._modules)
        ref._parameters, ref._buffers = dict(self._parameters), dict(self._buffers)
        ref.transformer = copy.deepcopy(self.transformer).requires_grad_(False).eval()
        return ref

    def save_pretrained(self, path: str | Path, state_dict: dict[str, Tensor] | None = None) -> None:
        """Writes the transformer (diffusers format) and the source pipeline's id; `state_dict`
        (this module's keys, e.g. gathered from FSDP shards) replaces the live transformer weights;
        a LoRA adapter is merged in."""
        path = Path(path)
        if state_dict is None and not self.has_lora:
            self.transformer.save_pretrained(path / "transformer")
        else:
            state_dict = state_dict if state_dict is not None else self.state_dict()
            state_dict = merge_lora(state_dict, self.lora_scaling or 1.0)  # plain weights: loads without peft
            from safetensors.torch import save_file

            (path / "transformer").mkdir(parents=True, exist_ok=True)
            self.transformer.save_config(path / "transformer")
            weights = {k.removeprefix("transformer."): v.detach().cpu().contiguous()
                       for k, v in state_dict.items() if k.startswith("transformer.")}
            save_file(weights, str(path / "transformer" / "diffusion_pytorch_model.safetensors"))
        (path / "flow_policy.json").write_text(json.dumps({"class": type(self).__name__, **self.options()}))

    @classmethod
    def from_pretrained(cls, path: str | Path, **kwargs):
        """Loads a `save_pretrained` folder (source pipeline + trained transformer) or a pipeline itself."""
        path = Path(path)
        meta = path / "flow_policy.json"
        if not meta.is_file():
            return cls(str(path), **kwargs)
        options = json.loads(meta.read_text())
        saved_by = options.pop("class", cls.__name__)
        if saved_by != cls.__name__:
            raise ValueError(f"{path} was saved by {saved_by}; load it with {saved_by}.from_pretrained")
        policy = cls(**{**options, **kwargs})
        dtype = next(policy.transformer.parameters()).dtype
        policy.transformer = type(policy.transformer).from_pretrained(path / "transformer", dtype=dtype)
        return policy
