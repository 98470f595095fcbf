"""GenEval's official detector through transformers: Mask2Former's instance post-processing pinned
to its definition, and the whole path on a tiny random Mask2Former (Swin) + CLIP."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
transformers = pytest.importorskip("transformers")
pytest.importorskip("PIL")

from unirl_lightning.evaluation import evaluate  # noqa: E402
from unirl_lightning.evaluation.mask2former import (  # noqa: E402
    Mask2FormerDetector,
    instance_detections,
    mask_boxes,
)
from unirl_lightning.evaluation.vocab import COLORS  # noqa: E402
from unirl_lightning.testing.rewards import tiny_clip  # noqa: E402

LABELS = {0: "cat", 1: "dog", 2: "bird"}


def test_mask_boxes_are_the_masks_extents():
    masks = torch.zeros(3, 5, 6, dtype=torch.bool)
    masks[0, 1:3, 2:5] = True
    masks[1, 4, 0] = True
    boxes = mask_boxes(masks)
    assert boxes.tolist() == [[2, 1, 5, 3], [0, 4, 1, 5], [0, 0, 0, 0]]  # x2, y2 exclusive; empty -> 0


def test_instance_detections_follow_mask2formers_definition():
    torch.manual_seed(0)
    q, c, h, w = 4, 3, 8, 10
    class_logits, mask_logits = torch.randn(q, c + 1), torch.randn(q, h, w) * 3
    scores, labels, masks, boxes = instance_detections(class_logits, mask_logits, max_per_image=5)
    probs = class_logits.softmax(-1)[:, :c]
    top = probs.flatten().topk(5)
    expected = []
    for p, idx in zip(top.values, top.indices):
        query, label = int(idx) // c, int(idx) % c
        binary = mask_logits[query] > 0
        mask_score = (mask_logits[query].sigmoid() * binary).sum() / (binary.sum() + 1e-6)
        expected.append((float(p * mask_score), label, binary))
    expected.sort(key=lambda e: -e[0])
    assert torch.allclose(scores, torch.tensor([e[0] for e in expected]), atol=1e-6)
    assert labels.tolist() == [e[1] for e in expected]
    assert all(torch.equal(m, e[2]) for m, e in zip(masks, expected))
    assert torch.equal(boxes, mask_boxes(masks)) and (scores[:-1] >= scores[1:]).all()
    # "no object" is never a label, and K is capped by the pairs there are
    assert instance_detections(class_logits, mask_logits, max_per_image=100)[0].shape == (q * c,)


def _tiny_mask2former(id2label: dict[int, str], decoder_layers: int = 2, num_queries: int = 6):
    """A random Mask2Former (Swin) at test size with these classes, and its image processor."""
    swin = transformers.SwinConfig(
        image_size=64, patch_size=4, embed_dim=8, depths=[1, 1, 1, 1], num_heads=[1, 1, 1, 1], window_size=2,
        out_features=["stage1", "stage2", "stage3", "stage4"],
    )  # fmt: skip
    config = transformers.Mask2FormerConfig(
        backbone_config=swin, feature_size=32, mask_feature_size=32, hidden_dim=32,
        encoder_feedforward_dim=32, dim_feedforward=32, encoder_layers=1, decoder_layers=decoder_layers,
        num_attention_heads=2, num_queries=num_queries, num_labels=len(id2label), id2label=id2label,
        label2id={v: k for k, v in id2label.items()},
    )  # fmt: skip
    torch.manual_seed(0)
    model = transformers.Mask2FormerForUniversalSegmentation(config)
    return model, transformers.Mask2FormerImageProcessorPil(size_divisor=32, do_reduce_labels=False)


@pytest.fixture(scope="module")
def detector() -> Mask2FormerDetector:
    model, processor = _tiny_mask2former(LABELS)
    clip, clip_processor = tiny_clip()
    return Mask2FormerDetector(
        model, processor, clip, clip_processor, max_per_image=8, shortest_edge=64, longest_edge=96,
        color_threshold=0.0,
    )  # fmt: skip


def _images(n: int = 2, h: int = 40, w: int = 56) -> torch.Tensor:
    return torch.randint(0, 256, (n, 3, h, w), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))


def test_detections_have_boxes_masks_and_colours_at_the_images_size(detector):
    images = _images()
    out = detector(images)
    assert len(out) == 2
    for dets in out:
        assert 0 < len(dets) <= 8
        scores = [d.score for d in dets]
        assert scores == sorted(scores, reverse=True) and all(0 <= s <= 1 for s in scores)
        for d in dets:
            assert d.label in LABELS.values() and d.color in COLORS
            assert d.mask.shape == (40, 56) and d.mask.dtype == torch.bool
            assert list(d.box) == mask_boxes(d.mask[None])[0].tolist()
            assert 0 <= d.box[0] <= d.box[2] <= 56 and 0 <= d.box[1] <= d.box[3] <= 40


def test_batched_detection_equals_one_image_at_a_time(detector):
    images = _images()
    together = detector.detect(images)
    for i in range(2):
        alone = detector.detect(images[i : i + 1])[0]
        assert [(d.label, d.box) for d in alone] == [(d.label, d.box) for d in together[i]]
        assert [d.score for d in alone] == pytest.approx([d.score for d in together[i]], abs=1e-5)


def test_detections_feed_genevals_rules(detector):
    images = _images(1)
    dets = detector(images)[0]
    for d in dets:
        d.score = 0.95  # every detection above both thresholds: the rules decide on counts and colours
    label = dets[0].label
    n = sum(d.label == label for d in dets)
    spec = {"tag": "counting", "include": [{"class": label, "count": n}], "prompt": f"{n} {label}s"}
    assert evaluate(spec, dets).correct
    too_many = {"tag": "counting", "include": [{"class": label, "count": n + 1}], "prompt": "more"}
    assert not evaluate(too_many, dets).correct
    with pytest.raises(ValueError, match="uint8"):
        detector(images.float())


COCO_ORDER_RENAMED = {64: "mouse", 65: "remote", 66: "keyboard"}  # COCO's names where GenEval's differ


def _coco_id2label() -> dict[int, str]:
    from unirl_lightning.evaluation.vocab import load_geneval_constants

    names = dict(enumerate(load_geneval_constants()["geneval_object_names"]))
    return {**names, **COCO_ORDER_RENAMED}


def test_a_coco_model_is_named_by_genevals_object_names():
    """GenEval's evaluator names class i `object_names.txt[i]`: COCO's "mouse" is its "computer mouse"."""
    from unirl_lightning.evaluation.mask2former import geneval_class_names

    names = geneval_class_names(_coco_id2label())
    assert len(names) == 80 and names[0] == "person"
    assert [names[i] for i in COCO_ORDER_RENAMED] == ["computer mouse", "tv remote", "computer keyboard"]
    assert geneval_class_names({i: f"LABEL_{i}" for i in range(80)}) == names  # unnamed config: by index
    assert geneval_class_names(LABELS) == ["cat", "dog", "bird"]  # not COCO's 80: the model's own names
    assert geneval_class_names(LABELS, ["a", "b", "c"]) == ["a", "b", "c"]


def test_class_names_that_would_misname_objects_are_refused():
    from unirl_lightning.evaluation.mask2former import geneval_class_names

    shuffled = _coco_id2label()
    shuffled[0], shuffled[1] = shuffled[1], shuffled[0]
    misnamed = r"not COCO's order.*0: 'bicycle' \(GenEval: 'person'\).*class_names"
    with pytest.raises(ValueError, match=misnamed):
        geneval_class_names(shuffled)
    with pytest.raises(ValueError, match="class_names has 2 names, the model has 3 classes"):
        geneval_class_names(LABELS, ["a", "b"])


def test_detections_of_a_coco_model_carry_genevals_names():
    model, processor = _tiny_mask2former(_coco_id2label(), decoder_layers=1, num_queries=4)
    with torch.no_grad():  # every query says "mouse": GenEval calls it "computer mouse"
        model.class_predictor.bias.fill_(-10.0)
        model.class_predictor.bias[64] = 10.0
    det = Mask2FormerDetector(model, processor, max_per_image=3, shortest_edge=64, longest_edge=96)
    labels = {d.label for d in det(_images(1))[0]}
    assert labels == {"computer mouse"}
