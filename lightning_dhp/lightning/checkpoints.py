"""DHPStrategy's checkpoints: a replicated model saves and loads as under Lightning's ParallelStrategy;
a model sharded by FSDP2 saves full state dicts or folders of shards, and loads them into its shards.

A full (consolidated) state dict is gathered on rank 0: loadable without any distributed setup, and
re-sharded on load for any world size. With ``save_distributed_checkpoint``, every rank writes its own
shards instead (``torch.distributed.checkpoint``, for models too large to gather); that folder also
loads on any world size. Gathering, saving shards and loading them are collectives: every rank calls.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import LightningModule
from lightning.pytorch.core.optimizer import LightningOptimizer
from lightning.pytorch.strategies import ParallelStrategy
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
)
from torch.distributed.device_mesh import DeviceMesh
from torch.optim import Optimizer
from typing_extensions import override

from lightning_dhp.lightning import _lightning
from lightning_dhp.lightning.config import DHPConfig
from lightning_dhp.lightning.materialize import has_meta_tensors

_GATHER = StateDictOptions(full_state_dict=True, cpu_offload=True)
_SHARDS = StateDictOptions(cpu_offload=True)


class CheckpointHooks(ParallelStrategy):
    """Lightning's checkpoint hooks, as DHPStrategy inherits them: each leaves a whole model to
    ParallelStrategy and handles a sharded one itself.

    Reads two attributes of the strategy: ``config`` (``save_distributed_checkpoint``) and
    ``_device_mesh``, which ``setup_environment`` sets when FSDP2 shards the model.
    """

    config: DHPConfig
    _device_mesh: DeviceMesh | None
    _restore_after_setup: bool | None = None  # see restore_checkpoint_after_setup

    @property
    def _sharded(self) -> bool:
        """FSDP2 shards the model: ``sharding="fsdp"`` on more than one process (one device keeps it whole)."""
        return self._device_mesh is not None

    @property
    @override
    def restore_checkpoint_after_setup(self) -> bool:
        """After setup for a sharded model (loaded into its shards) or one built on the meta device (loading
        into meta tensors does nothing). Lightning asks before and after setup: the first answer holds until
        the run's teardown."""
        if self._restore_after_setup is None:
            self._restore_after_setup = self._sharded or has_meta_tensors(self.lightning_module)
        return self._restore_after_setup

    @override
    def lightning_module_state_dict(self) -> dict[str, Any]:
        if not self._sharded:
            return super().lightning_module_state_dict()
        return sharded_model_state(self.lightning_module, gather=not self.config.save_distributed_checkpoint)

    @property
    @override
    def lightning_restore_optimizer(self) -> bool:
        return not self._sharded  # load_checkpoint restores a sharded model's optimizers itself

    @override
    def load_model_state_dict(self, checkpoint: Mapping[str, Any], strict: bool = True) -> None:
        if not self._sharded:  # a sharded model was loaded in load_checkpoint
            super().load_model_state_dict(checkpoint, strict)

    @override
    def optimizer_state(self, optimizer: Optimizer) -> dict[str, Any]:
        if not self._sharded:
            return super().optimizer_state(optimizer)
        if isinstance(optimizer, LightningOptimizer):
            optimizer = optimizer.optimizer
        return sharded_optimizer_state(self.lightning_module, optimizer,
                                       gather=not self.config.save_distributed_checkpoint)

    @override
    def save_checkpoint(self, checkpoint: dict[str, Any], filepath: Any, storage_options: Any = None) -> None:
        """A full file, or with ``save_distributed_checkpoint`` a folder of every rank's shards."""
        if not (self.config.save_distributed_checkpoint and self._sharded):
            return super().save_checkpoint(checkpoint, filepath, storage_options)
        save_shards(checkpoint, Path(self.broadcast(filepath)), self.global_rank)
        return None

    @override
    def load_checkpoint(self, checkpoint_path: Any, weights_only: bool | None = None) -> dict[str, Any]:
        if not self._sharded:
            return super().load_checkpoint(checkpoint_path, weights_only)
        return load_into_shards(Path(self.broadcast(checkpoint_path)), self.lightning_module, self.optimizers,
                                weights_only)

    @override
    def teardown(self) -> None:
        self._restore_after_setup = None  # the next run (e.g. a test after the fit) asks again
        super().teardown()


def sharded_model_state(module: nn.Module, gather: bool = True) -> dict[str, Any]:
    """A sharded model's whole state dict on global rank 0 (empty elsewhere), or (``gather=False``) this
    rank's shards."""
    return get_model_state_dict(module, options=_GATHER if gather else _SHARDS)


def sharded_optimizer_state(module: nn.Module, optimizer: Optimizer, gather: bool = True) -> dict[str, Any]:
    """The optimizer's state for a sharded ``module``, gathered as :func:`sharded_model_state` gathers the model's."""
    return get_optimizer_state_dict(module, optimizer, options=_GATHER if gather else _SHARDS)


def save_shards(checkpoint: dict[str, Any], path: Path, global_rank: int) -> None:
    """Every rank writes its model and optimizer shards into the folder ``path`` (rank 0's path, the same on
    every rank); rank 0 adds the rest of Lightning's checkpoint (loops, callbacks, loader)."""
    path.mkdir(parents=True, exist_ok=True)
    shards = {"state_dict": checkpoint.pop("state_dict")}
    shards.update({f"optimizer_{index}": state for index, state in enumerate(checkpoint.pop("optimizer_states"))})
    _lightning._distributed_checkpoint_save(shards, path)
    if global_rank == 0:
        torch.save(checkpoint, path / _lightning._METADATA_FILENAME)


def load_into_shards(path: Path, module: LightningModule, optimizers: list[Optimizer],
                     weights_only: bool | None) -> dict[str, Any]:
    """Load a full file or a folder of shards (of any world size) straight into ``module``'s shards and its
    optimizers; returns what is left for Lightning (loops, callbacks, loader)."""
    state = {"state_dict": module, **{f"optimizer_{index}": optimizer for index, optimizer in enumerate(optimizers)}}
    return _lightning._load_checkpoint(path, state, strict=module.strict_loading, optimizer_states_from_list=True,
                                       weights_only=weights_only)
