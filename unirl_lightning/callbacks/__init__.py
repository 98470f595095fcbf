"""Callbacks: periodic evaluation and logging, step checkpoints, CPU budgets and snapshots, EMA, progress."""

from unirl_lightning.callbacks.checkpoint import StepCheckpoint
from unirl_lightning.callbacks.cpu_budget import CPUTimeBudget
from unirl_lightning.callbacks.geneval_logging import GenEvalCallback
from unirl_lightning.callbacks.image_grid import log_image_grid, make_grid
from unirl_lightning.callbacks.policy_ema import PolicyEMA
from unirl_lightning.callbacks.policy_eval import PolicyGenEvalCallback
from unirl_lightning.callbacks.progress import StepProgress
from unirl_lightning.callbacks.save_on_exception import SaveOnException
from unirl_lightning.callbacks.snapshots import PolicySnapshots

__all__ = [
    "CPUTimeBudget",
    "GenEvalCallback",
    "PolicyEMA",
    "PolicyGenEvalCallback",
    "PolicySnapshots",
    "SaveOnException",
    "StepCheckpoint",
    "StepProgress",
    "log_image_grid",
    "make_grid",
]
