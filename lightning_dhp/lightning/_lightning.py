"""Every use of Lightning's private API in lightning-dhp, in one place.

Supported Lightning: >=2.6,<2.7 (the range pinned in setup.cfg). When a Lightning release moves one of
these names, this module is the only one to change.
"""

from __future__ import annotations

from typing import Any

from lightning.fabric.strategies.fsdp import _METADATA_FILENAME, _distributed_checkpoint_save, _is_sharded_checkpoint
from lightning.fabric.strategies.model_parallel import _load_checkpoint
from lightning.fabric.utilities.distributed import (
    _distributed_is_initialized,
    _get_default_process_group_backend_for_device,
    _init_dist_connection,
    _sync_ddp_if_available,
)
from lightning.fabric.utilities.optimizer import _optimizers_to_device
from lightning.pytorch.callbacks import BasePredictionWriter
from lightning.pytorch.overrides.distributed import _IndexBatchSamplerWrapper, _sync_module_states
from lightning.pytorch.strategies.launchers import _MultiProcessingLauncher, _SubprocessScriptLauncher

SUPPORTED_LIGHTNING = ">=2.6,<2.7"

__all__ = [
    "SUPPORTED_LIGHTNING",
    "_METADATA_FILENAME",
    "_MultiProcessingLauncher",
    "_SubprocessScriptLauncher",
    "_distributed_checkpoint_save",
    "_distributed_is_initialized",
    "_get_default_process_group_backend_for_device",
    "_init_dist_connection",
    "_is_sharded_checkpoint",
    "_load_checkpoint",
    "_optimizers_to_device",
    "_sync_ddp_if_available",
    "_sync_module_states",
    "disable_distributed_sampler",
    "logging_step",
    "record_prediction_indices",
    "set_device_mesh",
    "unwrap_batch_sampler",
]


def set_device_mesh(module: Any, mesh: Any) -> None:
    """What ``LightningModule.device_mesh`` returns (``configure_model`` may shard with it); Lightning sets it
    from its own model-parallel strategy and has no public setter."""
    module._device_mesh = mesh


def disable_distributed_sampler(trainer: Any) -> None:
    """Batches are split by the planner, never by an injected DistributedSampler."""
    trainer._accelerator_connector.use_distributed_sampler = False


def logging_step(trainer: Any) -> int | None:
    """The step Lightning logs this training batch's metrics under, or None when it does not log this batch
    (``log_every_n_steps``): what its own LearningRateMonitor reads to send per-step statistics straight to the
    loggers."""
    if not trainer._logger_connector.should_update_logs:
        return None
    return trainer.fit_loop.epoch_loop._batches_that_stepped


def unwrap_batch_sampler(batch_sampler: Any) -> Any:
    """The user's batch sampler, without the index-recording wrapper Lightning adds for predict."""
    if isinstance(batch_sampler, _IndexBatchSamplerWrapper):
        return batch_sampler._batch_sampler
    return batch_sampler


def record_prediction_indices(trainer: Any, indices: list[int], dataloader_idx: int) -> None:
    """Hand ``BasePredictionWriter`` callbacks the dataset indices of a planned predict step. Lightning
    records them in its own wrapper of the loader's batch sampler, which a DHP loader does not use (it
    plans whole global batches); its prediction loop keeps them in these two attributes."""
    loop = trainer.predict_loop
    writers = [callback for callback in trainer.callbacks if isinstance(callback, BasePredictionWriter)]
    if any(writer.interval.on_batch for writer in writers):
        loop.current_batch_indices = indices
    if any(writer.interval.on_epoch for writer in writers):
        loop.epoch_batch_indices[dataloader_idx].append(indices)
