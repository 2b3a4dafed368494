"""DHP planner: pure Python/numpy (no torch.distributed); see :func:`plan_batch`."""

from lightning_dhp.planner.baselines import static_plan
from lightning_dhp.planner.calibration import calibrate
from lightning_dhp.planner.cost_model import CostModel, FitReport, padded_length
from lightning_dhp.planner.dhp import plan_batch
from lightning_dhp.planner.inputs import divisors
from lightning_dhp.planner.options import PlannerOptions
from lightning_dhp.planner.plan import Group, Plan, PlanError, Round

__all__ = [
    "CostModel",
    "FitReport",
    "Group",
    "Plan",
    "PlanError",
    "PlannerOptions",
    "Round",
    "calibrate",
    "divisors",
    "padded_length",
    "plan_batch",
    "static_plan",
]
