"""Reward functions: each maps a scored rollout to one float per sample and logs its own mean."""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from dataclasses import dataclass, field, fields, is_dataclass, replace
from typing import Any, Sequence

import torch

from unirl_lightning.models.base import AnswerRollout, ImageRollout


@dataclass
class RolloutContext:
    """Everything a reward may read about one step's samples.

    images: uint8 `[N, 3, H, W]`; answers: the policy's answers about its own images (when any
    reward or loss stream needs them); cache: shared per-step results (e.g. the judge's verdicts)
    so composite rewards detect once.
    """

    specs: list[dict]
    rollout: ImageRollout
    images: torch.Tensor
    answers: AnswerRollout | None = None
    cache: dict[str, Any] = field(default_factory=dict)

    def select(self, rows: Sequence[int]) -> "RolloutContext":
        """The context of samples `rows` alone: specs, rollout, images, answers and the cache's
        per-sample entries (lists, tensors and rollouts with one entry per sample) cut to those rows."""
        n = len(self.specs)
        cache = {k: _pick(v, rows, n) for k, v in self.cache.items() if k != "reward_terms"}
        return RolloutContext(
            specs=[self.specs[i] for i in rows],
            rollout=_pick(self.rollout, rows, n),
            images=_pick(self.images, rows, n),
            answers=_pick(self.answers, rows, n),
            cache=cache,
        )


def _pick(value: Any, rows: Sequence[int], n: int) -> Any:
    """`value` cut to `rows` when it holds one entry per sample (of `n`); anything else as it is."""
    if isinstance(value, torch.Tensor):
        per_sample = value.ndim and len(value) == n
        return value[torch.as_tensor(list(rows), device=value.device)] if per_sample else value
    if isinstance(value, (list, tuple)):
        return [value[i] for i in rows] if len(value) == n else value
    if callable(getattr(value, "select", None)):  # rollouts: their own row selection
        return value.select(list(rows))
    if is_dataclass(value) and not isinstance(value, type):
        return replace(value, **{f.name: _pick(getattr(value, f.name), rows, n) for f in fields(value)})
    return value


class RewardFunction(ABC):
    """A weighted reward term. Subclasses return `[N]` float rewards from a `RolloutContext`.

    `needs_answers` asks the recipe to sample the policy's answers to its own images first.
    """

    needs_answers: bool = False

    def __init__(self, weight: float = 1.0, name: str | None = None):
        self.weight = weight
        self.name = name or type(self).__name__.removesuffix("Reward").lower()

    @abstractmethod
    def __call__(self, ctx: RolloutContext) -> torch.Tensor: ...


def combine_rewards(
    rewards: list[RewardFunction], ctx: RolloutContext
) -> tuple[torch.Tensor, dict[str, float]]:
    """Weighted sum `[N]` of the terms, each term's mean for logging (`reward/<name>`) and its wall
    time (`time/reward/<name>`, seconds), and the sum's mean per GenEval task (`reward_by_task/<tag>`,
    for specs that carry a tag): the overall mean hides which tasks learn. Each weighted term is also
    kept in `ctx.cache["reward_terms"]`."""
    if not rewards:
        raise ValueError("no reward functions configured: give model.rewards at least one entry")
    total = torch.zeros(len(ctx.specs))
    logs: dict[str, float] = {}
    for fn in rewards:
        start = time.perf_counter()
        try:
            r = fn(ctx)
        except Exception as error:
            raise _reward_failure(fn, ctx, error) from error
        r = r.float().cpu()  # waits for a reward on another device: its time is all counted
        logs[f"time/reward/{fn.name}"] = time.perf_counter() - start
        if r.shape != total.shape:
            raise ValueError(
                f"reward {fn.name} returned shape {tuple(r.shape)}, expected ({len(ctx.specs)},)"
            )
        total += fn.weight * r
        ctx.cache.setdefault("reward_terms", {})[fn.name] = fn.weight * r  # weighted, for per-stream credit
        logs[f"reward/{fn.name}"] = finite_mean(r)
        bad = int((~torch.isfinite(r)).sum())
        if bad:  # the recipes leave these samples out of the advantages and the loss, and say so
            ctx.cache.setdefault("bad_reward_terms", {})[fn.name] = bad
    tags = [s.get("tag") for s in ctx.specs]
    for tag in sorted({t for t in tags if t}):
        logs[f"reward_by_task/{tag}"] = finite_mean(total[torch.tensor([t == tag for t in tags])])
    return total, logs


def finite_mean(x: torch.Tensor) -> float:
    """Mean of the finite entries of `x` (NaN when there are none): one NaN reward must not hide the
    others in the logs."""
    x = x[torch.isfinite(x)]
    return x.mean().item() if x.numel() else float("nan")


def describe_sample(spec: dict) -> str:
    """The prompt of a sample as a reader finds it in the prompt file (and its riddle, if any)."""
    text = repr(spec.get("prompt"))
    if "reasoning_prompt" in spec:
        text += f" (riddle {spec['reasoning_prompt']!r})"
    return text


def _reward_failure(
    fn: RewardFunction, ctx: RolloutContext, error: Exception, shown: int = 4
) -> RuntimeError:
    """The error to raise when reward `fn` raised `error` on a batch: the batch is scored again one
    sample at a time to find the first prompt that fails alone; when none does (a failure of the batch
    as a whole), the batch's first prompts are named."""
    what = f"reward {fn.name!r} ({type(fn).__name__}) raised {type(error).__name__}: {error}"
    n, alone = len(ctx.specs), "not scored again sample by sample"
    for i in range(n):
        try:
            sample = ctx.select([i])
        except Exception:  # a rollout that cannot be cut into samples: name the batch
            break
        try:
            fn(sample)
        except Exception as again:  # the first sample that fails on its own
            same = type(again) is type(error) and str(again) == str(error)
            differs = "" if same else f" (alone: {type(again).__name__}: {again})"
            return RuntimeError(
                f"{what}; it fails on sample {i} of {n}{differs}, prompt {describe_sample(ctx.specs[i])}"
            )
    else:
        alone = "each sample alone scores without error"
    prompts = ", ".join(describe_sample(s) for s in ctx.specs[:shown])
    more = f" and {n - shown} more" if n > shown else ""
    return RuntimeError(f"{what}; on a batch of {n} samples ({alone}), prompts: {prompts}{more}")
