"""Detectors for GenEval scoring: the protocol, GenEval's CLIP colour recipe, and an open-vocabulary
OWLv2 + CLIP detector.

GenEval itself uses Mask2Former (mmdet) for boxes and masks and CLIP ViT-L/14 for colours
(`evaluation.mask2former` runs that pipeline through transformers). `TransformersDetector` swaps
Mask2Former for OWLv2 (open vocabulary) and keeps GenEval's colour recipe (`CLIPColorDetector`):
each object cropped to its box (over #999 grey outside its mask when there is one), zero-shot
classified over the ten colours with GenEval's three templates.
transformers is imported only by `from_pretrained`, so importing this module stays cheap.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import math
from typing import Any, Sequence

import numpy as np
import torch
from torch import Tensor

from unirl_lightning.evaluation.detection import Detection, Detector
from unirl_lightning.evaluation.vocab import BACKGROUND, COLORS, load_geneval_constants

__all__ = ["Detection", "Detector", "CLIPColorDetector", "TransformersDetector", "COLOR_TEMPLATES"]

#: GenEval's colour prompts; `{c}` is a colour, `{classname}` the object class.
COLOR_TEMPLATES: tuple[str, ...] = (
    "a photo of a {c} {classname}",
    "a photo of a {c}-colored {classname}",
    "a photo of a {c} object",
)


def _features(out: Any) -> Tensor:
    """Embeddings from get_text/image_features: a tensor (transformers 4) or an output's pooler_output (5)."""
    return out if isinstance(out, Tensor) else out.pooler_output


def _to_pil(array: np.ndarray) -> Any:
    """HWC uint8 -> PIL image: unambiguous channel layout for the processors, even for 1x3 crops."""
    from PIL import Image

    return Image.fromarray(array)


def _box_iou(a: Tensor, b: Tensor) -> Tensor:
    """IoU of boxes a `[N, 4]` and b `[M, 4]` (x1, y1, x2, y2) -> `[N, M]`."""
    lt = torch.maximum(a[:, None, :2], b[None, :, :2])
    rb = torch.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = (rb - lt).clamp(min=0).prod(-1)
    area = lambda x: (x[:, 2:] - x[:, :2]).clamp(min=0).prod(-1)  # noqa: E731
    return inter / (area(a)[:, None] + area(b)[None, :] - inter).clamp(min=1e-9)


def _nms(boxes: Tensor, scores: Tensor, labels: Tensor, iou: float) -> Tensor:
    """Greedy class-wise NMS; returns kept indices `[K]`, by descending score."""
    order = scores.argsort(descending=True)
    same_class = labels[order][:, None] == labels[order][None, :]
    overlap = (_box_iou(boxes[order], boxes[order]) > iou) & same_class
    keep = torch.ones(len(order), dtype=torch.bool)
    for i in range(len(order)):
        if keep[i]:
            keep[i + 1 :] &= ~overlap[i, i + 1 :]
    return order[keep]


class CLIPColorDetector:
    """GenEval's colour recipe on top of a detector's boxes (and masks): each detection scoring above
    `color_threshold` is cropped to its box over #999 grey outside its mask, and zero-shot classified
    by a CLIP model over the ten colours with GenEval's three templates.

    Args:
        clip_model, clip_processor: a CLIP-like model with `get_image_features`/`get_text_features`
            and its processor; None skips colour classification (colours stay None).
        color_threshold: only detections scoring above this get a colour (saves CLIP calls).
        clip_batch_size: crops per CLIP forward.
    """

    def __init__(
        self,
        clip_model: Any | None = None,
        clip_processor: Any | None = None,
        *,
        color_threshold: float = 0.3,
        colors: Sequence[str] = COLORS,
        color_templates: Sequence[str] = COLOR_TEMPLATES,
        clip_batch_size: int = 32,
    ) -> None:
        self.clip_model = clip_model.eval() if clip_model is not None else None
        self.clip_processor = clip_processor
        self.color_threshold, self.clip_batch_size = color_threshold, clip_batch_size
        self.colors, self.color_templates = tuple(colors), tuple(color_templates)
        self._color_classifiers: dict[str, Tensor] = {}  # class name -> unit text embeddings [C, D]

    @staticmethod
    def _check_images(images: Tensor) -> None:
        if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"images must be uint8 [N, 3, H, W], got {images.dtype} {tuple(images.shape)}")

    def _color_classifier(self, classname: str) -> Tensor:
        """Unit text embeddings `[C, D]`: per colour, the mean of the templates' unit embeddings."""
        if classname not in self._color_classifiers:
            model, tok = self.clip_model, getattr(self.clip_processor, "tokenizer", self.clip_processor)
            device = next(model.parameters()).device
            texts = [t.format(c=c, classname=classname) for c in self.colors for t in self.color_templates]
            enc = tok(texts, padding=True, truncation=True, return_tensors="pt").to(device)
            emb = _features(
                model.get_text_features(input_ids=enc["input_ids"], attention_mask=enc.get("attention_mask"))
            )
            emb = torch.nn.functional.normalize(emb.float(), dim=-1).view(
                len(self.colors), len(self.color_templates), -1
            )
            self._color_classifiers[classname] = torch.nn.functional.normalize(emb.mean(1), dim=-1)
        return self._color_classifiers[classname]

    @staticmethod
    def crop(image: np.ndarray, det: Detection) -> np.ndarray:
        """GenEval's colour crop: image HWC uint8, outside the mask painted #999, cut to the box."""
        h, w = image.shape[:2]
        if det.mask is not None:
            mask = np.asarray(det.mask.cpu() if isinstance(det.mask, Tensor) else det.mask, dtype=bool)
            if mask.shape != (h, w):
                raise ValueError(
                    f"a detection mask must be [H, W] = {(h, w)} like its image, got {mask.shape}"
                )
            image = np.where(mask[..., None], image, np.asarray(BACKGROUND, dtype=np.uint8))
        x1, y1 = max(0, math.floor(det.box[0])), max(0, math.floor(det.box[1]))
        x2, y2 = min(w, max(math.ceil(det.box[2]), x1 + 1)), min(h, max(math.ceil(det.box[3]), y1 + 1))
        return np.ascontiguousarray(image[min(y1, h - 1) : y2, min(x1, w - 1) : x2])

    @torch.no_grad()
    def classify_colors(self, images: Tensor, detections: list[list[Detection]]) -> list[list[Detection]]:
        """Fill `color` on every detection scoring above `color_threshold` (others keep theirs)."""
        model = self.clip_model
        if model is None:
            raise RuntimeError("classify_colors needs a CLIP model; construct the detector with clip_model")
        device = next(model.parameters()).device
        arrays = images.permute(0, 2, 3, 1).cpu().numpy()
        todo = [
            (i, j)
            for i, dets in enumerate(detections)
            for j, d in enumerate(dets)
            if d.score > self.color_threshold
        ]
        out = [list(dets) for dets in detections]
        for start in range(0, len(todo), self.clip_batch_size):
            chunk = todo[start : start + self.clip_batch_size]
            crops = [_to_pil(self.crop(arrays[i], detections[i][j])) for i, j in chunk]
            pixels = self.clip_processor(images=crops, return_tensors="pt")["pixel_values"].to(
                device, model.dtype
            )
            feats = torch.nn.functional.normalize(
                _features(model.get_image_features(pixel_values=pixels)).float(), dim=-1
            )
            for (i, j), f in zip(chunk, feats):
                det = detections[i][j]
                color = self.colors[int((self._color_classifier(det.label) @ f).argmax())]
                out[i][j] = dataclasses.replace(det, color=color)
        return out


class TransformersDetector(CLIPColorDetector):
    """Open-vocabulary GenEval detector: OWLv2 boxes + CLIP zero-shot colours (`CLIPColorDetector`).

    Args:
        detector_model, detector_processor: an `Owlv2ForObjectDetection` and its `Owlv2Processor`.
        clip_model, clip_processor: a CLIP-like model with `get_image_features`/`get_text_features`
            and its processor; None skips colour classification (colours stay None).
        classes: default vocabulary when a call passes none (GenEval's 80 object names).
        query_template: how a class name becomes an OWLv2 text query.
        score_threshold: detections at or below this are dropped (GenEval thresholds later, at 0.3/0.9).
        nms_iou: class-wise NMS IoU (None: off). GenEval applies no NMS because Mask2Former makes set
            predictions; OWLv2 scores dense per-patch boxes, so duplicates must go here, not in scoring.
        color_threshold: only detections scoring above this get a colour (saves CLIP calls).
        max_detections: cap per image after NMS.
    """

    def __init__(
        self,
        detector_model: Any,
        detector_processor: Any,
        clip_model: Any | None = None,
        clip_processor: Any | None = None,
        *,
        classes: Sequence[str] | None = None,
        query_template: str = "a photo of a {}",
        score_threshold: float = 0.1,
        nms_iou: float | None = 0.5,
        color_threshold: float = 0.3,
        max_detections: int = 100,
        colors: Sequence[str] = COLORS,
        color_templates: Sequence[str] = COLOR_TEMPLATES,
        clip_batch_size: int = 32,
    ) -> None:
        if importlib.util.find_spec("scipy") is None:  # OWLv2's image processor resizes with scipy
            raise ImportError(
                "TransformersDetector: OWLv2's image processor needs scipy; install the detector "
                "extra: pip install 'unirl-lightning[detectors]' (or pip install scipy)"
            )
        super().__init__(
            clip_model,
            clip_processor,
            color_threshold=color_threshold,
            colors=colors,
            color_templates=color_templates,
            clip_batch_size=clip_batch_size,
        )
        self.detector_model = detector_model.eval()
        self.detector_processor = detector_processor
        self.classes = (
            tuple(classes) if classes is not None else tuple(load_geneval_constants()["geneval_object_names"])
        )
        self.query_template = query_template
        self.score_threshold, self.nms_iou, self.max_detections = score_threshold, nms_iou, max_detections

    @classmethod
    def from_pretrained(
        cls, detector_path: str, clip_path: str | None, *, device: str | torch.device = "cpu", **kwargs: Any
    ) -> "TransformersDetector":
        """Load OWLv2 from `detector_path` and CLIP from `clip_path` (local dirs or Hub ids);
        other kwargs go to `__init__`. Example: ("google/owlv2-base-patch16-ensemble",
        "openai/clip-vit-large-patch14")."""
        from transformers import AutoModel, AutoProcessor, Owlv2ForObjectDetection

        det = Owlv2ForObjectDetection.from_pretrained(detector_path).to(device)
        det_proc = AutoProcessor.from_pretrained(detector_path)
        clip = clip_proc = None
        if clip_path is not None:
            clip = AutoModel.from_pretrained(clip_path).to(device)
            clip_proc = AutoProcessor.from_pretrained(clip_path)
        return cls(det, det_proc, clip, clip_proc, **kwargs)

    # ----------------------------------------------------------------------------------

    @torch.no_grad()
    def __call__(self, images: Tensor, classes: Sequence[str] | None = None) -> list[list[Detection]]:
        """images uint8 `[N, 3, H, W]` -> per image, detections sorted by score (colours filled in)."""
        self._check_images(images)
        classes = tuple(dict.fromkeys(classes)) if classes else self.classes
        detections = self.detect_boxes(images, classes)
        if self.clip_model is not None:
            detections = self.classify_colors(images, detections)
        return detections

    @torch.no_grad()
    def detect_boxes(self, images: Tensor, classes: Sequence[str]) -> list[list[Detection]]:
        """OWLv2 boxes: images uint8 `[N, 3, H, W]` -> per image, Detections (color None), score-sorted."""
        n, _, h, w = images.shape
        model = self.detector_model
        device = next(model.parameters()).device
        queries = [self.query_template.format(c) for c in classes]
        pils = [_to_pil(a) for a in images.permute(0, 2, 3, 1).cpu().numpy()]
        inputs = self.detector_processor(
            text=[queries] * n, images=pils, return_tensors="pt", truncation=True
        )
        inputs = {k: v.to(device) for k, v in inputs.items()}
        if "pixel_values" in inputs:
            inputs["pixel_values"] = inputs["pixel_values"].to(model.dtype)
        out = model(**inputs)
        probs = out.logits.float().sigmoid()[..., : len(classes)]  # [N, Q, C]
        scores, labels = probs.max(-1)  # one label per box, as OWL's own post-processing
        # boxes are (cx, cy, w, h) relative to the square the processor pads to (bottom / right)
        cx, cy, bw, bh = out.pred_boxes.float().unbind(-1)
        side = float(max(h, w))
        boxes = torch.stack([cx - bw / 2, cy - bh / 2, cx + bw / 2, cy + bh / 2], -1) * side
        boxes = torch.minimum(
            boxes.clamp(min=0), torch.tensor([w, h, w, h], dtype=boxes.dtype, device=boxes.device)
        )
        results: list[list[Detection]] = []
        for i in range(n):
            keep = (scores[i] > self.score_threshold).nonzero().squeeze(-1)
            b, s, lab = boxes[i, keep].cpu(), scores[i, keep].cpu(), labels[i, keep].cpu()
            order = _nms(b, s, lab, self.nms_iou) if self.nms_iou is not None else s.argsort(descending=True)
            order = order[: self.max_detections]
            results.append(
                [Detection(classes[int(lab[j])], float(s[j]), tuple(b[j].tolist())) for j in order]
            )
        return results


class PretrainedDetector(TransformersDetector):
    """`TransformersDetector` built from paths, so a YAML config can name it:

    detector:
      class_path: unirl_lightning.evaluation.PretrainedDetector
      init_args: {detector_path: google/owlv2-base-patch16-ensemble, clip_path: openai/clip-vit-large-patch14}
    """

    def __init__(self, detector_path: str, clip_path: str | None = None, device: str = "cpu", **kwargs: Any):
        loaded = TransformersDetector.from_pretrained(detector_path, clip_path, device=device)
        super().__init__(
            loaded.detector_model,
            loaded.detector_processor,
            loaded.clip_model,
            loaded.clip_processor,
            **kwargs,
        )
