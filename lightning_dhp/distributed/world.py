"""Initialising the world process group so that NCCL splits every later group from it.

Binding the world group to this process's device (``init_process_group(device_id=...)``) makes NCCL
create the world communicator at once, and every later ``new_group`` (the group pool's) then splits
its communicator from the world's (``ncclCommSplit``) instead of bootstrapping a new one through the
store at its first collective. CPU (gloo) worlds are never bound.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def world_device_id(device: torch.device) -> torch.device | None:
    """The ``device_id`` for ``init_process_group``: the process's CUDA device with its index, None
    elsewhere (gloo needs none; other accelerators' backends keep their own initialisation)."""
    if device.type != "cuda":
        return None
    return device if device.index is not None else torch.device("cuda", torch.cuda.current_device())


def subgroups_split_from_world() -> bool:
    """Whether the initialised world is bound to a device, so new groups are split from it."""
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError("subgroups_split_from_world: torch.distributed is not initialised")
    return getattr(dist.group.WORLD, "bound_device_id", None) is not None
