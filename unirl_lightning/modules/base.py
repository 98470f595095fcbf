"""The base of every recipe: a policy with its warm start, AdamW, FSDP2 sharding, the GenEval judge,
and saving the trained policy.

`PolicyModule` (unified models) and `FlowPolicyModule` (flow models) add their validation loops;
the recipes add their training steps.
"""

from __future__ import annotations

from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import nn

from unirl_lightning.callbacks.save_on_exception import SaveOnException
from unirl_lightning.evaluation.detection import Detector
from unirl_lightning.evaluation.judge import GenEvalJudge
from unirl_lightning.evaluation.metrics import GenEvalScore
from unirl_lightning.modules.training import count_bad_rewards, expect_frozen_eval_modules
from unirl_lightning.rewards.base import RolloutContext, describe_sample
from unirl_lightning.worlds.detector import WorldDetector


class RecipeModule(L.LightningModule):
    """Policy, warm start, optimiser, sharding and saving shared by the recipes.

    Args:
        policy: the model being trained (a `UnifiedPolicy` or a `FlowPolicy`).
        warm_start: "auto" (a built-in model: its cached warm start, trained on first use; a no-op
            for pretrained policies), a folder written by `save_pretrained`, or None (keep the
            initial weights).
        lr, weight_decay, betas: AdamW settings.
        detector: GenEval detector (default: the synthetic world's exact detector).
        grid_size: images in the logged validation grid.
        save_to: folder to `save_pretrained` the policy into at the end of fit; an existing
            non-empty folder is refused (before any compute) unless overwrite=True.
    """

    #: init arguments kept out of `hparams` (models and callables: not hyper-parameters)
    hparams_ignore: tuple[str, ...] = ("policy", "detector", "rewards")

    def __init__(
        self,
        policy: nn.Module,
        warm_start: str | None = "auto",
        lr: float = 1e-5,
        weight_decay: float = 0.0,
        betas: tuple[float, float] = (0.9, 0.999),
        detector: Detector | None = None,
        grid_size: int = 16,
        save_to: str | None = None,
        overwrite: bool = False,
    ):
        super().__init__()
        # Called here, while every subclass's __init__ frame is on the stack, so `hparams` holds the
        # arguments of the whole chain, defaults included.
        self.save_hyperparameters(ignore=list(self.hparams_ignore))
        if save_to and Path(save_to).is_dir() and any(Path(save_to).iterdir()) and not overwrite:
            raise FileExistsError(
                f"model.save_to: {save_to} exists and is not empty; "
                "pick another folder or set overwrite: true"
            )
        self.policy = policy
        self.judge = GenEvalJudge(detector or WorldDetector())
        self.val_geneval = GenEvalScore()
        self._warm_started = False
        self.skipped_steps = 0  # optimiser steps skipped for non-finite gradients (shared.guarded_step)
        self.empty_batches = 0  # rollout batches with nothing to train (every group tied or filtered out)
        self.bad_rewards = 0  # samples whose reward was NaN or inf, left out of advantages and losses
        self._warned_bad_rewards = False

    # ---- rewards ----------------------------------------------------------------------
    def screen_rewards(self, rewards: torch.Tensor, ctx: RolloutContext) -> tuple[torch.Tensor, int, bool]:
        """This rank's mask of finite rewards `[N]`, this step's count of NaN / inf rewards over every
        rank (added to `self.bad_rewards`, logged as `train/bad_rewards`), and whether every sample of
        the step is bad on every rank (the recipe then skips its backward; the same answer on every
        rank). The first time a step has bad rewards, a warning names the reward and a prompt."""
        finite, bad, total = count_bad_rewards(self, rewards)
        self.bad_rewards += bad
        if bad and not self._warned_bad_rewards:
            self._warned_bad_rewards = True
            terms = ctx.cache.get("bad_reward_terms", {})
            names = ", ".join(f"{name!r} ({k} samples)" for name, k in terms.items())
            local = (~finite).nonzero().flatten().tolist()
            where = f" from reward {names}" if names else ""
            if local:  # this rank's: the others' samples are not here
                where += f", e.g. on prompt {describe_sample(ctx.specs[local[0]])}"
            rank_zero_warn(
                f"{type(self).__name__}: {bad} of {total} rewards at step {self.global_step} are NaN or inf"
                f"{where}; those samples are left out of the advantages and the loss"
                + (" (every sample: the step trains nothing)" if bad == total else "")
                + "; counted in train/bad_rewards (later ones without a warning)"
            )
        return finite, bad, bad == total

    # ---- warm start -------------------------------------------------------------------
    def auto_warm_start(self) -> Path | None:
        """Folder of the policy's cached warm start for warm_start="auto" (None: nothing to load)."""
        return None

    def setup(self, stage: str) -> None:
        if self._warm_started or self.hparams.warm_start is None:
            return
        self._warm_started = True
        source = self.hparams.warm_start
        if source == "auto":
            source = self.auto_warm_start()
            if source is None:
                return
        if not Path(source).is_dir():
            raise FileNotFoundError(
                f"model.warm_start: {source!r} is not a folder written by save_pretrained"
            )
        loaded = type(self.policy).from_pretrained(source)
        self.policy.load_state_dict(loaded.state_dict())
        self.on_warm_started()

    def on_fit_start(self) -> None:
        expect_frozen_eval_modules(self)  # the frozen reference and encoders are in eval mode by design

    def on_warm_started(self) -> None:
        """Hook: runs after the warm-start weights are loaded (e.g. to copy the reference)."""

    # ---- saving -----------------------------------------------------------------------
    def configure_callbacks(self) -> list[L.Callback]:
        return [SaveOnException()] if self.hparams.save_to else []

    def on_train_end(self) -> None:
        if self.hparams.save_to:
            self.save_policies(self.hparams.save_to)

    def save_policies(self, path: str | Path) -> None:
        """Save every trained model of the recipe under `path` (the policy; recipes with more add theirs)."""
        self.save_model(self.policy, path)

    def save_model(self, model: nn.Module, path: str | Path) -> None:
        """`model.save_pretrained(path)` on rank 0; a sharded model's full weights are gathered
        first (every rank must call this)."""
        full = None
        if getattr(model, "_fsdp_sharded", False):  # every rank joins the gather; rank 0 writes
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

            full = get_model_state_dict(
                model, options=StateDictOptions(full_state_dict=True, cpu_offload=True)
            )
        if self.trainer.is_global_zero:
            if full is None:
                model.save_pretrained(path)
            else:
                model.save_pretrained(path, state_dict=full)

    # ---- sharding and optimiser -------------------------------------------------------
    def sharded_modules(self) -> list[nn.Module]:
        """The models FSDP shards: the policy and its frozen reference (recipes with more add them)."""
        return [m for m in (self.policy, getattr(self, "reference", None)) if m is not None]

    def configure_model(self) -> None:
        """FSDP2 under Lightning's ModelParallelStrategy: shard each model's units, then the model
        over the data-parallel mesh, and register the methods that read parameters outside
        `forward` (`fsdp_entry_points`) so they gather them. `fsdp_ignored_params` (e.g. frozen
        encoders shared with the reference) stay whole on every rank."""
        mesh = self.device_mesh
        if mesh is None:
            return
        from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method

        dp = mesh["data_parallel"] if mesh.mesh_dim_names and "data_parallel" in mesh.mesh_dim_names else mesh
        for model in self.sharded_modules():
            if hasattr(model, "_fsdp_sharded"):
                continue
            ignored = getattr(model, "fsdp_ignored_params", set)()
            for unit in getattr(model, "fsdp_units", list)():
                fully_shard(unit, mesh=dp)
            fully_shard(model, mesh=dp, **({"ignored_params": ignored} if ignored else {}))
            for name in getattr(model, "fsdp_entry_points", ()):
                register_fsdp_forward_method(model, name)
            model._fsdp_sharded = True

    def configure_optimizers(self):
        params = [p for p in self.policy.parameters() if p.requires_grad]
        return torch.optim.AdamW(
            params,
            lr=self.hparams.lr,
            weight_decay=self.hparams.weight_decay,
            betas=tuple(self.hparams.betas),
        )
