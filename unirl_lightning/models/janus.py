"""Janus / Janus-Pro (transformers' `JanusForConditionalGeneration`) behind `UnifiedPolicy`.

Load released weights in HF format (e.g. "deepseek-community/Janus-Pro-1B") with
`JanusPolicy("deepseek-community/Janus-Pro-1B")`, or wrap a built model with
`JanusPolicy.from_components(model, processor)`.

Generation (Janus' recipe, as transformers' `generate(generation_mode="image")` runs it):
    prompt -> chat template (one user turn + the assistant prompt) -> the processor in
    `generation_mode="image"` appends `<begin_of_image>`; left padding. CFG rows: the same ids
    with every token except BOS and `<begin_of_image>` replaced by the pad token (same attention
    mask). Each step: language model (KV cache) -> `generation_head` -> logits `[2B, K]` ->
    float32 `u + w (c - u)` -> `/ temperature` -> Gumbel-max with the caller's generator (an
    exact sample, so the stored log-probs are those of the guided distribution) -> next input
    `generation_aligner(generation_embeddings(token))`. Positions are absolute (pads included),
    as in transformers; RoPE only sees relative offsets, so padding does not change a row.
    `temperature=0` is greedy decoding (argmax; log-probs of the guided distribution at
    temperature 1), the setting in which tokens equal transformers' `do_sample=False` exactly.

Teacher forcing (`image_logits`): one forward over `[prompt, image tokens[:-1]]`, cond and
uncond rows together, the same guidance and temperature, so log-probs equal the rollout's.

Images: VQ codebook rows (l2-normalised) -> `post_quant_conv` -> VQ decoder -> pixels in the
image processor's normalised space; `decode_images` maps them to uint8 as
`processor.postprocess` does ((x * std + mean) * 255, clipped, truncated).

Understanding: the chat template with one `<image_placeholder>` (plus the default system prompt
when the processor uses one), expanded to `<begin_of_image>` + N placeholders +
`<end_of_image>` as the processor does; the vision features replace the placeholders. The image
route is the same for long tokens `[B, L]` and relaxed one-hots `[B, L, K]` (straight-through
Gumbel), so a hard one-hot gives exactly the token path's forward and the answer loss reaches
the generation logits:

    tokens -> codebook lookup | relaxed @ codebook -> VQ decoder -> pixels -> clamp to the
    displayable range (what a uint8 image keeps) -> resize to the vision encoder's size
    (the processor's resample mode, differentiable `F.interpolate`; skipped when sizes match)
    -> normalise with the processor's mean / std -> SigLIP vision model -> aligner.

This is the processor's arithmetic in torch without the uint8 round trip: no PIL, no
quantisation, gradients flow, and rollouts and training see identical pixels.

FSDP2: `fsdp_units` shards each Llama and SigLIP block on its own; `decode_images` and
`encode_images` join the base entry points, since they read the VQ model outside `forward`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from unirl_lightning.models.base import (
    AnswerRollout,
    ImageInput,
    ImageRollout,
    UnifiedPolicy,
)
from unirl_lightning.models.hf_cache import cache_keyword
from unirl_lightning.models.static_decode import (
    StaticKVCache,
    attention_mask,
    check_decode_mode,
    decode_tokens,
    reuse_cache,
    sample_token,
    static_step_of,
)
from unirl_lightning.objectives import guided_logits, gumbel_noise

_RESAMPLE = {2: "bilinear", 3: "bicubic"}  # PILImageResampling -> F.interpolate mode


def _dtype(name: str | torch.dtype) -> torch.dtype | str:
    """"bfloat16" -> torch.bfloat16; "auto" stays (the checkpoint's own dtype)."""
    if isinstance(name, torch.dtype) or name == "auto":
        return name
    dtype = getattr(torch, str(name).removeprefix("torch."), None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"torch_dtype must name a torch dtype (float32, bfloat16, float16) or 'auto', "
                         f"got {name!r}")
    return dtype




class JanusPolicy(UnifiedPolicy):
    """Janus-Pro as a unified policy (see the module docstring for every route).

    Args:
        model_path: local folder or Hub id of a Janus checkpoint in transformers format (model +
            processor files, as `save_pretrained` writes them).
        torch_dtype: weight dtype. float32 (default) keeps full-precision master weights for the
            small RL updates; pair it with `trainer.precision: bf16-mixed` to compute in bf16.
            "bfloat16" halves memory for inference or frozen use; "auto" keeps the checkpoint's.
        attn_implementation: transformers attention backend ("sdpa", "eager", "flash_attention_2").
        gradient_checkpointing: recompute activations in backward (the 7B model needs it).
        freeze_vq: keep the VQ tokenizer fixed, as Janus does. The relaxed route still passes
            gradients through it to the image-token logits, but cannot repaint the decoder to
            please the understanding loss (which would change every decoded image).
        decode: how image rollouts decode: "dynamic" (transformers' growing cache), "static" (a
            preallocated cache, every step the same shapes) or "compiled" (the static step under
            `torch.compile`, CUDA graphs on GPU: the fast path at real size). All three draw the
            same Gumbel stream (`benchmarks/rollout_speed.md`).
        compile_mode: `torch.compile` mode of the compiled step (default: "reduce-overhead" on
            GPU, inductor's default on CPU).
    """

    image_order = "autoregressive"
    # decoding / encoding read the VQ codebook and decoder directly: gather them under FSDP2 too
    fsdp_entry_points = (*UnifiedPolicy.fsdp_entry_points, "decode_images", "encode_images")

    def __init__(
        self,
        model_path: str,
        torch_dtype: str = "float32",
        attn_implementation: str | None = "sdpa",
        gradient_checkpointing: bool = False,
        freeze_vq: bool = True,
        decode: str = "dynamic",
        compile_mode: str | None = None,
    ):
        super().__init__()
        from transformers import JanusForConditionalGeneration, JanusProcessor

        check_decode_mode(decode)
        model = JanusForConditionalGeneration.from_pretrained(
            model_path, dtype=_dtype(torch_dtype), attn_implementation=attn_implementation)
        self._setup(model, JanusProcessor.from_pretrained(model_path), gradient_checkpointing, freeze_vq,
                    decode, compile_mode)

    @classmethod
    def from_components(cls, model: nn.Module, processor: Any, gradient_checkpointing: bool = False,
                        freeze_vq: bool = True, decode: str = "dynamic",
                        compile_mode: str | None = None) -> "JanusPolicy":
        """Wrap a built `JanusForConditionalGeneration` and its `JanusProcessor` (tests, custom loading)."""
        policy = cls.__new__(cls)
        UnifiedPolicy.__init__(policy)  # nn.Module state before any submodule is assigned
        policy._setup(model, processor, gradient_checkpointing, freeze_vq, check_decode_mode(decode),
                      compile_mode)
        return policy

    def _setup(self, model: nn.Module, processor: Any, gradient_checkpointing: bool, freeze_vq: bool,
               decode: str = "dynamic", compile_mode: str | None = None) -> None:
        self.model = model
        self.processor = processor
        self.decode, self.compile_mode = decode, compile_mode
        self._static_cache: StaticKVCache | None = None
        self._compiled_step = None
        # the cache argument's names, read once here (not per decode step, nor under compile)
        self._lm_cache_keyword = cache_keyword(self._lm)
        self._layer_cache_keyword = cache_keyword(self._lm.layers[0])
        tok = processor.tokenizer
        gen_pad = getattr(model.generation_config, "pad_token_id", None)
        self.pad_id = int(gen_pad if gen_pad is not None else tok.pad_token_id)
        self.bos_id = -1 if tok.bos_token_id is None else int(tok.bos_token_id)
        self.boi_id = tok.convert_tokens_to_ids(processor.image_start_token)
        eos = tok.eos_token_id
        self.eos_id = int(eos[0] if isinstance(eos, (list, tuple)) else eos)
        self.image_token_id = int(model.config.image_token_id)
        if tok.convert_tokens_to_ids(processor.image_token) != self.image_token_id:
            raise ValueError("processor.image_token and model.config.image_token_id disagree: "
                             "mismatched model and processor")
        vision_tokens = (model.config.vision_config.image_size // model.config.vision_config.patch_size) ** 2
        if processor.num_image_tokens != vision_tokens:
            raise ValueError(f"processor.num_image_tokens={processor.num_image_tokens} but the vision "
                             f"encoder makes {vision_tokens} features per image")
        if freeze_vq:
            model.model.vqmodel.requires_grad_(False)
        if gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})

    def fsdp_units(self) -> list[nn.Module]:
        """FSDP2 shards each Llama block and each SigLIP block on its own; the rest (embeddings,
        heads, aligners, VQ model) shards with the policy and is gathered by its entry points."""
        return [*self._lm.layers, *self.model.model.vision_model.encoder.layers]

    # ---- sizes and parts --------------------------------------------------------------
    @property
    def image_vocab_size(self) -> int:
        return int(self.model.config.vq_config.num_embeddings)

    @property
    def tokens_per_image(self) -> int:
        h, w = self._grid
        return h * w

    @property
    def _grid(self) -> tuple[int, int]:
        h, w = self.model.model.vqmodel.quantize.quant_state_dims
        return int(h), int(w)

    @property
    def device(self) -> torch.device:
        return self.model.lm_head.weight.device

    @property
    def _lm(self) -> nn.Module:
        return self.model.model.language_model

    def _embed(self, ids: Tensor) -> Tensor:
        return self.model.get_input_embeddings()(ids)

    # ---- prompts ----------------------------------------------------------------------
    def chat_prompt(self, text: str, with_image: bool = False) -> str:
        """One user turn and the assistant prompt, through the processor's chat template when it has one."""
        content = ([{"type": "image"}] if with_image else []) + [{"type": "text", "text": text}]
        if getattr(self.processor, "chat_template", None):
            messages = [{"role": "user", "content": content}]
            return self.processor.apply_chat_template(messages, add_generation_prompt=True)
        image = f"{self.processor.image_token}\n" if with_image else ""
        return f"<|User|>: {image}{text.strip()}\n\n<|Assistant|>:"  # Janus' format when no template ships

    def generation_inputs(self, prompts: Sequence[str], cfg_scale: float = 1.0) -> tuple[Tensor, Tensor]:
        """ids, attention mask `[R, S]`: the conditional rows, then (cfg != 1) the unconditional ones."""
        enc = self.processor(text=[self.chat_prompt(p) for p in prompts], generation_mode="image",
                             padding=True, return_tensors="pt")
        ids, mask = enc["input_ids"].to(self.device), enc["attention_mask"].to(self.device)
        if cfg_scale == 1.0:
            return ids, mask
        keep = (ids == self.bos_id) | (ids == self.boi_id)
        uncond = torch.where(keep, ids, torch.full_like(ids, self.pad_id))
        return torch.cat([ids, uncond]), torch.cat([mask, mask])

    # ---- generation -------------------------------------------------------------------

    def _step(self, embeds: Tensor, mask: Tensor | None, cache: Any) -> Tensor:
        """One cached language-model call -> the last position's hidden state `[R, D]`."""
        out = self._lm(inputs_embeds=embeds, attention_mask=mask, use_cache=True,
                       **{self._lm_cache_keyword: cache})
        return out.last_hidden_state[:, -1]

    @torch.no_grad()
    def generate_images(self, prompts, *, cfg_scale=1.0, temperature=1.0, generator=None,
                        return_gumbel=False) -> ImageRollout:
        prompts = list(prompts)
        decode = self._decode_dynamic if self.decode == "dynamic" else self._decode_static
        tokens, logps, gumbel = decode(prompts, cfg_scale, temperature, generator, return_gumbel)
        return ImageRollout(
            prompts=prompts, tokens=tokens, logprobs=logps,
            action_mask=torch.ones_like(tokens, dtype=torch.bool), cfg_scale=cfg_scale,
            temperature=temperature, gumbel=gumbel,
        )

    def _decode_dynamic(self, prompts, cfg_scale, temperature, generator, return_gumbel):
        from transformers import DynamicCache

        B, L = len(prompts), self.tokens_per_image
        ids, mask = self.generation_inputs(prompts, cfg_scale)
        R, S = ids.shape
        # a full-length mask sliced per step; None when nothing is padded (the causal fast path)
        full = torch.cat([mask, mask.new_ones(R, L)], 1) if not bool(mask.all()) else None
        cache = DynamicCache(config=self._lm.config)
        h = self._step(self._embed(ids), None if full is None else full[:, :S], cache)
        head = self.model.model.generation_head

        def step(tok: Tensor, position: Tensor, noise: Tensor) -> tuple[Tensor, Tensor]:
            emb = self.model.prepare_embeddings_for_image_generation(tok.repeat(R // B)[:, None])
            p = int(position)
            h = self._step(emb, None if full is None else full[:, : p + 1], cache)
            return sample_token(guided_logits(head(h), cfg_scale, temperature), noise, temperature)

        first = guided_logits(head(h), cfg_scale, temperature)
        return decode_tokens(first, step, L, S, temperature, generator, return_gumbel)

    # ---- static-cache decoding (decode="static" | "compiled") ---------------------------
    def _layers(self, x: Tensor, positions: Tensor, mask: Tensor, cache: StaticKVCache) -> Tensor:
        """The language model's decoder layers over `x` `[R, S, D]` at `positions` (long `[S]`),
        writing keys / values into `cache`; bool `mask` `[R, 1, S, T]` -> normed states `[R, S, D]`."""
        lm = self._lm
        cos_sin = lm.rotary_emb(x, positions[None].expand(x.shape[0], -1))
        for layer in lm.layers:
            x = layer(x, attention_mask=mask, position_embeddings=cos_sin, cache_position=positions,
                      **{self._layer_cache_keyword: cache})
        return lm.norm(x)

    def _static_step(self, tok: Tensor, position: Tensor, noise: Tensor, keys_ok: Tensor
                     ) -> tuple[Tensor, Tensor]:
        """Feed image token `tok` `[B]` at `position` (0-dim long) -> next token `[B]`, its log-prob
        `[B]`. Fixed shapes and no Python branching on values: `torch.compile` captures it whole."""
        R, B = keys_ok.shape[0], tok.shape[0]
        cfg_scale, temperature = self._decode_args
        positions = position.view(1)
        emb = self.model.prepare_embeddings_for_image_generation(tok.repeat(R // B)[:, None])
        h = self._layers(emb, positions, attention_mask(keys_ok, positions), self._static_cache)
        logits = guided_logits(self.model.model.generation_head(h[:, -1]), cfg_scale, temperature)
        return sample_token(logits, noise, temperature)

    def _decode_static(self, prompts, cfg_scale, temperature, generator, return_gumbel):
        L = self.tokens_per_image
        ids, mask = self.generation_inputs(prompts, cfg_scale)
        R, S = ids.shape
        cfg = self._lm.config
        heads = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        self._static_cache = reuse_cache(self._static_cache, cfg.num_hidden_layers, R, heads, S + L,
                                         head_dim, self.model.lm_head.weight.dtype, self.device)
        keys_ok = torch.cat([mask.bool(), mask.new_ones(R, L, dtype=torch.bool)], 1)
        positions = torch.arange(S, device=self.device)
        h = self._layers(self._embed(ids), positions, attention_mask(keys_ok, positions), self._static_cache)
        first = guided_logits(self.model.model.generation_head(h[:, -1]), cfg_scale, temperature)
        self._decode_args = (float(cfg_scale), float(temperature))
        step = static_step_of(self)
        return decode_tokens(first, lambda t, p, g: step(t, p, g, keys_ok), L, S, temperature, generator,
                             return_gumbel)

    def image_logits(self, rollout: ImageRollout) -> Tensor:
        B, L = rollout.tokens.shape
        ids, mask = self.generation_inputs(rollout.prompts, rollout.cfg_scale)
        R, S = ids.shape
        tokens = rollout.tokens.to(self.device)
        image = self.model.prepare_embeddings_for_image_generation(tokens[:, :-1].repeat(R // B, 1))
        text = self._embed(ids)
        embeds = torch.cat([text, image.to(text.dtype)], 1)
        full = None if bool(mask.all()) else torch.cat([mask, mask.new_ones(R, L - 1)], 1)
        h = self._lm(inputs_embeds=embeds, attention_mask=full, use_cache=False).last_hidden_state
        # outputs at <begin_of_image> .. image[L-2] predict image[0 .. L-1]
        logits = self.model.model.generation_head(h[:, S - 1 :])
        return guided_logits(logits, rollout.cfg_scale, rollout.temperature)

    # ---- images -----------------------------------------------------------------------
    def _pixels(self, images: ImageInput) -> Tensor:
        """Tokens `[B, L]` or relaxed one-hots `[B, L, K]` -> decoder pixels `[B, 3, H, W]`, normalised."""
        vq = self.model.model.vqmodel
        codebook = vq.quantize.embedding.weight  # [K, e]
        if images.dtype == torch.long:
            z = F.embedding(images.to(codebook.device), codebook)
        else:
            if images.shape[-1] != codebook.shape[0]:
                raise ValueError(f"relaxed images must be [B, L, {codebook.shape[0]}], "
                                 f"got {tuple(images.shape)}")
            z = images.to(codebook.dtype) @ codebook
        if z.shape[1] != self.tokens_per_image:
            raise ValueError(f"images have {z.shape[1]} tokens, the VQ grid holds {self.tokens_per_image}")
        h, w = self._grid
        z = F.normalize(z, p=2, dim=-1).view(z.shape[0], h, w, -1).permute(0, 3, 1, 2)
        return vq.decoder(vq.post_quant_conv(z))

    def _mean_std(self, like: Tensor) -> tuple[Tensor, Tensor]:
        ip = self.processor.image_processor
        shape = (1, -1, 1, 1)
        mean = torch.tensor(ip.image_mean, device=like.device, dtype=torch.float32).view(shape)
        return mean, torch.tensor(ip.image_std, device=like.device, dtype=torch.float32).view(shape)

    @torch.no_grad()
    def decode_images(self, tokens: Tensor) -> Tensor:
        x = self._pixels(tokens).float()
        mean, std = self._mean_std(x)
        return ((x * std + mean) * 255).clamp(0, 255).to(torch.uint8)  # as processor.postprocess

    @torch.no_grad()
    def encode_images(self, images: Tensor) -> Tensor:
        """uint8 pixels `[B, 3, H, W]` -> image tokens `[B, L]` (VQ encoder; resized to fit its grid)."""
        vq = self.model.model.vqmodel
        size = self._grid[0] * 2 ** (len(vq.config.channel_multiplier) - 1)
        x = images.to(self.device, torch.float32) / 255
        if x.shape[-2:] != (size, size):
            x = F.interpolate(x, size=(size, size), mode="bicubic", antialias=True, align_corners=False)
            x = x.clamp(0, 1)
        mean, std = self._mean_std(x)
        out = vq.encode(((x - mean) / std).to(vq.quantize.embedding.weight.dtype))
        return out.image_tokens.view(images.shape[0], -1)

    def _vision_pixels(self, images: ImageInput) -> Tensor:
        """Images -> the vision encoder's `pixel_values` `[B, 3, S, S]`, differentiable (module docstring)."""
        x = self._pixels(images).float()
        mean, std = self._mean_std(x)
        x = (x * std + mean).clamp(0, 1)  # what a uint8 image would keep, in [0, 1]
        size = self.model.config.vision_config.image_size
        if x.shape[-2:] != (size, size):
            mode = _RESAMPLE.get(int(getattr(self.processor.image_processor, "resample", 2)), "bilinear")
            x = F.interpolate(x, size=(size, size), mode=mode, antialias=True, align_corners=False)
        return ((x - mean) / std).to(self.model.model.vision_model.embeddings.patch_embedding.weight.dtype)

    # ---- understanding ----------------------------------------------------------------
    def understanding_inputs(self, questions: Sequence[str]) -> tuple[Tensor, Tensor]:
        """ids, attention mask `[B, S]` (left padded) of the questions, each about one image."""
        from transformers.models.janus.processing_janus import DEFAULT_SYSTEM_PROMPT

        proc = self.processor
        system = DEFAULT_SYSTEM_PROMPT if getattr(proc, "use_default_system_prompt", False) else ""
        block = proc.replace_image_token({}, image_idx=0)  # <begin_of_image> + N x image + <end_of_image>
        texts = [system + self.chat_prompt(q, with_image=True).replace(proc.image_token, block)
                 for q in questions]
        enc = proc.tokenizer(texts, padding=True, padding_side="left", return_tensors="pt")
        return enc["input_ids"].to(self.device), enc["attention_mask"].to(self.device)

    def _understanding_embeds(self, ids: Tensor, images: ImageInput) -> Tensor:
        """Text embeddings `[B, S, D]` with the image placeholders replaced by vision features."""
        embeds = self._embed(ids)
        features = self.model.model.get_image_features(self._vision_pixels(images)).pooler_output  # [B, N, D]
        slots = (ids == self.image_token_id).unsqueeze(-1)
        return embeds.masked_scatter(slots, features.to(embeds.dtype))

    def encode_answers(self, answers: Sequence[str]) -> tuple[Tensor, Tensor]:
        """Answer ids + EOS, right padded: tokens `[B, T]`, mask `[B, T]`.

        Each answer gets a leading space, as the chat template writes the assistant's reply."""
        tok = self.processor.tokenizer
        rows = [tok(" " + a.strip(), add_special_tokens=False)["input_ids"] + [self.eos_id] for a in answers]
        width = max(map(len, rows))
        tokens = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros(len(rows), width, dtype=torch.bool)
        for i, r in enumerate(rows):
            tokens[i, : len(r)] = torch.tensor(r)
            mask[i, : len(r)] = True
        return tokens.to(self.device), mask.to(self.device)

    @torch.no_grad()
    def answer(self, images, questions, *, greedy=True, temperature=1.0, max_new_tokens=16,
               generator=None) -> AnswerRollout:
        from transformers import DynamicCache

        ids, mask = self.understanding_inputs(questions)
        B, S = ids.shape
        full = torch.cat([mask, mask.new_ones(B, max_new_tokens)], 1)
        cache = DynamicCache(config=self._lm.config)
        h = self._step(self._understanding_embeds(ids, images), full[:, :S], cache)
        done = torch.zeros(B, dtype=torch.bool, device=self.device)
        toks, logps, masks = [], [], []
        for t in range(max_new_tokens):
            logits = self.model.lm_head(h).float() / (1.0 if greedy else temperature)
            noisy = logits if greedy else logits + gumbel_noise(logits.shape, generator, logits.device)
            pick = noisy.argmax(-1)  # greedy, or Gumbel-max: an exact sample
            masks.append(~done)
            toks.append(torch.where(done, torch.full_like(pick, self.pad_id), pick))
            logps.append(torch.log_softmax(logits, -1).gather(-1, pick[:, None]).squeeze(-1) * (~done))
            done = done | (pick == self.eos_id)
            # sharded (FSDP) ranks must run the same forwards (each gathers parameters): no early stop there
            if t + 1 == max_new_tokens or (bool(done.all()) and not getattr(self, "_fsdp_sharded", False)):
                break
            h = self._step(self._embed(toks[-1][:, None]), full[:, : S + t + 1], cache)
        tokens, mask_out = torch.stack(toks, 1), torch.stack(masks, 1)
        decode = self.processor.tokenizer.decode
        texts = [decode(row[m & (row != self.eos_id)], skip_special_tokens=True).strip()
                 for row, m in zip(tokens, mask_out)]
        return AnswerRollout(texts=texts, tokens=tokens, logprobs=torch.stack(logps, 1), mask=mask_out)

    def answer_logprobs(self, images, questions, answers) -> tuple[Tensor, Tensor]:
        if isinstance(answers, AnswerRollout):
            tokens, mask = answers.tokens.to(self.device), answers.mask.to(self.device)
        else:
            tokens, mask = self.encode_answers(answers)
        ids, prompt_mask = self.understanding_inputs(questions)
        S = ids.shape[1]
        embeds = self._understanding_embeds(ids, images)
        embeds = torch.cat([embeds, self._embed(tokens[:, :-1]).to(embeds.dtype)], 1)
        full = torch.cat([prompt_mask, prompt_mask.new_ones(tokens.shape[0], tokens.shape[1] - 1)], 1)
        h = self._lm(inputs_embeds=embeds, attention_mask=full, use_cache=False).last_hidden_state[:, S - 1 :]
        logp = torch.log_softmax(self.model.lm_head(h).float(), -1).gather(-1, tokens[..., None]).squeeze(-1)
        return logp * mask, mask

    # ---- persistence ------------------------------------------------------------------
    def save_pretrained(self, path: str | Path, state_dict: dict[str, Tensor] | None = None) -> None:
        """transformers format: model weights + config + generation config, and the processor files."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        if state_dict is not None:  # this module's keys -> the wrapped model's
            state_dict = {
                k.removeprefix("model."): v for k, v in state_dict.items() if k.startswith("model.")
            }
        self.model.save_pretrained(path, state_dict=state_dict)
        self.processor.save_pretrained(path)

    @classmethod
    def from_pretrained(cls, path: str | Path, **kwargs) -> "JanusPolicy":
        """Load a `save_pretrained` folder or released weights (Hub id); kwargs go to `__init__`."""
        return cls(str(path), **kwargs)
