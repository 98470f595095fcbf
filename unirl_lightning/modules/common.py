"""What every recipe shares: the policy and its warm start, the optimiser, and GenEval validation.

Validation (every `val_check_interval` steps) is the evaluation loop of the library: the policy
draws one image per held-out prompt, the judge scores it (GenEval), the policy answers its own
question about it (imbalance), and it answers about a rendered ground-truth image of the same
prompt (understanding accuracy). Scalars and an image grid go to the logger.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
import torch

from unirl_lightning.data.datamodule import PromptBatch
from unirl_lightning.data.qa import answer_for, grade_answer, question_for
from unirl_lightning.evaluation.detection import Detector
from unirl_lightning.evaluation.judge import GenEvalJudge
from unirl_lightning.evaluation.metrics import GenEvalScore, ImbalanceScore
from unirl_lightning.models.base import UnifiedPolicy


class PolicyModule(L.LightningModule):
    """Base LightningModule of the recipes.

    Args:
        policy: the unified model (any `UnifiedPolicy`).
        warm_start: "auto" (built-in model: load the cached warm start, training it first when
            absent), a folder written by `save_pretrained`, or None (keep the initial weights).
        lr, weight_decay, betas: AdamW settings.
        detector: GenEval detector (default: the synthetic world's exact detector).
        eval_cfg_scale / eval_temperature: sampling settings of validation images.
        grid_size: images in the logged validation grid.
        save_to: folder to `save_pretrained` the policy into at the end of fit; an existing
            non-empty folder is refused (before any compute) unless overwrite=True.
    """

    def __init__(
        self,
        policy: UnifiedPolicy,
        warm_start: str | None = "auto",
        lr: float = 1e-5,
        weight_decay: float = 0.0,
        betas: tuple[float, float] = (0.9, 0.999),
        detector: Detector | None = None,
        eval_cfg_scale: float = 1.0,
        eval_temperature: float = 1.0,
        grid_size: int = 16,
        save_to: str | None = None,
        overwrite: bool = False,
    ):
        super().__init__()
        self.save_hyperparameters(ignore=["policy", "detector"])
        if save_to and Path(save_to).is_dir() and any(Path(save_to).iterdir()) and not overwrite:
            raise FileExistsError(f"model.save_to: {save_to} exists and is not empty; pick another folder or set overwrite: true")
        self.policy = policy
        self.judge = GenEvalJudge(detector)
        self.val_geneval = GenEvalScore()
        self.val_imbalance = ImbalanceScore()
        self._warm_started = False

    # ---- warm start -------------------------------------------------------------------
    def setup(self, stage: str) -> None:
        if self._warm_started or self.hparams.warm_start is None:
            return
        self._warm_started = True
        source = self.hparams.warm_start
        if source == "auto":
            from unirl_lightning.warm_start import ensure_warm_start

            source = ensure_warm_start(self.policy)
        if not Path(source).is_dir():
            raise FileNotFoundError(f"model.warm_start: {source!r} is not a folder written by save_pretrained")
        loaded = type(self.policy).from_pretrained(source)
        self.policy.load_state_dict(loaded.state_dict())
        self.on_warm_started()

    def on_train_end(self) -> None:
        if not self.hparams.save_to:
            return
        full = None
        if getattr(self.policy, "_fsdp_sharded", False):  # every rank joins the gather; rank 0 writes
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

            full = get_model_state_dict(self.policy, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if self.trainer.is_global_zero:
            self.policy.save_pretrained(self.hparams.save_to, state_dict=full)

    def on_warm_started(self) -> None:
        """Hook: runs after the warm-start weights are loaded (e.g. to copy the reference)."""

    def configure_model(self) -> None:
        """FSDP2 under Lightning's ModelParallelStrategy: shard the policy's units, then the policy
        (and the frozen reference, when there is one) over the data-parallel mesh."""
        mesh = self.device_mesh
        if mesh is None:
            return
        from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method

        dp = mesh["data_parallel"] if mesh.mesh_dim_names and "data_parallel" in mesh.mesh_dim_names else mesh
        for policy in (self.policy, getattr(self, "reference", None)):
            if policy is None or hasattr(policy, "_fsdp_sharded"):
                continue
            for unit in policy.fsdp_units():
                fully_shard(unit, mesh=dp)
            fully_shard(policy, mesh=dp)
            for name in policy.fsdp_entry_points:
                register_fsdp_forward_method(policy, name)
            policy._fsdp_sharded = True

    def configure_optimizers(self):
        params = [p for p in self.policy.parameters() if p.requires_grad]
        return torch.optim.AdamW(params, lr=self.hparams.lr, weight_decay=self.hparams.weight_decay, betas=tuple(self.hparams.betas))

    # ---- shared evaluation ------------------------------------------------------------
    def understanding_correct(self, image_tokens: torch.Tensor, specs: list[dict]) -> torch.Tensor:
        """bool `[N]`: the policy's greedy answer to each spec's question about the given images."""
        answers = self.policy.answer(image_tokens, [question_for(s) for s in specs], greedy=True)
        return torch.tensor([grade_answer(s, a).correct for s, a in zip(specs, answers.texts)], dtype=torch.bool)

    def validation_step(self, batch: PromptBatch, batch_idx: int) -> None:
        specs = batch.specs
        gen = torch.Generator(device=self.device).manual_seed(10_000 + batch_idx)
        rollout = self.policy.generate_images(
            batch.prompts, cfg_scale=self.hparams.eval_cfg_scale, temperature=self.hparams.eval_temperature, generator=gen)
        images = self.policy.decode_images(rollout.tokens)
        tasks = [s["tag"] for s in specs]
        gen_ok = self.judge.correct(images, specs)
        und_ok = self.understanding_correct(rollout.tokens, specs)
        self.val_geneval.update(tasks, gen_ok.to(self.device))
        self.val_imbalance.update(tasks, gen_ok.to(self.device), und_ok.to(self.device))
        self.log("val/answer_acc_own", und_ok.float().mean(), batch_size=len(specs), sync_dist=True)
        rendered = self.rendered_tokens(specs, seed=batch_idx)
        if rendered is not None:
            acc = self.understanding_correct(rendered, specs).float().mean()
            self.log("val/answer_acc_rendered", acc, batch_size=len(specs), sync_dist=True)
        if batch_idx == 0:
            from unirl_lightning.callbacks.image_grid import log_image_grid

            n = self.hparams.grid_size
            log_image_grid(self.logger, "val/images", images[:n], batch.prompts[:n], self.global_step, gen_ok[:n])

    def rendered_tokens(self, specs: list[dict], seed: int = 0) -> torch.Tensor | None:
        """Ground-truth images of the specs as policy tokens, when the policy has an image encoder."""
        encode = getattr(self.policy, "encode_images", None)
        if encode is None:
            return None
        from unirl_lightning.worlds.render import render_batch

        images, _ = render_batch(specs, [seed * 100_003 + i for i in range(len(specs))], self.world_config())
        return encode(images)

    def world_config(self) -> Any:
        """The policy's synthetic world (its `world_config`), or the default one."""
        from unirl_lightning.worlds.render import WorldConfig

        return getattr(self.policy, "world_config", None) or WorldConfig()

    def on_validation_epoch_end(self) -> None:
        self.log_dict({f"val/{k}": v for k, v in self.val_geneval.compute().items()}, sync_dist=False)
        self.log_dict({f"val/{k}": v for k, v in self.val_imbalance.compute().items()}, sync_dist=False)
        self.val_geneval.reset()
        self.val_imbalance.reset()

    # ---- shared training helpers --------------------------------------------------------
    @staticmethod
    def qa(specs: list[dict]) -> tuple[list[str], list[str]]:
        """UniRL's question and ground-truth answer for each spec."""
        return [question_for(s) for s in specs], [answer_for(s) for s in specs]
