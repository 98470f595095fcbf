"""The base of every recipe: a policy with its warm start, AdamW, FSDP2 sharding, the GenEval judge,
and saving the trained policy.

`PolicyModule` (unified models) and `FlowPolicyModule` (flow models) add their validation loops;
the recipes add their training steps.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import nn

from unirl_lightning.callbacks.save_on_exception import STATE_FILE, SaveOnException, interrupted_run_state
from unirl_lightning.evaluation.detection import Detector
from unirl_lightning.evaluation.judge import GenEvalJudge
from unirl_lightning.evaluation.metrics import GenEvalScore
from unirl_lightning.modules.resume import (
    check_resume_settings,
    config_of,
    flatten,
    lr_by_group,
    rescale_resumed_lrs,
    run_settings,
    short,
)
from unirl_lightning.modules.training import (
    count_bad_rewards,
    expect_frozen_eval_modules,
    rng_states,
    set_rng_states,
)
from unirl_lightning.rewards.base import RolloutContext, describe_sample
from unirl_lightning.rewards.geneval import GenEvalReward
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
    #: counters of the run, saved in checkpoints (a resumed run keeps counting)
    run_counters: tuple[str, ...] = ("skipped_steps", "empty_batches", "bad_rewards")
    #: resume from a checkpoint whose settings differ from this run's (the CLI's
    #: --override_checkpoint_settings); otherwise such a resume is refused, naming the fields
    override_checkpoint_settings: bool = False
    #: the checkpoint this fit resumes from, when known before `setup` (the CLI sets it): the warm
    #: start is then not loaded (Lightning reads the checkpoint only after `setup`)
    resuming_from: str | None = None

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
        # An interrupted run's export (training_state.json: finished false) is the folder the same
        # run writes to again when it resumes; a new run is refused it at train start
        # (SaveOnException.on_train_start: only then does the trainer know its checkpoint).
        self._save_to_interrupted: dict | None = None
        if save_to and Path(save_to).is_dir() and any(Path(save_to).iterdir()) and not overwrite:
            self._save_to_interrupted = interrupted_run_state(save_to)
            if self._save_to_interrupted is None:
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
        self._resume: dict[str, Any] | None = None  # what on_load_checkpoint read, applied at train start
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
    def resuming(self, stage: str) -> bool:
        """Whether this fit starts from a checkpoint (warm starts are then skipped)."""
        known = self.resuming_from or (self._trainer is not None and self.trainer.ckpt_path)
        return stage == "fit" and bool(known)

    def auto_warm_start(self) -> Path | None:
        """Folder of the policy's cached warm start for warm_start="auto" (None: nothing to load)."""
        return None

    def setup(self, stage: str) -> None:
        self.share_judge()
        if self._warm_started or self.hparams.warm_start is None:
            return
        if self.resuming(stage):
            return  # the checkpoint holds the weights
        self._warm_started = True
        source = self.hparams.warm_start
        if source == "auto":
            source = self.auto_warm_start()
            if source is None:
                return
        load_warm_start(self.policy, source, "model.warm_start")
        self.on_warm_started()

    def on_fit_start(self) -> None:
        expect_frozen_eval_modules(self)  # the frozen reference and encoders are in eval mode by design

    # ---- checkpoints: everything that decides the rest of the run -------------------------
    def run_settings(self) -> dict[str, Any]:
        """The settings a checkpoint must agree with to be resumed (see `modules.resume`)."""
        return run_settings(self)

    def lr_by_group(self, hparams: dict) -> list[float]:
        """The configured learning rate of each optimiser parameter group under `hparams`."""
        return lr_by_group(hparams)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # Lightning saves weights, optimiser, LR schedule, loops, callbacks and the DataModule; the
        # random streams, the run's counters and its settings are the recipe's to save.
        checkpoint["unirl"] = {
            "rng": rng_states(),
            "counters": {name: getattr(self, name) for name in self.run_counters},
            "settings": self.run_settings(),
            "lrs": self.lr_by_group(dict(self.hparams)),
        }

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        saved = checkpoint.get("unirl")
        if saved is None:
            raise ValueError(
                "ckpt_path: this checkpoint was not written by a unirl_lightning recipe (no run state); "
                "start a new run, or load its weights with model.warm_start"
            )
        check_resume_settings(saved["settings"], self.run_settings(), self.override_checkpoint_settings)
        for name, value in saved["counters"].items():
            setattr(self, name, value)
        self._resume = saved

    def on_train_start(self) -> None:
        if self._resume is None:
            return
        # After the optimiser and schedule are restored, and after the sanity check (validation
        # draws from its own isolated streams): continue the random streams where they were saved.
        set_rng_states(self._resume["rng"])
        changed = rescale_resumed_lrs(self, self._resume["lrs"], self.lr_by_group(dict(self.hparams)))
        if changed:
            rank_zero_info(f"resumed with learning rates {changed} (the checkpoint's were replaced)")
        self._resume = None

    _val_rng: dict[str, Any] | None = None

    def on_validation_start(self) -> None:
        # Validation must not shift the training stream: a run validated at other steps (or resumed
        # from a checkpoint written before a validation) draws the same rollouts.
        self._val_rng = rng_states()

    def on_validation_end(self) -> None:
        if self._val_rng is not None:
            set_rng_states(self._val_rng)
            self._val_rng = None

    def share_judge(self) -> None:
        """GenEval rewards configured without a detector judge with this recipe's (`model.detector`):
        a real-model config names its detector once, for validation and rewards alike."""
        for fn in getattr(self, "rewards", None) or []:
            if isinstance(fn, GenEvalReward) and fn.uses_recipe_detector:
                fn.judge = self.judge

    def on_warm_started(self) -> None:
        """Hook: runs after the warm-start weights are loaded (e.g. to copy the reference)."""

    # ---- saving -----------------------------------------------------------------------
    def configure_callbacks(self) -> list[L.Callback]:
        return [SaveOnException()] if self.hparams.save_to else []

    def on_train_end(self) -> None:
        if self.hparams.save_to:
            self.save_policies(self.hparams.save_to)
            state = Path(self.hparams.save_to) / STATE_FILE
            if self.trainer.is_global_zero and state.is_file():  # the resumed run has now finished
                state.unlink()

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
        encoders shared with the reference) stay whole on every rank; a frozen model's parameters
        are sharded again after each forward."""
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
            options = {"ignored_params": ignored} if ignored else {}
            if not any(p.requires_grad for p in model.parameters()):
                # FSDP2 keeps the root's parameters gathered after a forward, for the backward that
                # follows; a frozen model (the reference) has none, so they would stay whole on every rank
                options["reshard_after_forward"] = True
            fully_shard(model, mesh=dp, **options)
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


# ---- warm starts ----------------------------------------------------------------------------------
#: config entries that say nothing about the architecture (versions, paths, storage dtype)
_CONFIG_NOISE = frozenset(
    {"transformers_version", "_diffusers_version", "torch_dtype", "dtype", "architectures"}
)


def load_warm_start(policy: nn.Module, source: str | Path, field: str) -> None:
    """Load the weights of `source`, a folder written by `save_pretrained`, into `policy`; `field` is
    the config key that named it. A folder of another model class or architecture (other sizes, vocabulary)
    fails here, before any compute, naming the folder, the config fields that differ and the fix
    (rather than as a size mismatch inside `load_state_dict`). When the weights fit but some config
    fields differ (e.g. sampling options), they load with a warning naming those fields: this run keeps
    its own values."""
    cls = type(policy).__name__
    if not Path(source).is_dir():
        raise FileNotFoundError(f"{field}: {str(source)!r} is not a folder written by save_pretrained")
    fix = (
        f"point {field} at a folder saved from a {cls} with this run's config, make the policy's config "
        f"match the folder's, or set {field}: null to start from the policy's initial weights"
    )
    try:
        loaded = type(policy).from_pretrained(source)
    except Exception as error:
        differ = _config_diff(_folder_config(source), config_of(policy))
        raise ValueError(
            f"{field}: {source} cannot be loaded as a {cls} ({type(error).__name__}: {error})"
            f"{'; ' + differ if differ else ''}; {fix}"
        ) from error
    ours, theirs = policy.state_dict(), loaded.state_dict()
    unfit = sorted(set(ours) ^ set(theirs)) + [
        k for k in ours if k in theirs and ours[k].shape != theirs[k].shape
    ]
    differ = _config_diff(config_of(loaded), config_of(policy))
    if unfit:
        shown = ", ".join(unfit[:4]) + (f" and {len(unfit) - 4} more" if len(unfit) > 4 else "")
        raise ValueError(
            f"{field}: {source} holds another architecture than this run's {cls}: "
            + (differ or f"weights that do not fit: {shown}")
            + f"; {fix}"
        )
    policy.load_state_dict(theirs)
    if differ:
        rank_zero_warn(
            f"{field}: the config of {source} differs from this run's ({differ}); its weights fit and are "
            "loaded, and this run keeps its own config"
        )


def _folder_config(source: str | Path) -> dict[str, Any] | None:
    """The folder's `config.json` (None when absent or unreadable)."""
    try:
        return json.loads((Path(source) / "config.json").read_text())
    except (OSError, ValueError):
        return None


def _config_diff(theirs: dict | None, ours: dict | None, shown: int = 8) -> str:
    """How a folder's config differs from this run's: the fields of both whose values differ
    (`name (folder: value, this run: value)`), then the fields only one of them has (a folder of another
    model class); empty when they agree or either is unknown."""
    if theirs is None or ours is None:
        return ""

    def listed(items: list[str]) -> str:
        return ", ".join(items[:shown]) + (f" and {len(items) - shown} more" if len(items) > shown else "")

    a, b = flatten(theirs, skip=_CONFIG_NOISE), flatten(ours, skip=_CONFIG_NOISE)
    differ = [f"{k} (folder: {short(a[k], 40)}, this run: {short(b[k], 40)})" for k in sorted(set(a) & set(b))
              if a[k] != b[k]]
    parts = [f"fields that differ: {listed(differ)}"] if differ else []
    if set(a) - set(b):
        parts.append(f"fields only the folder's config has: {listed(sorted(set(a) - set(b)))}")
    if set(b) - set(a):
        parts.append(f"fields only this run's config has: {listed(sorted(set(b) - set(a)))}")
    return "; ".join(parts)
