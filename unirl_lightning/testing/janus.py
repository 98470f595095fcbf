"""A tiny random Janus-Pro (transformers' `JanusForConditionalGeneration` and `JanusProcessor`), built
locally with no downloads: the real Janus code paths at test sizes, for tests and benchmarks."""

from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import nn

from unirl_lightning.worlds.words import world_words

JANUS_SPECIAL_TOKENS = (
    "<｜▁pad▁｜>",
    "<｜begin▁of▁sentence｜>",
    "<｜end▁of▁sentence｜>",
    "<image_placeholder>",
    "<begin_of_image>",
    "<end_of_image>",
    "<|User|>",
    "<|Assistant|>",
    "[UNK]",
)


def tiny_janus_components(
    hidden_size: int = 32,
    num_layers: int = 2,
    num_heads: int = 4,
    grid: int = 8,
    codebook_size: int = 64,
    vq_channels: int = 32,
    words: Sequence[str] | None = None,
    seed: int = 0,
) -> tuple[nn.Module, Any]:
    """A random `JanusForConditionalGeneration` and a `JanusProcessor` built locally.

    Word-level tokenizer over `words` (default: the synthetic world's words) plus Janus' special
    tokens; image: `grid x grid` tokens from a `codebook_size` codebook, decoded to
    `4 * grid` pixels; the vision encoder sees the same size in `grid x grid` patches.
    """
    from tokenizers import (
        Tokenizer,
        decoders,
        models,
        normalizers,
        pre_tokenizers,
        processors,
    )
    from transformers import (
        JanusConfig,
        JanusForConditionalGeneration,
        JanusImageProcessorPil,
        JanusProcessor,
        JanusVisionConfig,
        JanusVQVAEConfig,
        LlamaConfig,
        PreTrainedTokenizerFast,
    )

    pad, bos, eos, image, boi, eoi, *_ = JANUS_SPECIAL_TOKENS
    names = dict.fromkeys([*JANUS_SPECIAL_TOKENS, *(words or world_words()), ":"])
    vocab = {t: i for i, t in enumerate(names)}
    core = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    core.add_special_tokens(list(JANUS_SPECIAL_TOKENS))  # matched before normalising / splitting
    core.normalizer = normalizers.Lowercase()
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    core.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", special_tokens=[(bos, vocab[bos])]
    )
    core.decoder = decoders.WordPiece()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core,
        bos_token=bos,
        eos_token=eos,
        pad_token=pad,
        unk_token="[UNK]",
        extra_special_tokens={"image_token": image, "boi_token": boi, "eoi_token": eoi},
    )
    size = 4 * grid
    image_processor = JanusImageProcessorPil(
        size={"height": size, "width": size}, image_mean=[0.5] * 3, image_std=[0.5] * 3
    )
    processor = JanusProcessor(image_processor, tokenizer, num_image_tokens=grid * grid)
    config = JanusConfig(
        text_config=LlamaConfig(
            vocab_size=len(vocab),
            hidden_size=hidden_size,
            intermediate_size=2 * hidden_size,
            num_hidden_layers=num_layers,
            num_attention_heads=num_heads,
            num_key_value_heads=max(1, num_heads // 2),
            max_position_embeddings=1024,
            pad_token_id=vocab[pad],
            bos_token_id=vocab[bos],
            eos_token_id=vocab[eos],
        ),
        vision_config=JanusVisionConfig(
            hidden_size=hidden_size,
            num_hidden_layers=1,
            num_attention_heads=2,
            image_size=size,
            patch_size=4,
            projection_dim=hidden_size,
            depth=2,
            num_image_tokens=grid * grid,
            mlp_ratio=2.0,
        ),
        vq_config=JanusVQVAEConfig(
            embed_dim=8,
            num_embeddings=codebook_size,
            latent_channels=vq_channels,
            base_channels=vq_channels,
            channel_multiplier=[1, 1, 2],
            num_res_blocks=1,
            projection_dim=hidden_size,
            image_token_embed_dim=hidden_size,
        ),
        image_token_id=vocab[image],
    )
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = JanusForConditionalGeneration(config)
    # what transformers' image generate() reads (Janus' released generation_config.json sets them)
    model.generation_config.pad_token_id = vocab[pad]
    model.generation_config.generation_kwargs = {"boi_token_id": vocab[boi]}
    return model.eval(), processor
