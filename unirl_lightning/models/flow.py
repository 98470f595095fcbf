"""Flow-matching image policies: a small interface, an SD3 (diffusers) adapter, and the built-in model.

A flow policy predicts a velocity ``v ~ noise - x0`` at ``x_s = s*noise + (1-s)*x0`` (diffusers'
convention, ``s`` from 1 to 0). Sampling runs the schedule of diffusers'
``FlowMatchEulerDiscreteScheduler`` (with its ``shift``) and takes every transition with
``objectives.sde_step``, so each stochastic step is a Gaussian policy with a log-prob that
FlowGRPO trains; ``noise_level=0`` is diffusers' Euler loop exactly.

- :class:`FlowPolicy`: the interface the recipes use (``encode_text``, ``velocity`` with CFG,
  ``decode``, ``sample`` -> :class:`FlowRollout`, ``step_log_prob``, ``make_reference``, and
  ``add_lora`` / ``adapters_disabled`` for LoRA training against the base model).
- :class:`SD3FlowPolicy`: velocity from a diffusers ``SD3Transformer2DModel`` (MMDiT).
- :class:`DiffusersFlowPolicy`: a real SD3 / SD3.5 pipeline folder or Hub id (transformer trained;
  CLIP/T5 text encoders and the VAE frozen).
- :class:`TinyFlowModel`: the built-in model for the synthetic world. A tiny SD3 transformer over
  a 4x4 grid of latent *cells*, each 8x8 px cell holding a whole object (one of 4 shapes x 10
  colours) or background, with a learned word-level text encoder. Its world is rendered on an
  8-px placement grid (``WorldConfig(grid=8)``) so every object fills exactly one cell; DESIGN.md
  section 4 reports that pixel latents and 4x4-patch latents (objects split across latents)
  did not learn in CPU minutes.
"""

from __future__ import annotations

import copy
import json
from abc import ABC, abstractmethod
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, ContextManager, Sequence

import torch
from torch import Tensor, nn

from unirl_lightning.models.folder import load_weights, read_config, save_folder
from unirl_lightning.models.lora import add_lora, adapters_disabled, merge_lora
from unirl_lightning.models.text import WordTokenizer, world_words
from unirl_lightning.objectives.flow_sde import SDE_KINDS, sde_step
from unirl_lightning.worlds.render import WorldConfig
from unirl_lightning.worlds.shapes import shape_mask
from unirl_lightning.worlds.tokenizer import PatchTokenizer
from unirl_lightning.worlds.vocab import BACKGROUND, COLORS, PALETTE, SHAPES

Prompt = str | None  # None: the unconditional ("dropped") prompt of classifier-free guidance


# ---- data carried between rollout and training ------------------------------------------------
@dataclass
class TextCondition:
    """What the velocity model reads about the prompt: token states `[B, T, D]`, pooled `[B, P]`."""

    hidden: Tensor
    pooled: Tensor

    def __len__(self) -> int:
        return self.hidden.shape[0]

    def select(self, index: Tensor) -> "TextCondition":
        return TextCondition(self.hidden[index], self.pooled[index])

    @staticmethod
    def cat(first: "TextCondition", second: "TextCondition") -> "TextCondition":
        return TextCondition(torch.cat([first.hidden, second.hidden]), torch.cat([first.pooled, second.pooled]))


@dataclass
class FlowRollout:
    """A batch of sampled trajectories, with everything needed to re-score each transition.

    latents: `[B, T+1, C, H, W]` every state, `latents[:, 0]` the initial noise and
    `latents[:, T]` the final sample; log_probs: `[B, T]` log-prob of each transition under the
    rollout policy (0 on deterministic steps); sigmas: `[T+1]` schedule (`sigmas[T] == 0`);
    noise_levels: `[T]` the noise level each step used (0 = ODE); train_mask: bool `[T]` the
    steps FlowGRPO trains (stochastic steps inside the SDE window; never the last); row_mask:
    bool `[B, T]` when rows had windows of their own (`sample(sde_windows=)`): the steps each
    row took stochastically (then `train_mask` is their union, and a row re-scores only at its own).
    """

    prompts: list[str]
    latents: Tensor
    log_probs: Tensor
    sigmas: Tensor
    noise_levels: Tensor
    train_mask: Tensor
    cfg_scale: float = 1.0
    kind: str = "sde"
    images: Tensor | None = None
    row_mask: Tensor | None = None

    def __len__(self) -> int:
        return self.latents.shape[0]

    @property
    def num_steps(self) -> int:
        return self.log_probs.shape[1]

    @property
    def trained_steps(self) -> list[int]:
        """The steps any row trains (with per-row windows, their union)."""
        return self.train_mask.nonzero().flatten().tolist()

    @property
    def steps_per_row(self) -> int:
        """How many steps each row trains (the most any row does, with per-row windows)."""
        return len(self.trained_steps) if self.row_mask is None else int(self.row_mask.sum(1).max(0).values)

    def rows_at(self, step: int) -> Tensor:
        """long `[m]`: the rows that took `step` stochastically (all rows, or none, without a row mask)."""
        if self.row_mask is not None:
            return self.row_mask[:, step].nonzero().flatten()
        return torch.arange(len(self) if bool(self.train_mask[step]) else 0, device=self.latents.device)

    def select(self, index: Tensor | Sequence[int]) -> "FlowRollout":
        """The sub-rollout of rows `index` (micro-batches)."""
        idx = torch.as_tensor(index, dtype=torch.long, device=self.latents.device)
        return replace(self, prompts=[self.prompts[i] for i in idx.tolist()], latents=self.latents[idx],
                       log_probs=self.log_probs[idx], images=None if self.images is None else self.images[idx.cpu()],
                       row_mask=None if self.row_mask is None else self.row_mask[idx])


@dataclass
class StepOutput:
    """One re-scored transition: log_prob `[B]`, velocity / mean `[B, C, H, W]`, std `[B, 1, 1, 1]`."""

    log_prob: Tensor
    velocity: Tensor
    mean: Tensor
    std: Tensor


def _window_mask(num_steps: int, window: tuple[int, int] | None) -> list[bool]:
    """Which of `num_steps` steps are stochastic: those in `[start, end)`, never the last one."""
    start, end = (0, num_steps) if window is None else (int(window[0]), int(window[1]))
    if not 0 <= start < end <= num_steps:
        raise ValueError(f"sde_window must satisfy 0 <= start < end <= num_steps={num_steps}, got {window}")
    # The last step (s = sigmas[T-1] -> 0) is taken deterministically: its noise would be reward
    # noise no trained action explains (Flow-GRPO samples it but never trains it).
    return [start <= i < end and i < num_steps - 1 for i in range(num_steps)]


def _row_window_mask(num_steps: int, windows: Tensor) -> Tensor:
    """bool `[B, T]`: each row's stochastic steps, from its own `[start, end)` in long `[B, 2]`."""
    windows = torch.as_tensor(windows)
    if windows.ndim != 2 or windows.shape[1] != 2:
        raise ValueError(f"sde_windows must be [B, 2] (one [start, end) per row), got shape {tuple(windows.shape)}")
    start, end = windows[:, :1].long(), windows[:, 1:].long()
    bad = ~((0 <= start) & (start < end) & (end <= num_steps)).flatten()
    if bad.any():
        row = int(bad.nonzero()[0])
        raise ValueError(f"sde_windows row {row}: {windows[row].tolist()} must satisfy 0 <= start < end <= "
                         f"num_steps={num_steps}")
    steps = torch.arange(num_steps, device=windows.device)
    return (start <= steps) & (steps < end) & (steps < num_steps - 1)  # never the last step (`_window_mask`)


class _GroupRows:
    """The groups of a batch's rows (long ids `[B]`): `count` groups, `first` `[count]` the first
    row of each, `expand` maps per-group tensors back to rows."""

    def __init__(self, groups: Tensor, device: torch.device):
        groups = torch.as_tensor(groups).reshape(-1)
        _, self.row_group = torch.unique(groups.to(device), return_inverse=True)
        self.count = int(self.row_group.max()) + 1 if groups.numel() else 0
        rows = torch.arange(groups.numel(), device=device)
        self.first = torch.full((self.count,), groups.numel(), device=device).scatter_reduce(
            0, self.row_group, rows, "amin")

    def check_prompts(self, prompts: list[str]) -> None:
        if len(self.row_group) != len(prompts):
            raise ValueError(f"groups has {len(self.row_group)} entries for {len(prompts)} prompts; give one group id per row")
        firsts = self.first[self.row_group].tolist()
        for row, first in enumerate(firsts):
            if prompts[row] != prompts[first]:
                raise ValueError(f"groups: row {row} ({prompts[row]!r}) shares a group with row {first} "
                                 f"({prompts[first]!r}); rows of a group must share their prompt")

    def expand(self, per_group: Tensor) -> Tensor:
        return per_group[self.row_group]

    def check_latents(self, latents: Tensor) -> None:
        if not torch.equal(latents, self.expand(latents[self.first])):
            raise ValueError("groups: rows of a group must start from the same latents (one noise per group)")

    def check_windows(self, stochastic: Tensor) -> None:
        if not torch.equal(stochastic, self.expand(stochastic[self.first])):
            raise ValueError("groups: rows of a group must share their SDE window (sde_windows)")


# ---- the interface ---------------------------------------------------------------------------
class FlowPolicy(nn.Module, ABC):
    """Base class of flow-matching image policies behind FlowGRPO.

    Subclasses implement `encode_text`, `forward_velocity`, `decode` and `latent_shape`; the base
    gives CFG, the schedule, sampling with per-step log-probs, re-scoring, and the reference.
    """

    #: diffusers' timestep scale: the transformer reads `t = sigma * num_train_timesteps`.
    num_train_timesteps: int = 1000

    #: Methods that read parameters outside `forward`; under FSDP2 they are registered as forward
    #: methods so the sharded parameters are gathered for them (nested calls are fine: the root
    #: keeps its parameters gathered until the outermost call ends).
    fsdp_entry_points: tuple[str, ...] = ("sample", "step_log_prob", "velocity", "encode_text")

    def fsdp_units(self) -> list[nn.Module]:
        """Sub-modules to shard one by one under FSDP (e.g. transformer blocks); the rest shard as the root."""
        return []

    def __init__(self, shift: float = 1.0):
        super().__init__()
        from diffusers import FlowMatchEulerDiscreteScheduler

        self.scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=self.num_train_timesteps, shift=shift)

    # -- to implement
    @abstractmethod
    def encode_text(self, prompts: Sequence[Prompt]) -> TextCondition:
        """Prompts (None = unconditional) -> condition of batch `len(prompts)`, with gradient if trainable."""

    @abstractmethod
    def forward_velocity(self, x: Tensor, sigma: Tensor, cond: TextCondition) -> Tensor:
        """One model pass: `x` `[B, C, H, W]`, `sigma` `[B]` in [0, 1] -> velocity `[B, C, H, W]`."""

    @abstractmethod
    def decode(self, latents: Tensor) -> Tensor:
        """Final latents `[B, C, H, W]` -> uint8 images `[B, 3, H', W']`."""

    @property
    @abstractmethod
    def latent_shape(self) -> tuple[int, int, int]:
        """(C, H, W) of one latent."""

    def encode_images(self, images: Tensor) -> Tensor:
        """uint8 images `[B, 3, H', W']` -> clean latents `[B, C, H, W]` (for flow-matching pretraining)."""
        raise NotImplementedError(f"{type(self).__name__} has no image encoder")

    def off_manifold(self, latents: Tensor) -> Tensor | None:
        """An image-quality proxy, `[B]`: how far final latents lie from what the decoder was
        built for (0 = clean); rising under RL flags reward hacking the judge does not see.
        None when the model has no such measure."""
        return None

    @property
    def text_trainable(self) -> bool:
        """Whether `encode_text` has trainable parameters (then recipes re-encode per backward)."""
        return True

    # -- shared machinery
    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def null_condition(self, batch: int) -> TextCondition:
        """The unconditional condition of CFG, batch `batch`."""
        return self.encode_text([None] * batch)

    def velocity(self, x: Tensor, sigma: Tensor, cond: TextCondition, *, cfg_scale: float = 1.0) -> Tensor:
        """Velocity `[B, C, H, W]` at `x` `[B, C, H, W]`, `sigma` `[B]`; with CFG `v_u + w (v_c - v_u)`.

        CFG batches the unconditional and conditional passes (one forward of 2B), so rollout and
        training compute it identically.
        """
        if cfg_scale == 1.0:
            return self.forward_velocity(x, sigma, cond)
        both = TextCondition.cat(self.null_condition(x.shape[0]), cond)
        v_u, v_c = self.forward_velocity(torch.cat([x, x]), torch.cat([sigma, sigma]), both).chunk(2)
        return v_u + cfg_scale * (v_c - v_u)

    def sigmas(self, num_steps: int) -> Tensor:
        """The scheduler's `[T+1]` float32 sigmas (shifted, ending in 0) on the policy's device."""
        self.scheduler.set_timesteps(num_steps)
        return self.scheduler.sigmas.to(self.device, torch.float32)

    def initial_noise(self, batch: int, generator: torch.Generator | None = None) -> Tensor:
        gen_device = generator.device if generator is not None else self.device
        return torch.randn(batch, *self.latent_shape, generator=generator, device=gen_device).to(self.device)

    def group_noise(self, groups: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """One initial noise per distinct id of `groups` (long `[B]`), on each of its rows: `[B, C, H, W]`."""
        rows = _GroupRows(groups, self.device)
        return rows.expand(self.initial_noise(rows.count, generator))

    @torch.no_grad()
    def sample(
        self,
        prompts: Sequence[str],
        *,
        num_steps: int = 10,
        noise_level: float = 0.7,
        cfg_scale: float = 1.0,
        generator: torch.Generator | None = None,
        sde_window: tuple[int, int] | None = None,
        sde_windows: Tensor | None = None,
        kind: str = "sde",
        latents: Tensor | None = None,
        decode: bool = True,
        groups: Tensor | None = None,
    ) -> FlowRollout:
        """Sample one image per prompt, keeping every state and each transition's log-prob.

        Steps inside `sde_window` (`[start, end)`, default all) use `noise_level`; the others
        and the last step are deterministic Euler steps (Flow-GRPO-Fast). `sde_windows` (long
        `[B, 2]`) gives each row a window of its own instead (recorded as the rollout's
        `row_mask`). `latents` `[B, C, H, W]` replaces the initial noise. `groups` (long `[B]`)
        marks rows that share their prompt, initial latents and window (one noise per group,
        drawn here when `latents` is None): their trajectories agree up to the group's first
        stochastic step, so those ODE steps run once per group.
        Returns a :class:`FlowRollout` (with decoded `images` when `decode`).
        """
        if kind not in SDE_KINDS:
            raise ValueError(f"unknown kind {kind!r}; valid: {SDE_KINDS}")
        if num_steps < 1:
            raise ValueError(f"num_steps must be >= 1, got {num_steps}")
        batch = len(prompts)
        sig = self.sigmas(num_steps)
        if sde_windows is None:
            stochastic = torch.tensor(_window_mask(num_steps, sde_window), device=self.device).expand(batch, -1)
        else:
            if sde_window is not None:
                raise ValueError("give sde_window (one for the batch) or sde_windows (one per row), not both")
            if len(sde_windows) != batch:
                raise ValueError(f"sde_windows has {len(sde_windows)} rows for {batch} prompts; give one window per row")
            stochastic = _row_window_mask(num_steps, sde_windows).to(self.device)
        stochastic = stochastic & (noise_level > 0)  # `[B, T]`
        cond = self.encode_text(list(prompts))
        shared = None if groups is None else _GroupRows(groups, self.device)
        if shared is not None:
            shared.check_prompts(list(prompts))
            shared.check_windows(stochastic)
        if latents is None:
            latents = (self.initial_noise(batch, generator) if shared is None
                       else shared.expand(self.initial_noise(shared.count, generator)))
        x = latents.to(self.device)
        # each group's first stochastic step (num_steps: none); before it the group's rows agree
        first_sde = torch.where(stochastic.any(1), stochastic.to(torch.int8).argmax(1), num_steps)
        group_start = None if shared is None else first_sde[shared.first]
        if group_start is not None and bool((group_start > 0).any()):
            shared.check_latents(x)
        own = None if shared is None else shared.first[shared.row_group]  # `[B]` each row's group's first row
        states, log_probs = [x], []
        for i in range(num_steps):
            pending = None if shared is None else shared.expand(group_start > i)  # `[B]` rows still shared
            # One row per pending group (in group order), then every row of the others.
            rows = None if pending is None or not bool(pending.any()) else torch.cat(
                [shared.first[group_start > i], (~pending).nonzero().flatten()])
            xs, cs = (x, cond) if rows is None else (x[rows], cond.select(rows))
            v = self.velocity(xs, sig[i].expand(len(xs)), cs, cfg_scale=cfg_scale)
            x_next, logp = self._step_rows(v, xs, sig[i], sig[i + 1], stochastic[:, i] if rows is None
                                           else stochastic[rows, i], noise_level, kind, generator)
            if rows is not None:  # scatter back; a pending group's rows all take its first row's step
                x_full, logp_full = x.clone(), logp.new_zeros(batch)
                x_full[rows], logp_full[rows] = x_next, logp
                x_next = torch.where(pending.view(-1, *[1] * (x.ndim - 1)), x_full[own], x_full)
                logp = torch.where(pending, logp_full[own], logp_full)
            x = x_next
            states.append(x)
            log_probs.append(logp)
        train_mask = stochastic.any(0)
        return FlowRollout(
            prompts=list(prompts), latents=torch.stack(states, 1), log_probs=torch.stack(log_probs, 1), sigmas=sig,
            noise_levels=train_mask.float() * noise_level, train_mask=train_mask, cfg_scale=cfg_scale, kind=kind,
            images=self.decode(x) if decode else None, row_mask=None if sde_windows is None else stochastic,
        )

    @staticmethod
    def _step_rows(v: Tensor, x: Tensor, sigma: Tensor, sigma_next: Tensor, stochastic: Tensor, noise_level: float,
                   kind: str, generator: torch.Generator | None) -> tuple[Tensor, Tensor]:
        """One transition of rows `x` `[b, ...]`: SDE where `stochastic` (bool `[b]`), else Euler -> (x', log_prob `[b]`)."""
        if bool(stochastic.all()) or not bool(stochastic.any()):  # one call: the random stream of a shared window
            x_next, logp, _, _ = sde_step(v, x, sigma, sigma_next, noise_level=noise_level if bool(stochastic.any())
                                          else 0.0, kind=kind, generator=generator)
            return x_next, logp
        x_next, logp = torch.empty_like(x), x.new_zeros(len(x), dtype=torch.float32)
        for part, level in ((stochastic, noise_level), (~stochastic, 0.0)):
            idx = part.nonzero().flatten()
            x_next[idx], logp[idx], _, _ = sde_step(v[idx], x[idx], sigma, sigma_next, noise_level=level, kind=kind,
                                                    generator=generator)
        return x_next, logp

    def step_log_prob(self, rollout: FlowRollout, step: int, cond: TextCondition | None = None) -> StepOutput:
        """Re-score transition `step` of `rollout` under the current parameters (with gradient).

        Uses the rollout's CFG scale, noise level and kind, so on-policy ratios are exactly 1.
        `cond` (batch `len(rollout)`) skips re-encoding the prompts.
        """
        cond = self.encode_text(rollout.prompts) if cond is None else cond
        return self._rescore(rollout, rollout.latents[:, step], rollout.latents[:, step + 1], rollout.sigmas[step],
                             rollout.sigmas[step + 1], float(rollout.noise_levels[step]), cond)

    def pairs_log_prob(self, rollout: FlowRollout, rows: Tensor, steps: Tensor,
                       cond: TextCondition | None = None) -> StepOutput:
        """Re-score transitions `(rows[p], steps[p])` of `rollout` (long `[P]` each) in one batch of `P`,
        with gradient: per-row windows train every row's own steps in one forward, not one per step.

        `cond` (batch `P`, the rows' conditions in pair order) skips re-encoding the prompts.
        The pairs' steps must share one noise level (the rollout's stochastic steps do).
        """
        levels = rollout.noise_levels[steps]
        if not bool((levels == levels[0]).all()):
            raise ValueError(f"pairs_log_prob: steps {sorted(set(steps.tolist()))} have different noise levels "
                             f"{sorted(set(levels.tolist()))}; re-score them in separate calls")
        cond = self.encode_text([rollout.prompts[r] for r in rows.tolist()]) if cond is None else cond
        return self._rescore(rollout, rollout.latents[rows, steps], rollout.latents[rows, steps + 1],
                             rollout.sigmas[steps], rollout.sigmas[steps + 1], float(levels[0]), cond)

    def _rescore(self, rollout: FlowRollout, x: Tensor, x_next: Tensor, sigma: Tensor, sigma_next: Tensor,
                 noise_level: float, cond: TextCondition) -> StepOutput:
        """Log-prob of the transitions `x -> x_next` (`[b, ...]`; sigmas 0-d or `[b]`) with the rollout's CFG and kind."""
        v = self.velocity(x, sigma.expand(x.shape[0]), cond, cfg_scale=rollout.cfg_scale)
        _, logp, mean, std = sde_step(v, x, sigma, sigma_next, noise_level=noise_level, kind=rollout.kind, prev_sample=x_next)
        return StepOutput(logp, v, mean, std)

    # -- LoRA: recipes add adapters after the warm start; the base model is then the reference
    #: alpha / r of the LoRA adapter, None without one
    lora_scaling: float | None = None

    def add_lora(self, rank: int, alpha: float | None = None, targets: Sequence[str] | None = None) -> None:
        """Freeze the policy and add a trainable LoRA adapter (rank `rank`, scale alpha / rank) on `targets`."""
        raise NotImplementedError(f"{type(self).__name__} does not support LoRA")

    @property
    def has_lora(self) -> bool:
        return self.lora_scaling is not None

    def adapters_disabled(self) -> ContextManager[None]:
        """Context in which the policy computes as its base model (the LoRA reference)."""
        raise NotImplementedError(f"{type(self).__name__} has no LoRA adapter")

    def make_reference(self) -> "FlowPolicy":
        """A frozen copy (the regulariser's anchor)."""
        ref = copy.deepcopy(self)
        ref.requires_grad_(False)
        return ref.eval()

    def save_pretrained(self, path: str | Path, state_dict: dict[str, Tensor] | None = None) -> None:
        """Save in the family's format; `state_dict` (this module's keys) replaces the live weights,
        e.g. the full weights gathered from FSDP shards."""
        raise NotImplementedError(f"{type(self).__name__} cannot save itself")

    @classmethod
    def from_pretrained(cls, path: str | Path, **kwargs) -> "FlowPolicy":
        raise NotImplementedError(f"{cls.__name__} cannot load a folder")


class TransformerFlowPolicy(FlowPolicy):
    """A flow policy whose velocity is a diffusers transformer (`self.transformer`): its blocks are
    the FSDP units, and LoRA adapters go on its attention projections."""

    transformer: nn.Module

    def fsdp_units(self) -> list[nn.Module]:
        """Each transformer block (MMDiT; Flux's single-stream ones too), then the transformer (its
        embedders and output layers)."""
        t = self.transformer
        return [*getattr(t, "transformer_blocks", []), *getattr(t, "single_transformer_blocks", []), t]

    def add_lora(self, rank: int, alpha: float | None = None, targets: Sequence[str] | None = None) -> None:
        """LoRA on the transformer's attention projections (default: those of `SD3_LORA_TARGETS` it
        has); everything else, text encoder included, freezes."""
        self.requires_grad_(False)
        self.lora_scaling = add_lora(self.transformer, rank, alpha, targets)

    def adapters_disabled(self) -> ContextManager[None]:
        return adapters_disabled(self.transformer)


class SD3FlowPolicy(TransformerFlowPolicy):
    """A flow policy whose velocity is a diffusers `SD3Transformer2DModel` (set `self.transformer`)."""

    def forward_velocity(self, x: Tensor, sigma: Tensor, cond: TextCondition) -> Tensor:
        dtype = next(self.transformer.parameters()).dtype
        out = self.transformer(
            hidden_states=x.to(dtype), encoder_hidden_states=cond.hidden.to(dtype),
            pooled_projections=cond.pooled.to(dtype), timestep=sigma * self.num_train_timesteps, return_dict=False,
        )[0]
        return out


# ---- real pipelines ------------------------------------------------------------------------------
class PipelineFlowPolicy:
    """Mixin of flow policies built from a diffusers pipeline: the transformer trains; the text
    encoders and the VAE are frozen, shared with the reference and kept whole under FSDP; the
    folder format is the trained transformer (diffusers format) + `flow_policy.json` naming the
    source pipeline and this wrapper's options (`options()`)."""

    transformer: nn.Module
    vae: nn.Module
    #: the pipeline's text encoder attributes this policy adopts
    text_encoder_names: tuple[str, ...] = ("text_encoder", "text_encoder_2", "text_encoder_3")

    def adopt_pipeline(self, pipe: Any) -> None:
        """Registers the pipeline's transformer, frozen VAE and text encoders as sub-modules."""
        self.transformer = pipe.transformer
        self.vae = pipe.vae.requires_grad_(False)
        for name in self.text_encoder_names:
            enc = getattr(pipe, name, None)
            if enc is not None:
                setattr(self, name, enc.requires_grad_(False))
        # The pipeline object (not a Module) shares these modules; kept for its encode_prompt.
        self.__dict__["_pipe"] = pipe

    def options(self) -> dict[str, Any]:
        """The constructor arguments `from_pretrained` re-creates this policy with."""
        raise NotImplementedError

    @property
    def text_trainable(self) -> bool:
        return False

    def fsdp_ignored_params(self) -> set[nn.Parameter]:
        """The frozen text encoders and VAE stay whole on every rank under FSDP: the pipeline calls
        them directly, and the reference shares them."""
        return {p for name, m in self.named_children() if name != "transformer" for p in m.parameters()}

    @torch.no_grad()
    def decode(self, latents: Tensor) -> Tensor:
        cfg = self.vae.config
        x = latents.to(self.vae.dtype) / cfg.scaling_factor + (cfg.shift_factor or 0.0)
        pixels = self.vae.decode(x, return_dict=False)[0]
        return ((pixels.float() / 2 + 0.5).clamp(0, 1) * 255).round().to(torch.uint8)

    @torch.no_grad()
    def encode_images(self, images: Tensor) -> Tensor:
        cfg = self.vae.config
        x = (images.to(self.device, self.vae.dtype) / 127.5 - 1)
        lat = self.vae.encode(x).latent_dist.sample()
        return ((lat - (cfg.shift_factor or 0.0)) * cfg.scaling_factor).float()

    def make_reference(self):
        """Shares the frozen text encoders and VAE; copies only the transformer."""
        ref = copy.copy(self)
        ref._modules = dict(self._modules)
        ref._parameters, ref._buffers = dict(self._parameters), dict(self._buffers)
        ref.transformer = copy.deepcopy(self.transformer).requires_grad_(False).eval()
        return ref

    def save_pretrained(self, path: str | Path, state_dict: dict[str, Tensor] | None = None) -> None:
        """Writes the transformer (diffusers format) and the source pipeline's id; `state_dict`
        (this module's keys, e.g. gathered from FSDP shards) replaces the live transformer weights;
        a LoRA adapter is merged in."""
        path = Path(path)
        if state_dict is None and not self.has_lora:
            self.transformer.save_pretrained(path / "transformer")
        else:
            state_dict = state_dict if state_dict is not None else self.state_dict()
            state_dict = merge_lora(state_dict, self.lora_scaling or 1.0)  # plain weights: loads without peft
            from safetensors.torch import save_file

            (path / "transformer").mkdir(parents=True, exist_ok=True)
            self.transformer.save_config(path / "transformer")
            weights = {k.removeprefix("transformer."): v.detach().cpu().contiguous()
                       for k, v in state_dict.items() if k.startswith("transformer.")}
            save_file(weights, str(path / "transformer" / "diffusion_pytorch_model.safetensors"))
        (path / "flow_policy.json").write_text(json.dumps({"class": type(self).__name__, **self.options()}))

    @classmethod
    def from_pretrained(cls, path: str | Path, **kwargs):
        """Loads a `save_pretrained` folder (source pipeline + trained transformer) or a pipeline itself."""
        path = Path(path)
        meta = path / "flow_policy.json"
        if not meta.is_file():
            return cls(str(path), **kwargs)
        options = json.loads(meta.read_text())
        saved_by = options.pop("class", cls.__name__)
        if saved_by != cls.__name__:
            raise ValueError(f"{path} was saved by {saved_by}; load it with {saved_by}.from_pretrained")
        policy = cls(**{**options, **kwargs})
        dtype = next(policy.transformer.parameters()).dtype
        policy.transformer = type(policy.transformer).from_pretrained(path / "transformer", dtype=dtype)
        return policy


class DiffusersFlowPolicy(PipelineFlowPolicy, SD3FlowPolicy):
    """SD3 / SD3.5 from a diffusers pipeline folder or Hub id; only the transformer trains.

    Text conditioning is the pipeline's own `encode_prompt` (CLIP-L, CLIP-G, T5; frozen; the
    unconditional prompt is "" as in SD3), decoding is its VAE with the latent scaling and shift
    factors. Tested on a tiny random SD3 pipeline built locally.

    Args:
        pretrained: local folder or Hub id of a `StableDiffusion3Pipeline`.
        resolution: image side in pixels (latent side = resolution / 8).
        torch_dtype: "float32", "bfloat16" or "float16" for every component.
        max_sequence_length: T5 tokens.
        shift: scheduler shift; None keeps the pipeline's.
        drop_t5: load without the T5 encoder (SD3 then reads zeros in its place; saves memory).
    """

    def __init__(self, pretrained: str, resolution: int = 512, torch_dtype: str = "bfloat16",
                 max_sequence_length: int = 128, shift: float | None = None, drop_t5: bool = False):
        from diffusers import StableDiffusion3Pipeline

        no_t5 = {"text_encoder_3": None, "tokenizer_3": None} if drop_t5 else {}
        pipe = StableDiffusion3Pipeline.from_pretrained(pretrained, dtype=getattr(torch, torch_dtype), **no_t5)
        super().__init__(shift=pipe.scheduler.config.shift if shift is None else shift)
        self.pretrained, self.resolution, self.max_sequence_length = pretrained, resolution, max_sequence_length
        self.torch_dtype, self.drop_t5 = torch_dtype, drop_t5
        self.adopt_pipeline(pipe)

    def options(self) -> dict[str, Any]:
        return {"pretrained": self.pretrained, "resolution": self.resolution, "torch_dtype": self.torch_dtype,
                "max_sequence_length": self.max_sequence_length, "shift": self.scheduler.config.shift,
                "drop_t5": self.drop_t5}

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        side = self.resolution // self._pipe.vae_scale_factor
        return (self.transformer.config.in_channels, side, side)

    @torch.no_grad()
    def encode_text(self, prompts: Sequence[Prompt]) -> TextCondition:
        texts = ["" if p is None else p for p in prompts]
        hidden, _, pooled, _ = self._pipe.encode_prompt(
            prompt=texts, prompt_2=None, prompt_3=None, device=self.device, do_classifier_free_guidance=False,
            max_sequence_length=self.max_sequence_length)
        return TextCondition(hidden, pooled)


# ---- the built-in model --------------------------------------------------------------------------
@dataclass
class TinyFlowConfig:
    """The built-in flow model: SD3 transformer size, text encoder, latent cells, schedule shift.

    The latent is a `(1 + 4 + 10, canvas/cell, canvas/cell)` grid: per cell an object flag, the
    shape one-hot and the colour one-hot, as +-`latent_scale` (background: all minus).
    """

    num_layers: int = 4
    num_heads: int = 4
    head_dim: int = 32
    text_dim: int = 64
    text_len: int = 12
    #: init std of the text encoder's position embeddings; 1.0 matches the word embeddings' N(0, 1),
    #: so word order (which colour / relation goes with which shape) is visible after the LayerNorm.
    #: At 0.02 the encoder is a bag of words and bindings are guessed (benchmarks/learning.md).
    text_position_std: float = 1.0
    #: transformer layers in the text encoder (contextual token states and an order-aware pooled
    #: vector); 0 = embeddings only, the pooled vector a bag of words
    text_layers: int = 1
    #: spread of the image cells' 2-D sincos positions (SD3's table at positions 0, k, 2k, ...):
    #: at 1 (SD3's own, made for 64+ patches) two neighbouring cells of the 4x4 grid differ by 1.5
    #: of norm 8, too faint for the relations between cells (position, counting without touching)
    image_position_spread: float = 4.0
    #: the image position table is a parameter (starts at the sincos table) rather than a buffer
    image_position_learned: bool = True
    shift: float = 1.0
    canvas: int = 32
    cell: int = 8
    latent_scale: float = 1.0
    words: list[str] = field(default_factory=world_words)

    def __post_init__(self) -> None:
        if self.canvas % self.cell:
            raise ValueError(f"canvas ({self.canvas}) must be a multiple of cell ({self.cell})")

    @property
    def world(self) -> WorldConfig:
        """The world this model draws: one `cell`-px object per cell, a free cell between objects."""
        return WorldConfig(canvas=self.canvas, sizes=(self.cell,), grid=self.cell, gap=1)

    @property
    def sizes(self) -> tuple[int, ...]:
        return (self.cell,)


#: What a folder saved before a `TinyFlowConfig` field existed was trained with (not the field's
#: default now): no text layers, SD3's own fixed image positions.
FOLDER_DEFAULTS_BEFORE_FIELDS: dict[str, Any] = {
    "text_layers": 0, "image_position_spread": 1.0, "image_position_learned": False}


class WordTextEncoder(nn.Module):
    """Learned word + position embeddings over a closed vocabulary -> `TextCondition`.

    Prompts are right-padded / truncated to `text_len` words; the unconditional prompt is a
    learned [NULL] sequence. Token states: LayerNorm of word + position embeddings after `layers`
    transformer layers (padding masked); pooled = MLP(masked mean of those states), or of the
    word embeddings alone when `layers` is 0 (then a bag of words: it cannot bind a colour to
    a shape, and the MMDiT's joint attention learnt no binding from the token states either,
    benchmarks/learning.md).
    """

    PAD, NULL, UNK = 0, 1, 2

    def __init__(self, words: Sequence[str], dim: int, text_len: int, position_std: float = 1.0, layers: int = 0):
        super().__init__()
        self.tokenizer = WordTokenizer(words)
        self.text_len = text_len
        self.embed = nn.Embedding(len(self.tokenizer) + 3, dim)  # N(0, 1) rows
        # Joint attention has no text positions of its own: these are the only word-order signal.
        self.pos = nn.Parameter(torch.randn(text_len, dim) * position_std)
        self.layers = nn.ModuleList(
            nn.TransformerEncoderLayer(dim, max(dim // 32, 1), 4 * dim, dropout=0.0, batch_first=True, norm_first=True)
            for _ in range(layers))
        self.norm = nn.LayerNorm(dim)
        self.pool = nn.Sequential(nn.Linear(dim, dim), nn.SiLU(), nn.Linear(dim, dim))

    def ids(self, prompts: Sequence[Prompt]) -> Tensor:
        """long `[B, text_len]`."""
        rows = []
        for p in prompts:
            # word ids shift by 3 past the specials; unknown words (-1) land on UNK (2)
            ids = [self.NULL] * self.text_len if p is None else [i + 3 for i in self.tokenizer.encode(p, unk_id=-1)]
            ids = ids[: self.text_len]
            rows.append(ids + [self.PAD] * (self.text_len - len(ids)))
        return torch.tensor(rows, dtype=torch.long, device=self.pos.device)

    def forward(self, prompts: Sequence[Prompt]) -> TextCondition:
        ids = self.ids(prompts)
        tok = self.embed(ids)
        real = (ids != self.PAD).unsqueeze(-1).to(tok.dtype)
        h = tok + self.pos
        # An empty prompt (a text policy may write one) keeps its first slot unmasked: a row with
        # every key masked is NaN on PyTorch's fused inference path (eval, no grad), e.g. in the
        # frozen reference, and that NaN reached the velocity penalty and every weight.
        pad = ids == self.PAD
        pad[:, 0] &= ~pad.all(1)
        for layer in self.layers:
            h = layer(h, src_key_padding_mask=pad)
        h = self.norm(h)
        # without layers the pooled vector is the bag of word embeddings (how such folders were trained)
        source = h if len(self.layers) else tok
        return TextCondition(h, self.pool((source * real).sum(1) / real.sum(1).clamp(min=1)))


class CellCodec(nn.Module):
    """Scenes <-> cell latents. Encoding is exact for scenes rendered on the cell grid; decoding
    snaps each cell's vector to the nearest code (L2) and paints that cell's rendered patch."""

    def __init__(self, cfg: TinyFlowConfig):
        super().__init__()
        self.tokenizer = PatchTokenizer(cfg.world)  # codes: background + one per (colour, shape)
        self.side = cfg.canvas // cfg.cell
        patches = self.tokenizer._patches  # uint8 [K, 3, cell, cell]
        table = -torch.ones(len(patches), 1 + len(SHAPES) + len(COLORS))
        bg = torch.tensor(BACKGROUND, dtype=torch.uint8).view(3, 1, 1)
        for ci, color in enumerate(COLORS):
            fg = torch.tensor(PALETTE[color], dtype=torch.uint8).view(3, 1, 1)
            for si, shape in enumerate(SHAPES):
                patch = torch.where(shape_mask(shape, cfg.cell), fg, bg)
                k = int((patches == patch).flatten(1).all(1).nonzero()[0])
                table[k, 0] = table[k, 1 + si] = table[k, 1 + len(SHAPES) + ci] = 1.0
        self.register_buffer("codes", table * cfg.latent_scale, persistent=False)  # [K, C]

    @property
    def channels(self) -> int:
        return self.codes.shape[1]

    def tokens_to_latents(self, tokens: Tensor) -> Tensor:
        """long `[B, L]` -> `[B, C, side, side]`."""
        lat = self.codes[tokens.to(self.codes.device)]  # [B, L, C]
        return lat.transpose(1, 2).reshape(tokens.shape[0], self.channels, self.side, self.side)

    def code_distances(self, latents: Tensor) -> Tensor:
        """`[B, C, side, side]` -> `[B, L, K]` L2 distance of each cell's vector to each code."""
        flat = latents.float().flatten(2).transpose(1, 2)  # [B, L, C]
        return torch.cdist(flat, self.codes.unsqueeze(0).expand(flat.shape[0], -1, -1))

    def latents_to_tokens(self, latents: Tensor) -> Tensor:
        """`[B, C, side, side]` -> nearest code ids long `[B, L]`."""
        return self.code_distances(latents).argmin(-1)

    def encode(self, images: Tensor) -> Tensor:
        return self.tokens_to_latents(self.tokenizer.encode(images.cpu()))

    def decode(self, latents: Tensor) -> Tensor:
        return self.tokenizer.decode(self.latents_to_tokens(latents).cpu())

    def snap_distance(self, latents: Tensor) -> Tensor:
        """`[B, C, side, side]` -> `[B]` mean L2 distance of each cell to its nearest code, in units of
        the distance between two codes that differ in one attribute (so 0.5 = half way to a wrong cell)."""
        return self.code_distances(latents).amin(-1).mean(-1) / (2 * self.codes.abs().max() * 2**0.5)


class TinyFlowModel(SD3FlowPolicy):
    """The built-in flow policy: a tiny `SD3Transformer2DModel` (patch 1) over cell latents.

    About 2M parameters at the defaults; one step of batch 64 takes tens of milliseconds.
    """

    def __init__(self, config: TinyFlowConfig | None = None, **overrides):
        cfg = config or TinyFlowConfig(**overrides)
        super().__init__(shift=cfg.shift)
        from diffusers import SD3Transformer2DModel

        self.config = cfg
        self.codec = CellCodec(cfg)
        self.text_encoder = WordTextEncoder(cfg.words, cfg.text_dim, cfg.text_len, cfg.text_position_std,
                                            cfg.text_layers)
        side, inner = cfg.canvas // cfg.cell, cfg.num_heads * cfg.head_dim
        self.transformer = SD3Transformer2DModel(
            sample_size=side, patch_size=1, in_channels=self.codec.channels, out_channels=self.codec.channels,
            num_layers=cfg.num_layers, attention_head_dim=cfg.head_dim, num_attention_heads=cfg.num_heads,
            joint_attention_dim=cfg.text_dim, caption_projection_dim=inner, pooled_projection_dim=cfg.text_dim,
            pos_embed_max_size=side,
        )
        self._set_image_positions(cfg, inner, side)

    def _set_image_positions(self, cfg: TinyFlowConfig, inner: int, side: int) -> None:
        """Replace the PatchEmbed's sincos buffer by the spread (and optionally learned) table; the
        state-dict key stays `transformer.pos_embed.pos_embed`, so folders load either way."""
        from diffusers.models.embeddings import get_2d_sincos_pos_embed

        patch = self.transformer.pos_embed
        table = get_2d_sincos_pos_embed(inner, side, base_size=side, interpolation_scale=1.0 / cfg.image_position_spread,
                                        output_type="pt").float().unsqueeze(0)  # [1, side*side, inner]
        del patch.pos_embed
        if cfg.image_position_learned:
            patch.pos_embed = nn.Parameter(table)
        else:
            patch.register_buffer("pos_embed", table)

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        side = self.config.canvas // self.config.cell
        return (self.codec.channels, side, side)

    @property
    def world(self) -> WorldConfig:
        return self.config.world

    def encode_text(self, prompts: Sequence[Prompt]) -> TextCondition:
        return self.text_encoder(prompts)

    def encode_images(self, images: Tensor) -> Tensor:
        return self.codec.encode(images).to(self.device)

    def decode(self, latents: Tensor) -> Tensor:
        return self.codec.decode(latents)

    def off_manifold(self, latents: Tensor) -> Tensor:
        """Mean distance of the latent cells to the nearest code (`CellCodec.snap_distance`)."""
        return self.codec.snap_distance(latents)

    @property
    def text_trainable(self) -> bool:
        return any(p.requires_grad for p in self.text_encoder.parameters())

    def save_pretrained(self, path: str | Path, state_dict: dict[str, Tensor] | None = None) -> None:
        """config.json + model.safetensors; LoRA adapters are merged into plain weights."""
        state_dict = state_dict if state_dict is not None else self.state_dict()
        save_folder(path, self.config, merge_lora(state_dict, self.lora_scaling or 1.0))

    @classmethod
    def from_pretrained(cls, path: str | Path, **overrides) -> "TinyFlowModel":
        saved = {**FOLDER_DEFAULTS_BEFORE_FIELDS, **read_config(path, cls.__name__), **overrides}
        return load_weights(cls(TinyFlowConfig(**saved)), path)
