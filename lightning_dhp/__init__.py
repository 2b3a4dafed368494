"""lightning-dhp: Dynamic Hybrid Parallelism for PyTorch Lightning.

Every global batch is planned: heterogeneous sequences are packed onto context-parallel groups whose
sizes change per batch, and attention runs context-parallel at the chosen degree.

The heavy names (the strategy pulls in Lightning, attention pulls in torch) load lazily, so that
``import lightning_dhp.planner`` stays a pure-numpy import.
"""

from importlib import import_module
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "plan_batch": "lightning_dhp.planner",
    "static_plan": "lightning_dhp.planner",
    "Plan": "lightning_dhp.planner",
    "PlanError": "lightning_dhp.planner",
    "CostModel": "lightning_dhp.planner",
    "ZigzagLayout": "lightning_dhp.attention",
    "cp_attention": "lightning_dhp.attention",
    "DHPStrategy": "lightning_dhp.lightning",
    "DHPBatchSampler": "lightning_dhp.lightning",
    "DHPDataModule": "lightning_dhp.lightning",
    "loss_share": "lightning_dhp.lightning",
}

__all__ = [*_EXPORTS, "__version__"]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'lightning_dhp' has no attribute {name!r}")
