"""Periodic evaluation and logging callbacks."""

from unirl_lightning.callbacks.cpu_budget import CPUTimeBudget
from unirl_lightning.callbacks.geneval_logging import GenEvalCallback
from unirl_lightning.callbacks.image_grid import log_image_grid, make_grid
from unirl_lightning.callbacks.policy_ema import PolicyEMA
from unirl_lightning.callbacks.policy_eval import PolicyGenEvalCallback

__all__ = ["CPUTimeBudget", "GenEvalCallback", "PolicyEMA", "PolicyGenEvalCallback", "log_image_grid", "make_grid"]
