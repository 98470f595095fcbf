"""GenEval's official detector through transformers: Mask2Former instance segmentation + CLIP colours.

The official evaluator (`evaluate_images.py` of GenEval) runs mmdet's Mask2Former (Swin-S, COCO
instances) and reads every detection of its instance post-processing: the top `max_per_image` (100)
of all query x class probabilities, each scored `class probability x mask score` (the mean sigmoid
inside its binary mask), its box the extent of that mask. `Mask2FormerDetector` runs
transformers' `Mask2FormerForUniversalSegmentation` with the same image pipeline (shorter side
800, longer at most 1333, ImageNet normalisation, padded to 32) and the same post-processing
(`instance_detections`), so GenEval's thresholds (0.3, counting 0.9), per-class cap and position
rule (`evaluation.geneval`) apply to its detections unchanged; colours are `CLIPColorDetector`'s,
GenEval's own recipe.

The official weights are mmdet's training; transformers' COCO-instance checkpoints are another
training of the same architecture, so detections differ somewhat from the official evaluator's
(`benchmarks/geneval_agreement.py` measures the agreement on a user's images).

Class names: GenEval names a detection by its class index in its own `object_names.txt` (COCO's 80
classes in COCO's order, three renamed: "computer mouse", "tv remote", "computer keyboard"), not by
the detector's label names. A COCO model's `id2label` says "mouse", "remote", "keyboard", which
would never match a GenEval prompt, so an 80-class model is named by GenEval's list, after a check
that its `id2label` is in COCO's order.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from unirl_lightning.evaluation.detection import Detection
from unirl_lightning.evaluation.detectors import CLIPColorDetector, _to_pil
from unirl_lightning.evaluation.vocab import load_geneval_constants

#: COCO / Pascal spellings of GenEval's object names, for the check that a model's classes are COCO's.
_COCO_SPELLINGS = {
    "mouse": "computer mouse", "remote": "tv remote", "keyboard": "computer keyboard",
    "tvmonitor": "tv", "tv monitor": "tv", "motorbike": "motorcycle", "aeroplane": "airplane",
    "sofa": "couch", "pottedplant": "potted plant", "diningtable": "dining table",
    "hair dryer": "hair drier",
}  # fmt: skip


def geneval_class_names(id2label: dict[int, str], class_names: Sequence[str] | None = None) -> list[str]:
    """The name of each class index, as GenEval's evaluator names it.

    `class_names` if given (one per class); else, for a model with GenEval's 80 classes, GenEval's
    object names by index (its evaluator's `classnames[index]`); else the model's `id2label`.
    Raises ValueError when `class_names` has the wrong length, or when an 80-class model's `id2label`
    is not COCO's classes in COCO's order (the index would name the wrong object).
    """
    n = len(id2label)
    if class_names is not None:
        if len(class_names) != n:
            raise ValueError(
                f"class_names has {len(class_names)} names, the model has {n} classes: give one name per "
                "class index, in the model's order"
            )
        return list(class_names)
    geneval = list(load_geneval_constants()["geneval_object_names"])
    if n != len(geneval):
        return [id2label[i] for i in range(n)]
    mismatched = []
    for i, name in enumerate(geneval):
        label = " ".join(str(id2label[i]).lower().replace("_", " ").replace("-", " ").split())
        generic = label == f"label {i}"  # a config without names: trust the index
        if not generic and _COCO_SPELLINGS.get(label, label) != name:
            mismatched.append(f"{i}: {id2label[i]!r} (GenEval: {name!r})")
    if mismatched:
        raise ValueError(
            f"the detector has 80 classes but its id2label is not COCO's order, so GenEval's names by "
            f"index would be wrong at {', '.join(mismatched[:5])}{' ...' if len(mismatched) > 5 else ''}; "
            "use a Mask2Former trained on COCO instances, or pass class_names (one per class index)"
        )
    return geneval


def mask_boxes(masks: Tensor) -> Tensor:
    """`[K, 4]` (x1, y1, x2, y2) extents of bool masks `[K, H, W]` (x2, y2 exclusive; empty -> zeros)."""
    k, h, w = masks.shape
    cols, rows = masks.any(1), masks.any(2)  # [K, W], [K, H]
    xs, ys = torch.arange(w, device=masks.device), torch.arange(h, device=masks.device)
    x1 = torch.where(cols, xs, w).amin(1)
    x2 = torch.where(cols, xs + 1, 0).amax(1)
    y1 = torch.where(rows, ys, h).amin(1)
    y2 = torch.where(rows, ys + 1, 0).amax(1)
    boxes = torch.stack([x1, y1, x2, y2], 1).float()
    return torch.where(cols.any(1, keepdim=True), boxes, torch.zeros_like(boxes))


def instance_detections(
    class_logits: Tensor, mask_logits: Tensor, max_per_image: int = 100
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Mask2Former's instance post-processing of one image (mmdet's, as GenEval reads it).

    class_logits `[Q, C + 1]` (the last class is "no object"); mask_logits `[Q, H, W]` at the image's
    size. Returns scores `[K]`, labels `[K]`, bool masks `[K, H, W]` and boxes `[K, 4]` for the top
    K = min(max_per_image, Q * C) query-class pairs by class probability, scored
    `p(class) * mean(sigmoid(mask) inside mask > 0)`, sorted by that score.
    """
    q, c = class_logits.shape[0], class_logits.shape[1] - 1
    probs = class_logits.float().softmax(-1)[:, :c].flatten()  # [Q * C], query-major
    top, index = probs.topk(min(max_per_image, q * c))
    labels, queries = index % c, index // c
    logits = mask_logits[queries].float()
    binary = logits > 0
    mask_score = (logits.sigmoid() * binary).flatten(1).sum(1) / (binary.flatten(1).sum(1) + 1e-6)
    scores = top * mask_score
    order = scores.argsort(descending=True)
    return scores[order], labels[order], binary[order], mask_boxes(binary[order])


class Mask2FormerDetector(CLIPColorDetector):
    """GenEval's detector: Mask2Former instances (boxes, masks, scores) + CLIP colours on masked crops.

    Args:
        model, processor: a `Mask2FormerForUniversalSegmentation` trained on COCO instances and its
            image processor (its `id2label` names the classes; GenEval's object names are COCO's).
        clip_model, clip_processor: CLIP ViT-L/14 (GenEval's colour classifier) and its processor.
        max_per_image: detections kept per image before GenEval's thresholds (mmdet's 100).
        shortest_edge / longest_edge: the resize of mmdet's test pipeline (800, 1333).
        color_threshold, clip_batch_size: as `CLIPColorDetector`.
        class_names: the name of each class index (default: `geneval_class_names`, GenEval's own
            names for a COCO model).
    """

    def __init__(
        self,
        model: Any,
        processor: Any,
        clip_model: Any | None = None,
        clip_processor: Any | None = None,
        *,
        max_per_image: int = 100,
        shortest_edge: int = 800,
        longest_edge: int = 1333,
        color_threshold: float = 0.3,
        clip_batch_size: int = 32,
        class_names: Sequence[str] | None = None,
    ) -> None:
        super().__init__(
            clip_model, clip_processor, color_threshold=color_threshold, clip_batch_size=clip_batch_size
        )
        self.model, self.processor = model.eval(), processor
        self.max_per_image = max_per_image
        self.size = {"shortest_edge": shortest_edge, "longest_edge": longest_edge}
        self.class_names = geneval_class_names(
            {int(k): v for k, v in model.config.id2label.items()}, class_names
        )

    @classmethod
    def from_pretrained(
        cls,
        model_path: str = "facebook/mask2former-swin-small-coco-instance",
        clip_path: str | None = "openai/clip-vit-large-patch14",
        *,
        device: str | torch.device = "cpu",
        **kwargs: Any,
    ) -> "Mask2FormerDetector":
        """Mask2Former from `model_path` and CLIP from `clip_path` (local folders or Hub ids)."""
        from transformers import (
            AutoImageProcessor,
            AutoModel,
            AutoProcessor,
            Mask2FormerForUniversalSegmentation,
        )

        model = Mask2FormerForUniversalSegmentation.from_pretrained(model_path).to(device)
        clip = clip_proc = None
        if clip_path is not None:
            clip, clip_proc = (
                AutoModel.from_pretrained(clip_path).to(device),
                AutoProcessor.from_pretrained(clip_path),
            )
        return cls(model, AutoImageProcessor.from_pretrained(model_path), clip, clip_proc, **kwargs)

    @torch.no_grad()
    def __call__(self, images: Tensor, classes: Sequence[str] | None = None) -> list[list[Detection]]:
        """images uint8 `[N, 3, H, W]` -> per image, detections sorted by score (colours filled in).
        Mask2Former's classes are closed (COCO): `classes` is accepted for the protocol and not used."""
        self._check_images(images)
        detections = self.detect(images)
        return self.classify_colors(images, detections) if self.clip_model is not None else detections

    @torch.no_grad()
    def detect(self, images: Tensor) -> list[list[Detection]]:
        """Detections with boxes and masks at the images' size (colour None), score-sorted."""
        n, _, h, w = images.shape
        device = next(self.model.parameters()).device
        pils = [_to_pil(a) for a in images.permute(0, 2, 3, 1).cpu().numpy()]
        inputs = self.processor(images=pils, size=self.size, return_tensors="pt")
        pixels = inputs["pixel_values"].to(device, self.model.dtype)
        pixel_mask = inputs.get("pixel_mask")
        out = self.model(
            pixel_values=pixels, pixel_mask=None if pixel_mask is None else pixel_mask.to(device)
        )
        # mask logits: to the padded input, cut to each resized image, then to the image's own size
        masks = F.interpolate(out.masks_queries_logits.float(), size=pixels.shape[-2:], mode="bilinear",
                              align_corners=False)  # fmt: skip
        results = []
        for i in range(n):
            if pixel_mask is None:
                rh, rw = pixels.shape[-2:]
            else:
                rh, rw = int(pixel_mask[i].any(1).sum()), int(pixel_mask[i].any(0).sum())
            logits = F.interpolate(masks[i : i + 1, :, :rh, :rw], size=(h, w), mode="bilinear",
                                   align_corners=False)[0]  # fmt: skip
            scores, labels, binary, boxes = instance_detections(
                out.class_queries_logits[i], logits, self.max_per_image
            )
            results.append(
                [
                    Detection(self.class_names[int(lab)], float(sc), tuple(box.tolist()), mask=m.cpu())
                    for sc, lab, m, box in zip(scores, labels, binary, boxes)
                ]
            )
        return results


class PretrainedMask2FormerDetector(Mask2FormerDetector):
    """`Mask2FormerDetector` built from paths, so a YAML config can name it:

    detector:
      class_path: unirl_lightning.evaluation.PretrainedMask2FormerDetector
      init_args: {model_path: facebook/mask2former-swin-small-coco-instance,
                  clip_path: openai/clip-vit-large-patch14, device: cuda}
    """

    def __init__(
        self,
        model_path: str = "facebook/mask2former-swin-small-coco-instance",
        clip_path: str | None = "openai/clip-vit-large-patch14",
        device: str = "cpu",
        **kwargs: Any,
    ):
        loaded = Mask2FormerDetector.from_pretrained(model_path, clip_path, device=device)
        super().__init__(loaded.model, loaded.processor, loaded.clip_model, loaded.clip_processor, **kwargs)
