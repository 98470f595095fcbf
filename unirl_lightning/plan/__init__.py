"""Will it fit? The memory plan of a recipe config on real models, from architecture facts alone:

python -m unirl_lightning.plan --config configs/janus_pro_7b_grpo.yaml --gpu-memory 80
"""

from unirl_lightning.plan.arch import PlanError, load_arch
from unirl_lightning.plan.plan import GiB, Plan, Row, make_plan, plan_config

__all__ = ["GiB", "Plan", "PlanError", "Row", "load_arch", "make_plan", "plan_config"]
