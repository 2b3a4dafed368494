"""lightning-dhp: Dynamic Hybrid Parallelism for PyTorch Lightning.

Every global batch is planned: heterogeneous sequences are packed onto context-parallel groups whose
sizes change per batch, and attention runs context-parallel at the chosen degree.

Importing the package is cheap (no torch, no Lightning): the names below load on first use, so the
numpy planner and the simulator start fast. ``strategy="dhp"`` and ``accelerator="npu"`` are
registered with Lightning as soon as Lightning is imported, before or after this package.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
from typing import Any

__version__ = "0.1.0"

_LAZY = {
    "CostModel": "lightning_dhp.planner",
    "Plan": "lightning_dhp.planner",
    "plan_batch": "lightning_dhp.planner",
    "static_plan": "lightning_dhp.planner",
    "DHPError": "lightning_dhp.errors",
    "DHPConfigError": "lightning_dhp.errors",
    "DHPDataError": "lightning_dhp.errors",
    "DHPLoaderError": "lightning_dhp.errors",
    "DHPRankMismatchError": "lightning_dhp.errors",
    "PlanError": "lightning_dhp.errors",
    "ZigzagLayout": "lightning_dhp.attention",
    "cp_attention": "lightning_dhp.attention",
    "DHPBatchSampler": "lightning_dhp.lightning",
    "DHPConfig": "lightning_dhp.lightning",
    "DHPDataModule": "lightning_dhp.lightning",
    "DHPPacking": "lightning_dhp.lightning",
    "DHPPlanReport": "lightning_dhp.lightning",
    "DHPStrategy": "lightning_dhp.lightning",
    "dhp_dataloader": "lightning_dhp.lightning",
    "global_share": "lightning_dhp.lightning",
    "loss_share": "lightning_dhp.lightning",
}

__all__ = ["__version__", *sorted(_LAZY)]


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module 'lightning_dhp' has no attribute {name!r}")
    value = getattr(importlib.import_module(_LAZY[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY})


class _RegisterWithLightning(importlib.abc.MetaPathFinder):
    """Runs the registration of ``strategy="dhp"`` / ``accelerator="npu"`` right after Lightning loads."""

    def find_spec(self, name: str, path: Any = None, target: Any = None) -> Any:
        if name != "lightning.pytorch":
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)
        if spec is not None and spec.loader is not None:
            load = spec.loader.exec_module

            def load_then_register(module: Any) -> None:
                load(module)
                importlib.import_module("lightning_dhp.lightning")

            spec.loader.exec_module = load_then_register
        return spec


if "lightning.pytorch" in sys.modules:
    importlib.import_module("lightning_dhp.lightning")
elif not any(isinstance(finder, _RegisterWithLightning) for finder in sys.meta_path):
    sys.meta_path.insert(0, _RegisterWithLightning())
