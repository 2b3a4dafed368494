"""Model preparation for DHPStrategy.setup: checks first, then small appliers in a fixed order.

As torchtitan's parallelize functions: :func:`check` raises every refusal (the same on every rank, before
any collective) and records what it decided in a :class:`Preparation`; :func:`prepare_model` then runs the
appliers in order, each one's docstring saying why it comes where it does. The model is never wrapped:
the LightningModule itself is changed in place.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy

from lightning_dhp.distributed.checkpointing import apply_activation_checkpointing
from lightning_dhp.lightning import _lightning
from lightning_dhp.lightning.config import DHPConfig
from lightning_dhp.lightning.gradients import GradientSync
from lightning_dhp.lightning.materialize import check_materializable, has_meta_tensors, materialize
from lightning_dhp.lightning.sharding import (
    ShardedGradientSync,
    blocks_to_shard,
    is_sharded,
    mixed_precision_policy,
    shard_model,
)


@dataclass(frozen=True)
class Preparation:
    """What :func:`check` decided before anything changed."""

    device: torch.device
    on_meta: bool  # built on the meta device: no rank holds values yet
    mesh: DeviceMesh | None  # FSDP2 shards over it; None: every rank holds the whole model
    world: dist.ProcessGroup | None  # every rank's group; None on one process
    blocks: list[nn.Module]  # sharded on their own (fsdp_modules)
    policy: MixedPrecisionPolicy | None
    checkpointed: tuple[type[nn.Module], ...]  # activation checkpointing's module classes
    gradient_bucket_bytes: int | None


def check(module: nn.Module, config: DHPConfig, device: torch.device, mesh: DeviceMesh | None,
          multi_process: bool, precision: str) -> Preparation:
    """Every refusal, raised on every rank alike: nothing here communicates or changes the model."""
    on_meta = has_meta_tensors(module)
    if on_meta:
        check_materializable(module)
    policy = mixed_precision_policy(precision) if config.sharding == "fsdp" else None
    blocks = blocks_to_shard(module, config.fsdp_modules) if mesh is not None else []
    return Preparation(device=device, on_meta=on_meta, mesh=mesh,
                       world=dist.group.WORLD if multi_process else None, blocks=blocks, policy=policy,
                       checkpointed=config.activation_checkpointing,
                       gradient_bucket_bytes=config.gradient_bucket_bytes)


def prepare_model(module: nn.Module, preparation: Preparation) -> GradientSync | ShardedGradientSync:
    """Run the appliers in order; returns how the model's gradients are summed over ranks."""
    materialize_replica(module, preparation)
    move_to_device(module, preparation.device)
    checkpoint_activations(module, preparation)
    broadcast_rank0_values(module, preparation)
    sharded = shard(module, preparation)
    return gradient_sync(module, preparation, sharded)


def materialize_replica(module: nn.Module, preparation: Preparation) -> None:
    """A replicated model built on the meta device gets real tensors first: every later applier needs
    values. Each rank initialises its own; :func:`broadcast_rank0_values` then makes them rank 0's.
    A model to be sharded waits for :func:`shard`, so that no rank ever allocates all of it."""
    if preparation.on_meta and preparation.mesh is None:
        materialize(module, preparation.device)


def move_to_device(module: nn.Module, device: torch.device) -> None:
    """Onto this rank's device before anything communicates (NCCL broadcasts device tensors) or is sharded
    (FSDP2 shards where the parameters are). A model still on the meta device is materialised by :func:`shard`."""
    if not has_meta_tensors(module):
        module.to(device)


def checkpoint_activations(module: nn.Module, preparation: Preparation) -> None:
    """Wraps only each block's ``forward`` (parameters, names and state dict unchanged), so the values and
    their broadcast are not affected. Before sharding, torchtitan's order (checkpointing, then
    ``fully_shard``): FSDP2's hooks around the module call stay outside the checkpointed forward."""
    if preparation.checkpointed:
        apply_activation_checkpointing(module, preparation.checkpointed)


def broadcast_rank0_values(module: nn.Module, preparation: Preparation) -> None:
    """Replicas, and a whole model about to be sharded, take rank 0's values: shards must be cut from
    identical parameters. Not for a model the user sharded already (``configure_model``), nor one on the
    meta device waiting to be sharded (it has no values yet; each rank initialises its own shards)."""
    if preparation.world is None or is_sharded(module) or (preparation.on_meta and preparation.mesh is not None):
        return
    _lightning._sync_module_states(module)


def shard(module: nn.Module, preparation: Preparation) -> list[FSDPModule]:
    """FSDP2 over every rank (``sharding="fsdp"`` on several processes), then a model built on the meta
    device allocates and initialises its own shards only. Last of the changes to the model: the shards
    hold the values, device and wrappers that the appliers above set."""
    if preparation.mesh is None:
        return []
    sharded = shard_model(module, preparation.mesh, preparation.blocks, preparation.policy)
    if preparation.on_meta:
        materialize(module, preparation.device)
    return sharded


def gradient_sync(module: nn.Module, preparation: Preparation,
                  sharded: list[FSDPModule]) -> GradientSync | ShardedGradientSync:
    """Last: a replicated model's sync registers hooks on the final parameters, a sharded model's sync
    drives the FSDP modules that :func:`shard` made."""
    if preparation.mesh is not None:
        return ShardedGradientSync(sharded, preparation.mesh.get_group())
    return GradientSync(module, preparation.world, preparation.gradient_bucket_bytes)
