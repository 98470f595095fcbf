"""Tiny random diffusers pipelines built locally (no downloads): the real SD3 and Flux code paths
at test sizes. Character-level CLIP and T5 tokenizers, 1-2 layer encoders, a 4-block tiny VAE
(8x downsampling, 4 latent channels)."""

import torch
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler


def clip_tokenizer():
    from transformers import CLIPTokenizer
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    chars = list(bytes_to_unicode().values())
    vocab = {
        c: i for i, c in enumerate(chars + [c + "</w>" for c in chars] + ["<|startoftext|>", "<|endoftext|>"])
    }
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=77)


def tiny_clip(tokenizer, projection: bool = True, hidden: int = 16):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    vocab = tokenizer.get_vocab()
    config = CLIPTextConfig(
        vocab_size=len(vocab),
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=2,
        num_attention_heads=2,
        projection_dim=hidden,
        bos_token_id=vocab["<|startoftext|>"],
        eos_token_id=vocab["<|endoftext|>"],
        pad_token_id=vocab["<|endoftext|>"],
    )
    return (CLIPTextModelWithProjection if projection else CLIPTextModel)(config)


def t5_tokenizer():
    """A character-level Unigram T5 tokenizer (pad 0, eos 1, unk 2)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import T5TokenizerFast

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)] + [
        (c, -1.0) for c in "abcdefghijklmnopqrstuvwxyz▁"
    ]
    tok = Tokenizer(models.Unigram(pieces, unk_id=2))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    return T5TokenizerFast(
        tokenizer_object=tok, eos_token="</s>", pad_token="<pad>", unk_token="<unk>", extra_ids=0
    )


def tiny_vae():
    return AutoencoderKL(
        down_block_types=["DownEncoderBlock2D"] * 4,
        up_block_types=["UpDecoderBlock2D"] * 4,
        block_out_channels=[8] * 4,
        latent_channels=4,
        norm_num_groups=4,
        shift_factor=0.06,
        scaling_factor=1.5,
    )


def tiny_sd3_pipeline(folder) -> None:
    """A random SD3 pipeline (two CLIP encoders, no T5) saved to `folder`."""
    from diffusers import SD3Transformer2DModel, StableDiffusion3Pipeline

    torch.manual_seed(0)
    tok = clip_tokenizer()
    transformer = SD3Transformer2DModel(
        sample_size=8,
        patch_size=2,
        in_channels=4,
        out_channels=4,
        num_layers=1,
        attention_head_dim=8,
        num_attention_heads=2,
        joint_attention_dim=32,
        caption_projection_dim=16,
        pooled_projection_dim=32,
        pos_embed_max_size=8,
    )
    StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=tiny_vae(),
        text_encoder=tiny_clip(tok),
        tokenizer=tok,
        text_encoder_2=tiny_clip(tok),
        tokenizer_2=tok,
        text_encoder_3=None,
        tokenizer_3=None,
    ).save_pretrained(folder)


def tiny_flux_pipeline(folder, guidance_embeds: bool = True) -> None:
    """A random FLUX.1-dev-style pipeline (CLIP-L-like + T5 encoders, distilled guidance) saved to
    `folder`."""
    from diffusers import FluxPipeline, FluxTransformer2DModel
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(0)
    tok, t5tok = clip_tokenizer(), t5_tokenizer()
    t5 = T5EncoderModel(
        T5Config(vocab_size=len(t5tok), d_model=16, d_kv=8, d_ff=32, num_layers=1, num_heads=2)
    )
    transformer = FluxTransformer2DModel(
        patch_size=1,
        in_channels=16,
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=8,
        num_attention_heads=2,
        joint_attention_dim=16,
        pooled_projection_dim=16,
        guidance_embeds=guidance_embeds,
        axes_dims_rope=(2, 2, 4),
    )
    scheduler = FlowMatchEulerDiscreteScheduler(
        use_dynamic_shifting=True,
        base_shift=0.5,
        max_shift=1.15,
        base_image_seq_len=256,
        max_image_seq_len=4096,
    )
    FluxPipeline(
        scheduler=scheduler,
        vae=tiny_vae(),
        text_encoder=tiny_clip(tok, projection=False),
        tokenizer=tok,
        text_encoder_2=t5,
        tokenizer_2=t5tok,
        transformer=transformer,
    ).save_pretrained(folder)
