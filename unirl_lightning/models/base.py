"""The unified policy interface: one base class a user subclasses to bring a new unified model.

A unified model both generates images (as discrete tokens, autoregressive or masked order) and
answers questions about images. Recipes in `modules/` only talk to this interface.

Actions. The RL objectives need per-action log-probs:
- autoregressive order: one action per image token, `A = L`;
- masked (MaskGIT / Show-o) order: one action per denoising step, its log-prob the sum of the
  log-probs of the tokens revealed at that step given that step's partially masked state.
"""

from __future__ import annotations

from abc import abstractmethod
from dataclasses import dataclass, field, replace
from typing import Any, Literal, Sequence

import torch
from torch import Tensor, nn

from unirl_lightning.models.policy import Policy

ImageOrder = Literal["autoregressive", "masked"]


@dataclass
class ImageRollout:
    """Images sampled by a policy, with everything needed to re-score them.

    tokens: long `[B, L]` image tokens; logprobs: `[B, A]` per-action log-probs under the exact
    sampling distribution (CFG and temperature included); action_mask: bool `[B, A]`;
    reveal_step: long `[B, L]` (masked order: the step that revealed each token); gumbel: optional
    `[B, L, K]` noise whose Gumbel-max gave `tokens` (for straight-through relaxations).
    """

    prompts: list[str]
    tokens: Tensor
    logprobs: Tensor
    action_mask: Tensor
    cfg_scale: float = 1.0
    temperature: float = 1.0
    reveal_step: Tensor | None = None
    gumbel: Tensor | None = None
    extras: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return self.tokens.shape[0]

    def select(self, index: Tensor | Sequence[int]) -> "ImageRollout":
        """The sub-rollout of rows `index` (used for micro-batches and zero-std filtering)."""
        idx = torch.as_tensor(index, dtype=torch.long, device=self.tokens.device)
        pick = lambda t: None if t is None else t[idx]  # noqa: E731
        return replace(
            self,
            prompts=[self.prompts[i] for i in idx.tolist()],
            tokens=self.tokens[idx],
            logprobs=self.logprobs[idx],
            action_mask=self.action_mask[idx],
            reveal_step=pick(self.reveal_step),
            gumbel=pick(self.gumbel),
        )


@dataclass
class AnswerRollout:
    """Answers sampled (or decoded greedily) by a policy.

    tokens: long `[B, T]` answer tokens (padded); logprobs: `[B, T]` under the sampling
    distribution; mask: bool `[B, T]` (True on real answer tokens, the end token included).
    """

    texts: list[str]
    tokens: Tensor
    logprobs: Tensor
    mask: Tensor


ImageInput = Tensor
"""Images given to the understanding path: long tokens `[B, L]`, or relaxed one-hot `[B, L, K]`
float (straight-through Gumbel) whose gradient reaches the generation logits."""


class UnifiedPolicy(Policy):
    """Base class of every unified model behind the recipes.

    Subclasses implement the abstract methods; the base provides the frozen reference, the
    straight-through relaxation, and save/load helpers.
    """

    image_order: ImageOrder = "autoregressive"

    #: Methods that read parameters outside `forward`; under FSDP2 they are registered as forward
    #: methods so the sharded parameters are gathered for them (generation included).
    fsdp_entry_points: tuple[str, ...] = (
        "generate_images",
        "image_logits",
        "image_logprobs",
        "relaxed_image_tokens",
        "answer",
        "answer_logprobs",
    )

    # ---- generation -------------------------------------------------------------------
    @property
    @abstractmethod
    def image_vocab_size(self) -> int:
        """K, the number of image codes."""

    @property
    @abstractmethod
    def tokens_per_image(self) -> int:
        """L, image tokens per image."""

    @abstractmethod
    def generate_images(
        self,
        prompts: Sequence[str],
        *,
        cfg_scale: float = 1.0,
        temperature: float = 1.0,
        generator: torch.Generator | None = None,
        return_gumbel: bool = False,
    ) -> ImageRollout:
        """Sample one image per prompt (repeat prompts for groups). No gradient."""

    @abstractmethod
    def image_logits(self, rollout: ImageRollout) -> Tensor:
        """Teacher-forced, guided, temperature-scaled logits over image codes `[B, L, K]`, with gradient.

        Row `l` is the distribution token `l` was drawn from in `rollout` (for the masked order:
        at the step that revealed it), so `log_softmax(...)` gathered at the tokens reproduces
        the rollout's per-token log-probs.
        """

    def image_logprobs(self, rollout: ImageRollout) -> Tensor:
        """Per-action log-probs `[B, A]` of `rollout` under the current parameters, with gradient."""
        token_logp = torch.log_softmax(self.image_logits(rollout).float(), dim=-1)
        token_logp = token_logp.gather(-1, rollout.tokens.unsqueeze(-1)).squeeze(-1)
        return self.actions_from_token_logprobs(token_logp, rollout)

    def actions_from_token_logprobs(self, token_logp: Tensor, rollout: ImageRollout) -> Tensor:
        """`[B, L]` token log-probs -> `[B, A]` action log-probs (identity for autoregressive)."""
        if self.image_order == "autoregressive":
            return token_logp
        steps = rollout.logprobs.shape[1]
        out = token_logp.new_zeros(token_logp.shape[0], steps)
        return out.scatter_add(1, rollout.reveal_step, token_logp)

    def relaxed_image_tokens(self, rollout: ImageRollout, tau: float = 1.0) -> Tensor:
        """Straight-through Gumbel one-hots `[B, L, K]`: forward equals one_hot(rollout.tokens),
        backward is the gradient of softmax((logits + g) / tau) (UniRL's end-to-end path)."""
        logits = self.image_logits(rollout).float()
        noise = rollout.gumbel if rollout.gumbel is not None else torch.zeros_like(logits)
        soft = torch.softmax((logits + noise) / tau, dim=-1)
        hard = nn.functional.one_hot(rollout.tokens, logits.shape[-1]).to(soft.dtype)
        return hard + soft - soft.detach()

    @abstractmethod
    def decode_images(self, tokens: Tensor) -> Tensor:
        """Image tokens `[B, L]` -> uint8 pixels `[B, 3, H, W]`."""

    # ---- understanding ----------------------------------------------------------------
    @abstractmethod
    def answer(
        self,
        images: ImageInput,
        questions: Sequence[str],
        *,
        greedy: bool = True,
        temperature: float = 1.0,
        max_new_tokens: int = 16,
        generator: torch.Generator | None = None,
    ) -> AnswerRollout:
        """Answer one question per image. No gradient."""

    @abstractmethod
    def answer_logprobs(
        self, images: ImageInput, questions: Sequence[str], answers: Sequence[str] | AnswerRollout
    ) -> tuple[Tensor, Tensor]:
        """Teacher-forced answer log-probs `[B, T]` and mask `[B, T]`, with gradient (through
        relaxed image one-hots too, when given)."""

    # ---- optional: images in, warm start, synthetic world ------------------------------------
    #: The synthetic world the policy draws (the built-in models' `WorldConfig`); None for a real
    #: model, whose validation then renders the default world's scenes.
    world_config: Any = None

    def encode_images(self, images: Tensor) -> Tensor | None:
        """uint8 pixels `[B, 3, H, W]` -> image tokens `[B, L]`, for a model with an image tokenizer
        (validation then also asks about rendered ground-truth scenes); None: it has none."""
        return None

    def generation_loss(
        self, prompts: Sequence[str | None], image_tokens: Tensor, generator: torch.Generator | None = None
    ) -> Tensor:
        """Mean NLL of `image_tokens` `[B, L]` given `prompts` (None: unconditional): the supervised
        generation loss of `WarmStartPretrain`. Needed only to warm-start the model with it."""
        raise NotImplementedError(
            f"{type(self).__name__} has no supervised generation loss (WarmStartPretrain)"
        )

    def understanding_loss(
        self, image_tokens: Tensor, questions: Sequence[str], answers: Sequence[str]
    ) -> Tensor:
        """Mean NLL per answer token of `answers` to `questions` about `image_tokens`: the supervised
        understanding loss of `WarmStartPretrain`. Needed only to warm-start the model with it."""
        raise NotImplementedError(
            f"{type(self).__name__} has no supervised understanding loss (WarmStartPretrain)"
        )
