"""Tiny random reward models built locally (no downloads): a CLIP model and processor, and a TrOCR-style
OCR model (ViT encoder, TrOCR decoder) with a character tokenizer, for the reward models' tests."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

OCR_CHARS = "abcdefghijklmnopqrstuvwxyz0123456789 "


def tiny_clip(image_size: int = 32, dim: int = 16, seed: int = 0) -> tuple[nn.Module, Any]:
    """A random `CLIPModel` (1 layer per tower, `dim` wide) and its `CLIPProcessor`: a byte-level
    tokenizer with no merges (every character a token), images resized to `image_size`."""
    import transformers
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    chars = list(bytes_to_unicode().values())
    vocab = {c: i for i, c in enumerate(chars + [c + "</w>" for c in chars])}
    vocab.update({"<|startoftext|>": len(vocab), "<|endoftext|>": len(vocab) + 1})
    tok = transformers.CLIPTokenizer(vocab=vocab, merges=[], model_max_length=32)
    tower = dict(hidden_size=dim, intermediate_size=2 * dim, num_hidden_layers=1, num_attention_heads=2)
    text = dict(
        tower,
        vocab_size=len(vocab),
        max_position_embeddings=32,
        bos_token_id=vocab["<|startoftext|>"],
        eos_token_id=vocab["<|endoftext|>"],
        pad_token_id=vocab["<|endoftext|>"],
    )
    vision = dict(tower, image_size=image_size, patch_size=8)
    torch.manual_seed(seed)
    model = transformers.CLIPModel(
        transformers.CLIPConfig(text_config=text, vision_config=vision, projection_dim=dim)
    )
    size = {"shortest_edge": image_size}, {"height": image_size, "width": image_size}
    processor = transformers.CLIPProcessor(
        transformers.CLIPImageProcessorPil(size=size[0], crop_size=size[1]), tok
    )
    return model, processor


def tiny_ocr(image_size: int = 32, dim: int = 16, seed: int = 0) -> tuple[nn.Module, Any]:
    """A random `VisionEncoderDecoderModel` (ViT encoder, TrOCR decoder; 1 layer each) and a
    `TrOCRProcessor` whose tokenizer has one token per character of `OCR_CHARS`."""
    import transformers
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3, **{c: i + 4 for i, c in enumerate(OCR_CHARS)}}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer, core.decoder = pre_tokenizers.Split("", "isolated"), decoders.Fuse()
    tok = transformers.PreTrainedTokenizerFast(
        tokenizer_object=core, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )
    encoder = transformers.ViTConfig(
        hidden_size=dim,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=2 * dim,
        image_size=image_size,
        patch_size=8,
    )
    decoder = transformers.TrOCRConfig(
        vocab_size=len(vocab),
        d_model=dim,
        decoder_layers=1,
        decoder_attention_heads=2,
        decoder_ffn_dim=2 * dim,
        max_position_embeddings=64,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        decoder_start_token_id=1,
    )
    torch.manual_seed(seed)
    config = transformers.VisionEncoderDecoderConfig.from_encoder_decoder_configs(encoder, decoder)
    model = transformers.VisionEncoderDecoderModel(config=config)
    for cfg in (model.config, model.generation_config):
        cfg.decoder_start_token_id, cfg.pad_token_id, cfg.eos_token_id = 1, 0, 2
    image_processor = transformers.ViTImageProcessorPil(size={"height": image_size, "width": image_size})
    return model, transformers.TrOCRProcessor(image_processor=image_processor, tokenizer=tok)
