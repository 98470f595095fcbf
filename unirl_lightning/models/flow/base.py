"""The flow-policy interface and what a rollout carries between sampling and training.

A flow policy predicts a velocity ``v ~ noise - x0`` at ``x_s = s*noise + (1-s)*x0`` (diffusers'
convention, ``s`` from 1 to 0). Sampling runs the schedule of diffusers'
``FlowMatchEulerDiscreteScheduler`` (with its ``shift``) and takes every transition with
``objectives.sde_step``, so each stochastic step is a Gaussian policy with a log-prob that
FlowGRPO trains; ``noise_level=0`` is diffusers' Euler loop exactly.

:class:`FlowPolicy` is the interface the recipes use (``encode_text``, ``velocity`` with CFG,
``decode``, ``sample`` -> :class:`FlowRollout`, ``step_log_prob``, ``make_reference``,
``save_pretrained`` / ``from_pretrained``, and ``add_lora`` / ``adapters_disabled`` for LoRA
training against the base model).
"""

from __future__ import annotations

from abc import abstractmethod
from dataclasses import dataclass, replace
from typing import ContextManager, Sequence

import torch
from torch import Tensor

from unirl_lightning.models.policy import Policy
from unirl_lightning.objectives.flow_sde import SDE_KINDS, sde_step
from unirl_lightning.objectives.guidance import cfg_combine

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
        return TextCondition(
            torch.cat([first.hidden, second.hidden]), torch.cat([first.pooled, second.pooled])
        )


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
        return replace(
            self,
            prompts=[self.prompts[i] for i in idx.tolist()],
            latents=self.latents[idx],
            log_probs=self.log_probs[idx],
            images=None if self.images is None else self.images[idx.cpu()],
            row_mask=None if self.row_mask is None else self.row_mask[idx],
        )


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
        raise ValueError(
            f"sde_windows must be [B, 2] (one [start, end) per row), got shape {tuple(windows.shape)}"
        )
    start, end = windows[:, :1].long(), windows[:, 1:].long()
    bad = ~((0 <= start) & (start < end) & (end <= num_steps)).flatten()
    if bad.any():
        row = int(bad.nonzero()[0])
        raise ValueError(
            f"sde_windows row {row}: {windows[row].tolist()} must satisfy 0 <= start < end <= "
            f"num_steps={num_steps}"
        )
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
            0, self.row_group, rows, "amin"
        )

    def check_prompts(self, prompts: list[str]) -> None:
        if len(self.row_group) != len(prompts):
            raise ValueError(
                f"groups has {len(self.row_group)} entries for {len(prompts)} prompts; "
                "give one group id per row"
            )
        firsts = self.first[self.row_group].tolist()
        for row, first in enumerate(firsts):
            if prompts[row] != prompts[first]:
                raise ValueError(
                    f"groups: row {row} ({prompts[row]!r}) shares a group with row {first} "
                    f"({prompts[first]!r}); rows of a group must share their prompt"
                )

    def expand(self, per_group: Tensor) -> Tensor:
        return per_group[self.row_group]

    def check_latents(self, latents: Tensor) -> None:
        if not torch.equal(latents, self.expand(latents[self.first])):
            raise ValueError("groups: rows of a group must start from the same latents (one noise per group)")

    def check_windows(self, stochastic: Tensor) -> None:
        if not torch.equal(stochastic, self.expand(stochastic[self.first])):
            raise ValueError("groups: rows of a group must share their SDE window (sde_windows)")


# ---- the interface ---------------------------------------------------------------------------
class FlowPolicy(Policy):
    """Base class of flow-matching image policies behind FlowGRPO.

    Subclasses implement `encode_text`, `forward_velocity`, `decode`, `latent_shape`, and
    `save_pretrained` / `from_pretrained` (recipes save the trained policy and load warm starts
    with them); the base gives CFG, the schedule, sampling with per-step log-probs, re-scoring,
    and the reference. `unirl_lightning.testing.FlowPolicyTesterMixin` checks a subclass.
    """

    #: diffusers' timestep scale: the transformer reads `t = sigma * num_train_timesteps`.
    num_train_timesteps: int = 1000

    fsdp_entry_points: tuple[str, ...] = ("sample", "step_log_prob", "velocity", "encode_text")

    def __init__(self, shift: float = 1.0):
        super().__init__()
        from diffusers import FlowMatchEulerDiscreteScheduler

        self.scheduler = FlowMatchEulerDiscreteScheduler(
            num_train_timesteps=self.num_train_timesteps, shift=shift
        )

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
        return cfg_combine(v_c, v_u, cfg_scale)

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
            stochastic = torch.tensor(_window_mask(num_steps, sde_window), device=self.device).expand(
                batch, -1
            )
        else:
            if sde_window is not None:
                raise ValueError("give sde_window (one for the batch) or sde_windows (one per row), not both")
            if len(sde_windows) != batch:
                raise ValueError(
                    f"sde_windows has {len(sde_windows)} rows for {batch} prompts; give one window per row"
                )
            stochastic = _row_window_mask(num_steps, sde_windows).to(self.device)
        stochastic = stochastic & (noise_level > 0)  # `[B, T]`
        cond = self.encode_text(list(prompts))
        shared = None if groups is None else _GroupRows(groups, self.device)
        if shared is not None:
            shared.check_prompts(list(prompts))
            shared.check_windows(stochastic)
        if latents is None:
            latents = (
                self.initial_noise(batch, generator)
                if shared is None
                else shared.expand(self.initial_noise(shared.count, generator))
            )
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
            rows = (
                None
                if pending is None or not bool(pending.any())
                else torch.cat([shared.first[group_start > i], (~pending).nonzero().flatten()])
            )
            xs, cs = (x, cond) if rows is None else (x[rows], cond.select(rows))
            v = self.velocity(xs, sig[i].expand(len(xs)), cs, cfg_scale=cfg_scale)
            x_next, logp = self._step_rows(
                v,
                xs,
                sig[i],
                sig[i + 1],
                stochastic[:, i] if rows is None else stochastic[rows, i],
                noise_level,
                kind,
                generator,
            )
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
            prompts=list(prompts),
            latents=torch.stack(states, 1),
            log_probs=torch.stack(log_probs, 1),
            sigmas=sig,
            noise_levels=train_mask.float() * noise_level,
            train_mask=train_mask,
            cfg_scale=cfg_scale,
            kind=kind,
            images=self.decode(x) if decode else None,
            row_mask=None if sde_windows is None else stochastic,
        )

    @staticmethod
    def _step_rows(
        v: Tensor,
        x: Tensor,
        sigma: Tensor,
        sigma_next: Tensor,
        stochastic: Tensor,
        noise_level: float,
        kind: str,
        generator: torch.Generator | None,
    ) -> tuple[Tensor, Tensor]:
        """One transition of rows `x` `[b, ...]`: SDE where `stochastic` (bool `[b]`), else Euler -> (x',
        log_prob `[b]`)."""
        if bool(stochastic.all()) or not bool(
            stochastic.any()
        ):  # one call: the random stream of a shared window
            x_next, logp, _, _ = sde_step(
                v,
                x,
                sigma,
                sigma_next,
                noise_level=noise_level if bool(stochastic.any()) else 0.0,
                kind=kind,
                generator=generator,
            )
            return x_next, logp
        x_next, logp = torch.empty_like(x), x.new_zeros(len(x), dtype=torch.float32)
        for part, level in ((stochastic, noise_level), (~stochastic, 0.0)):
            idx = part.nonzero().flatten()
            x_next[idx], logp[idx], _, _ = sde_step(
                v[idx], x[idx], sigma, sigma_next, noise_level=level, kind=kind, generator=generator
            )
        return x_next, logp

    def step_log_prob(self, rollout: FlowRollout, step: int, cond: TextCondition | None = None) -> StepOutput:
        """Re-score transition `step` of `rollout` under the current parameters (with gradient).

        Uses the rollout's CFG scale, noise level and kind, so on-policy ratios are exactly 1.
        `cond` (batch `len(rollout)`) skips re-encoding the prompts.
        """
        cond = self.encode_text(rollout.prompts) if cond is None else cond
        return self._rescore(
            rollout,
            rollout.latents[:, step],
            rollout.latents[:, step + 1],
            rollout.sigmas[step],
            rollout.sigmas[step + 1],
            float(rollout.noise_levels[step]),
            cond,
        )

    def pairs_log_prob(
        self, rollout: FlowRollout, rows: Tensor, steps: Tensor, cond: TextCondition | None = None
    ) -> StepOutput:
        """Re-score transitions `(rows[p], steps[p])` of `rollout` (long `[P]` each) in one batch of `P`,
        with gradient: per-row windows train every row's own steps in one forward, not one per step.

        `cond` (batch `P`, the rows' conditions in pair order) skips re-encoding the prompts.
        The pairs' steps must share one noise level (the rollout's stochastic steps do).
        """
        levels = rollout.noise_levels[steps]
        if not bool((levels == levels[0]).all()):
            raise ValueError(
                f"pairs_log_prob: steps {sorted(set(steps.tolist()))} have different noise levels "
                f"{sorted(set(levels.tolist()))}; re-score them in separate calls"
            )
        cond = self.encode_text([rollout.prompts[r] for r in rows.tolist()]) if cond is None else cond
        return self._rescore(
            rollout,
            rollout.latents[rows, steps],
            rollout.latents[rows, steps + 1],
            rollout.sigmas[steps],
            rollout.sigmas[steps + 1],
            float(levels[0]),
            cond,
        )

    def _rescore(
        self,
        rollout: FlowRollout,
        x: Tensor,
        x_next: Tensor,
        sigma: Tensor,
        sigma_next: Tensor,
        noise_level: float,
        cond: TextCondition,
    ) -> StepOutput:
        """Log-prob of the transitions `x -> x_next` (`[b, ...]`; sigmas 0-d or `[b]`) with the rollout's CFG
        and kind."""
        v = self.velocity(x, sigma.expand(x.shape[0]), cond, cfg_scale=rollout.cfg_scale)
        _, logp, mean, std = sde_step(
            v, x, sigma, sigma_next, noise_level=noise_level, kind=rollout.kind, prev_sample=x_next
        )
        return StepOutput(logp, v, mean, std)

    # -- LoRA: recipes add adapters after the warm start; the base model is then the reference
    #: alpha / r of the LoRA adapter, None without one
    lora_scaling: float | None = None

    def add_lora(self, rank: int, alpha: float | None = None, targets: Sequence[str] | None = None) -> None:
        """Freeze the policy and add a trainable LoRA adapter (rank `rank`, scale alpha / rank) on
        `targets`."""
        raise NotImplementedError(f"{type(self).__name__} does not support LoRA")

    @property
    def has_lora(self) -> bool:
        return self.lora_scaling is not None

    def adapters_disabled(self) -> ContextManager[None]:
        """Context in which the policy computes as its base model (the LoRA reference)."""
        raise NotImplementedError(f"{type(self).__name__} has no LoRA adapter")
