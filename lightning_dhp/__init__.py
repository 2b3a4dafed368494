"""lightning-dhp: Dynamic Hybrid Parallelism for PyTorch Lightning.

Every global batch is planned: heterogeneous sequences are packed onto context-parallel groups whose
sizes change per batch, and attention runs context-parallel at the chosen degree.

Importing the package registers ``strategy="dhp"`` and ``accelerator="npu"`` with Lightning.
"""

from lightning_dhp.attention import ZigzagLayout, cp_attention
from lightning_dhp.lightning import DHPBatchSampler, DHPDataModule, DHPStrategy, loss_share
from lightning_dhp.planner import CostModel, Plan, PlanError, plan_batch, static_plan

__version__ = "0.1.0"

__all__ = [
    "CostModel",
    "DHPBatchSampler",
    "DHPDataModule",
    "DHPStrategy",
    "Plan",
    "PlanError",
    "ZigzagLayout",
    "__version__",
    "cp_attention",
    "loss_share",
    "plan_batch",
    "static_plan",
]
