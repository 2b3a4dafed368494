"""The thin Lightning layer: strategy, sampler, packing, data module, plan report, NPU accelerator.

Importing it registers ``strategy="dhp"`` and ``accelerator="npu"`` with Lightning.
"""

from lightning.pytorch.accelerators import AcceleratorRegistry
from lightning.pytorch.strategies import StrategyRegistry

from lightning_dhp.errors import DHPConfigError, DHPDataError, DHPRankMismatchError
from lightning_dhp.lightning.batch import DHPBatchInfo, global_share, loss_share
from lightning_dhp.lightning.callbacks import DHPPlanReport
from lightning_dhp.lightning.collate import DHPPacking
from lightning_dhp.lightning.config import DHPConfig
from lightning_dhp.lightning.datamodule import DHPDataModule, dhp_dataloader
from lightning_dhp.lightning.npu import NPUAccelerator
from lightning_dhp.lightning.planned_loader import DHPDataLoader, PlannedStep
from lightning_dhp.lightning.sampler import DHPBatchSampler
from lightning_dhp.lightning.strategy import DHPStrategy

if "dhp" not in StrategyRegistry:
    StrategyRegistry.register("dhp", DHPStrategy, description="Dynamic Hybrid Parallelism (per-batch CP plans)")
    StrategyRegistry.register("dhp_spawn", DHPStrategy, description="DHPStrategy with start_method='spawn'",
                              start_method="spawn")
if "npu" not in AcceleratorRegistry:
    NPUAccelerator.register_accelerators(AcceleratorRegistry)

__all__ = [
    "DHPBatchInfo",
    "DHPBatchSampler",
    "DHPConfig",
    "DHPConfigError",
    "DHPDataError",
    "DHPDataLoader",
    "DHPDataModule",
    "DHPPacking",
    "DHPPlanReport",
    "DHPRankMismatchError",
    "DHPStrategy",
    "NPUAccelerator",
    "PlannedStep",
    "dhp_dataloader",
    "global_share",
    "loss_share",
]
