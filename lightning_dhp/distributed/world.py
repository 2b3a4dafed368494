"""Initialising the world process group so that NCCL splits every later group from it.

Binding the world group to this process's device (``init_process_group(device_id=...)``) makes NCCL
create the world communicator at once, and every later ``new_group`` (the group pool's) then splits
its communicator from the world's (``ncclCommSplit``; ranks outside the new group take part without
joining) instead of bootstrapping a new one through the store at its first collective. CPU (gloo)
worlds are never bound.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def world_device_id(device: torch.device) -> torch.device | None:
    """The ``device_id`` for ``init_process_group``: this process's accelerator (as Lightning's own
    DDP strategy passes it), with its index when it is a CUDA device given without one; None on CPU."""
    if device.type == "cpu":
        return None
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", torch.cuda.current_device())
    return device


def subgroups_split_from_world() -> bool:
    """Whether the initialised world is bound to a device, so new groups are split from it."""
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError("subgroups_split_from_world: torch.distributed is not initialised")
    return getattr(dist.group.WORLD, "bound_device_id", None) is not None
