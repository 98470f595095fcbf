"""TransformersDetector on tiny random OWLv2 + CLIP models: the code path, not accuracy."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
transformers = pytest.importorskip("transformers")
pytest.importorskip("PIL")

from unirl_lightning.evaluation import Detection, Detector, TransformersDetector, evaluate  # noqa: E402
from unirl_lightning.worlds.vocab import COLORS  # noqa: E402


def _tiny_tokenizer():
    """A byte-level CLIP tokenizer with no merges: every character is a token."""
    keep = [b for b in range(256) if 33 <= b <= 126 or 161 <= b <= 172 or 174 <= b <= 255]
    chars = [chr(b) for b in keep] + [chr(256 + i) for i in range(256 - len(keep))]  # GPT-2's byte alphabet
    vocab = {c: i for i, c in enumerate(chars)}  # "!" is id 0: OWLv2's pad token
    vocab.update({c + "</w>": len(chars) + i for i, c in enumerate(chars)})
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)  # highest id: OWL pools the text at the argmax id
    return transformers.CLIPTokenizer(vocab=vocab, merges=[], model_max_length=16, pad_token="!")


@pytest.fixture(scope="module")
def detector() -> TransformersDetector:
    torch.manual_seed(0)
    tok = _tiny_tokenizer()
    text = dict(
        vocab_size=len(tok),
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        max_position_embeddings=16,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=0,
    )
    vision = dict(
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        image_size=32,
        patch_size=8,
    )
    owl = transformers.Owlv2ForObjectDetection(
        transformers.Owlv2Config(text_config=text, vision_config=vision, projection_dim=16)
    )
    owl_proc = transformers.Owlv2Processor(
        transformers.Owlv2ImageProcessorPil(size={"height": 32, "width": 32}), tok
    )
    clip = transformers.CLIPModel(
        transformers.CLIPConfig(text_config=text, vision_config=vision, projection_dim=16)
    )
    clip_proc = transformers.CLIPProcessor(
        transformers.CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}),
        tok,
    )
    return TransformersDetector(
        owl, owl_proc, clip, clip_proc, score_threshold=0.0, color_threshold=0.0, max_detections=8
    )


def test_detections_have_the_contract_types(detector):
    assert isinstance(detector, Detector)
    images = torch.randint(0, 256, (2, 3, 40, 48), dtype=torch.uint8)  # non-square: boxes scale by max(H, W)
    out = detector(images, ["dog", "cat", "dog"])
    assert len(out) == 2
    for dets in out:
        assert 0 < len(dets) <= 8
        assert [d.score for d in dets] == sorted((d.score for d in dets), reverse=True)
        for d in dets:
            assert isinstance(d, Detection) and d.label in {"dog", "cat"} and d.color in COLORS
            x1, y1, x2, y2 = d.box
            assert 0 <= x1 <= x2 <= 48 and 0 <= y1 <= y2 <= 40
    # the output feeds GenEval scoring as is
    spec = {"tag": "colors", "include": [{"class": "dog", "count": 1, "color": "red"}], "prompt": "a red dog"}
    assert isinstance(evaluate(spec, out[0]).correct, bool)


def test_color_crop_uses_mask_over_grey(detector):
    image = torch.full((1, 3, 8, 8), 200, dtype=torch.uint8)
    mask = torch.zeros(8, 8, dtype=torch.bool)
    mask[2:4, 2:4] = True
    crop = detector.crop(
        image[0].permute(1, 2, 0).numpy(), Detection("dog", 0.9, (1.5, 1.5, 5.0, 5.0), mask=mask)
    )
    assert crop.shape == (4, 4, 3)  # floor / ceil of the box
    assert (crop[1:3, 1:3] == 200).all() and (crop[0] == 153).all()  # outside the mask: #999
    dets = detector.classify_colors(image, [[Detection("dog", 0.9, (1.5, 1.5, 5.0, 5.0), mask=mask)]])
    assert dets[0][0].color in COLORS


def test_rejects_non_uint8_images(detector):
    with pytest.raises(ValueError, match="uint8"):
        detector(torch.rand(1, 3, 32, 32), ["dog"])


def test_a_missing_scipy_names_the_extra_to_install(monkeypatch):
    import importlib.util

    from unirl_lightning.evaluation.detectors import TransformersDetector

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "scipy" else find_spec(name, *a)
    )
    with pytest.raises(ImportError, match=r"unirl-lightning\[detectors\]"):
        TransformersDetector(torch.nn.Linear(1, 1), None)
