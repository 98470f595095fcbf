"""Rewards scored by pretrained models through transformers: CLIPScore, PickScore, an aesthetic
predictor, OCR accuracy and a VLM judge.

Each `ModelReward` runs its model on its own `device` and `dtype` (a second GPU of the same process
keeps heavy reward models off the policy's memory), in batches of `batch_size`, without gradients,
and returns `[N]` float rewards on the CPU. `combine_rewards` logs each term's mean and its time
(`time/reward/<name>`), so a slow reward shows in the step's time split. Models load from a local
folder or Hub id (`from_pretrained` on a user's machine); the tests build tiny random ones.
"""

from __future__ import annotations

import re
from abc import abstractmethod
from typing import Any, Sequence

import torch
from torch import Tensor, nn

from unirl_lightning.rewards.base import RewardFunction, RolloutContext

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _features(out: Any) -> Tensor:
    """Embeddings from get_text/image_features: a tensor (transformers 4) or an output's pooler_output (5)."""
    return out if isinstance(out, Tensor) else out.pooler_output


class ModelReward(RewardFunction):
    """A reward term computed by neural models: batched, on `device` in `dtype`, no gradients.

    Subclasses set their models with `place(...)` and implement `score(images, specs) -> [n]`.

    Args:
        device: where the reward models run ("cpu", "cuda", "cuda:1", ...), apart from the policy's.
        dtype: "float32", "bfloat16" or "float16".
        batch_size: images per forward.
    """

    def __init__(
        self,
        weight: float = 1.0,
        name: str | None = None,
        device: str = "cpu",
        dtype: str = "float32",
        batch_size: int = 32,
    ):
        super().__init__(weight, name)
        if dtype not in DTYPES:
            raise ValueError(f"{type(self).__name__}.dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
        if batch_size < 1:
            raise ValueError(f"{type(self).__name__}.batch_size must be >= 1, got {batch_size}")
        self.device, self.dtype, self.batch_size = torch.device(device), DTYPES[dtype], batch_size

    def place(self, *models: nn.Module) -> None:
        """Move the reward's models to its device and dtype, frozen, in eval mode."""
        for m in models:
            m.to(self.device, self.dtype).eval().requires_grad_(False)

    @abstractmethod
    def score(self, images: Tensor, specs: list[dict]) -> Tensor:
        """`[n]` rewards of uint8 `[n, 3, H, W]` images for their specs (each with a "prompt")."""

    @torch.no_grad()
    def __call__(self, ctx: RolloutContext) -> Tensor:
        images, specs, size = ctx.images.cpu(), ctx.specs, self.batch_size
        out = [self.score(images[i : i + size], specs[i : i + size]) for i in range(0, len(specs), size)]
        return torch.cat(out).float().cpu() if out else torch.zeros(0)


# ---- CLIP-family rewards ---------------------------------------------------------------------------
class CLIPEmbeddingReward(ModelReward):
    """A reward from a CLIP-like model's unit image and text embeddings (`get_image_features`,
    `get_text_features`) and its processor.

    Args:
        model_path / processor_path: folder or Hub id of the model (`AutoModel`) and of its processor
            (default: the model's).
        models: `(model, processor)` already built (then nothing is loaded).
        Other arguments as in `ModelReward`.
    """

    default_model: str = "openai/clip-vit-large-patch14"

    def __init__(
        self,
        model_path: str | None = None,
        processor_path: str | None = None,
        models: Any = None,
        **kwargs,
    ):
        super().__init__(**kwargs)
        if models is None:
            from transformers import AutoModel, AutoProcessor

            path = model_path or self.default_model
            models = AutoModel.from_pretrained(path), AutoProcessor.from_pretrained(processor_path or path)
        self.model, self.processor = models
        self.place(self.model)

    def embed(self, images: Tensor, texts: Sequence[str]) -> tuple[Tensor, Tensor]:
        """Unit embeddings `[n, d]` of the images and of the texts (float32)."""
        pixels = self.processor(images=list(images), return_tensors="pt")["pixel_values"]
        tokens = self.processor(text=list(texts), padding=True, truncation=True, return_tensors="pt")
        mask = tokens.get("attention_mask")
        img = _features(self.model.get_image_features(pixel_values=pixels.to(self.device, self.dtype)))
        txt = _features(
            self.model.get_text_features(
                input_ids=tokens["input_ids"].to(self.device),
                attention_mask=None if mask is None else mask.to(self.device),
            )
        )
        return nn.functional.normalize(img.float(), dim=-1), nn.functional.normalize(txt.float(), dim=-1)


class CLIPScoreReward(CLIPEmbeddingReward):
    """CLIPScore (Hessel et al., as torchmetrics' `CLIPScore` computes it) / 100: `max(cos(image,
    prompt), 0)` in [0, 1], the image and prompt embedded by a CLIP model (default ViT-L/14).

    Computed here per sample: torchmetrics' metric averages over its batch, and its 1.9 release reads
    `get_*_features` as tensors, which transformers 5 returns inside an output object."""

    def score(self, images: Tensor, specs: list[dict]) -> Tensor:
        img, txt = self.embed(images, [s["prompt"] for s in specs])
        return (img * txt).sum(-1).clamp(min=0)


class PickScoreReward(CLIPEmbeddingReward):
    """PickScore (Kirstain et al.): `logit_scale.exp() * cos(image, prompt)` of the PickScore CLIP-H
    model, divided by `normalize` (26, as Flow-GRPO scales it to about [0, 1]). The processor is
    LAION's CLIP-ViT-H-14 one unless `processor_path` says otherwise."""

    default_model = "yuvalkirstain/PickScore_v1"

    def __init__(
        self,
        model_path: str | None = None,
        processor_path: str | None = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K",
        models: Any = None,
        normalize: float = 26.0,
        **kwargs,
    ):
        super().__init__(model_path, processor_path, models, **kwargs)
        self.normalize = normalize

    def score(self, images: Tensor, specs: list[dict]) -> Tensor:
        img, txt = self.embed(images, [s["prompt"] for s in specs])
        return self.model.logit_scale.exp().float() * (img * txt).sum(-1) / self.normalize


class AestheticHead(nn.Module):
    """The LAION aesthetic predictor's MLP over a unit CLIP ViT-L/14 image embedding (768 -> 1):
    its state-dict keys (`layers.0.weight`, ...) are those of the published head file."""

    def __init__(self, dim: int = 768):
        super().__init__()
        self.layers = nn.Sequential(
            nn.Linear(dim, 1024), nn.Dropout(0.2), nn.Linear(1024, 128), nn.Dropout(0.2),
            nn.Linear(128, 64), nn.Dropout(0.1), nn.Linear(64, 16), nn.Linear(16, 1),
        )  # fmt: skip

    def forward(self, embedding: Tensor) -> Tensor:
        return self.layers(embedding).squeeze(-1)


class AestheticReward(CLIPEmbeddingReward):
    """Aesthetic score (LAION predictor: `AestheticHead` on the unit CLIP image embedding, about 1-10)
    divided by `normalize` (10). The prompt is not read.

    Args:
        head_path: the predictor's weights, a state dict of `AestheticHead` (`.pth` or `.safetensors`).
        head: an `AestheticHead` already built (then `head_path` is not read).
        Other arguments as in `CLIPEmbeddingReward` (the CLIP model: ViT-L/14 by default).
    """

    def __init__(
        self,
        head_path: str | None = None,
        model_path: str | None = None,
        processor_path: str | None = None,
        models: Any = None,
        head: nn.Module | None = None,
        normalize: float = 10.0,
        **kwargs,
    ):
        super().__init__(model_path, processor_path, models, **kwargs)
        if head is None:
            if head_path is None:
                raise ValueError("AestheticReward: give head_path (the predictor's weights file)")
            head = AestheticHead(self.model.config.projection_dim)
            head.load_state_dict(_load_state_dict(head_path))
        self.head, self.normalize = head, normalize
        self.place(head)

    def score(self, images: Tensor, specs: list[dict]) -> Tensor:
        pixels = self.processor(images=list(images), return_tensors="pt")["pixel_values"]
        img = _features(self.model.get_image_features(pixel_values=pixels.to(self.device, self.dtype)))
        img = nn.functional.normalize(img.float(), dim=-1)
        return self.head(img.to(self.dtype)).float() / self.normalize


def _load_state_dict(path: str) -> dict[str, Tensor]:
    if str(path).endswith(".safetensors"):
        from safetensors.torch import load_file

        return load_file(path)
    return torch.load(path, map_location="cpu", weights_only=True)


# ---- OCR -------------------------------------------------------------------------------------------
def requested_text(prompt: str) -> str | None:
    """The text a prompt asks to render: the first span in double quotes (straight or curly), or None."""
    match = re.search(r'["\u201c]([^"\u201d]+)["\u201d]', prompt)
    return match.group(1) if match else None


def edit_distance(a: str, b: str) -> int:
    """Levenshtein distance (insertions, deletions, substitutions; each costs 1)."""
    previous = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        current = [i]
        for j, cb in enumerate(b, 1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (ca != cb)))
        previous = current
    return previous[-1]


def ocr_accuracy(read: str, target: str) -> float:
    """`max(0, 1 - edit_distance / len(target))` on lower-cased text with spaces removed (1 = exact)."""
    read, target = (re.sub(r"\s+", "", t.lower()) for t in (read, target))
    if not target:
        return float(not read)
    return max(0.0, 1.0 - edit_distance(read, target) / len(target))


class OCRReward(ModelReward):
    """OCR accuracy for prompts that ask for text: a transformers OCR model (a `VisionEncoderDecoderModel`
    such as TrOCR) reads the image greedily, and the reward is `ocr_accuracy` against the prompt's
    quoted text (`requested_text`). Prompts without quoted text score `no_text_reward`.

    Args:
        model_path: folder or Hub id of the OCR model and its processor.
        models: `(model, processor)` already built.
        max_new_tokens: the longest text read.
        Other arguments as in `ModelReward`.
    """

    def __init__(
        self,
        model_path: str = "microsoft/trocr-base-printed",
        models: Any = None,
        max_new_tokens: int = 32,
        no_text_reward: float = 0.0,
        **kwargs,
    ):
        super().__init__(**kwargs)
        if models is None:
            from transformers import AutoProcessor, VisionEncoderDecoderModel

            models = (
                VisionEncoderDecoderModel.from_pretrained(model_path),
                AutoProcessor.from_pretrained(model_path),
            )
        self.model, self.processor = models
        self.max_new_tokens, self.no_text_reward = max_new_tokens, no_text_reward
        self.place(self.model)

    def read(self, images: Tensor) -> list[str]:
        """The text the OCR model reads in each image (greedy decoding)."""
        pixels = self.processor(images=list(images), return_tensors="pt")["pixel_values"]
        ids = self.model.generate(
            pixel_values=pixels.to(self.device, self.dtype),
            max_new_tokens=self.max_new_tokens,
            do_sample=False,
        )
        return self.processor.batch_decode(ids, skip_special_tokens=True)

    def score(self, images: Tensor, specs: list[dict]) -> Tensor:
        targets = [requested_text(s["prompt"]) for s in specs]
        asked = [i for i, t in enumerate(targets) if t is not None]
        out = torch.full((len(specs),), float(self.no_text_reward))
        if asked:
            for i, text in zip(asked, self.read(images[asked])):
                out[i] = ocr_accuracy(text, targets[i])
        return out


# ---- VLM judge -------------------------------------------------------------------------------------
class VLMJudgeReward(ModelReward):
    """A vision-language model asked whether the image matches the prompt; reward = P("yes") /
    (P("yes") + P("no")) of its next token (as in VQAScore and UnifiedReward-style judges).

    Args:
        model_path: folder or Hub id of a transformers image-text-to-text model
            (`AutoModelForImageTextToText`) and its processor.
        models: `(model, processor)` already built (any model whose forward returns `logits`).
        question: the question, with `{prompt}`.
        prompt_format: the text given to the processor, with `{question}` and the model's image
            token; None uses the processor's chat template (one user turn: the image, the question).
        yes / no: the answer words; their first token ids are compared.
        Other arguments as in `ModelReward`.
    """

    def __init__(
        self,
        model_path: str | None = None,
        models: Any = None,
        question: str = 'Does this image show "{prompt}"? Answer yes or no.',
        prompt_format: str | None = None,
        yes: str = "yes",
        no: str = "no",
        **kwargs,
    ):
        super().__init__(**kwargs)
        if models is None:
            if model_path is None:
                raise ValueError("VLMJudgeReward: give model_path (a vision-language model folder or Hub id)")
            from transformers import AutoModelForImageTextToText, AutoProcessor

            models = (
                AutoModelForImageTextToText.from_pretrained(model_path),
                AutoProcessor.from_pretrained(model_path),
            )
        self.model, self.processor = models
        self.question, self.prompt_format = question, prompt_format
        tok = getattr(self.processor, "tokenizer", self.processor)
        self.answer_ids = [tok(w, add_special_tokens=False)["input_ids"][0] for w in (yes, no)]
        if self.answer_ids[0] == self.answer_ids[1]:
            raise ValueError(f"VLMJudgeReward: {yes!r} and {no!r} start with the same token; use other words")
        self.place(self.model)

    def text(self, prompt: str) -> str:
        question = self.question.format(prompt=prompt)
        if self.prompt_format is not None:
            return self.prompt_format.format(question=question)
        if getattr(self.processor, "chat_template", None) is None:
            raise ValueError(
                "VLMJudgeReward: the processor has no chat template; give prompt_format (with {question} "
                "and the model's image token)"
            )
        turn = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
        return self.processor.apply_chat_template(turn, add_generation_prompt=True)

    def score(self, images: Tensor, specs: list[dict]) -> Tensor:
        texts = [self.text(s["prompt"]) for s in specs]
        inputs = self.processor(text=texts, images=list(images), padding=True, return_tensors="pt")
        inputs = {
            k: v.to(self.device, self.dtype) if v.is_floating_point() else v.to(self.device)
            for k, v in inputs.items()
            if isinstance(v, Tensor)
        }
        mask = inputs.get("attention_mask")
        if mask is not None:  # padded rows keep the positions they have alone (as `generate` does)
            inputs["position_ids"] = (mask.long().cumsum(-1) - 1).clamp(min=0)
        logits = self.model(**inputs).logits.float()
        # each row's next token: after its last real token, whichever side the processor padded
        if mask is None:
            last = torch.full((len(texts),), logits.shape[1] - 1, device=logits.device)
        else:
            last = (mask.long() * torch.arange(mask.shape[1], device=mask.device)).argmax(-1)
        next_token = logits[torch.arange(len(texts), device=logits.device), last.to(logits.device)]
        return next_token[:, self.answer_ids].softmax(-1)[:, 0]
