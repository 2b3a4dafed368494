"""FSDP2 sharding over all ranks, composed with DHP's per-batch context-parallel groups.

The sharding group (a 1-D mesh of every rank) never changes, while CP groups change per batch, so
FSDP's all-gathers and reduce-scatters and the rings never share a communicator. Gradients are
*summed* (divide factor 1): every rank's loss is already its share of the global mean.
"""

from __future__ import annotations

from collections.abc import Collection, Iterator
from contextlib import contextmanager
from functools import partial
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard

from lightning_dhp.errors import DHPConfigError

SHARDINGS = ("replicate", "fsdp")
_POLICIES = {
    "32-true": None,
    "64-true": None,
    "bf16-true": None,  # parameters are already bf16
    "bf16-mixed": MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32),
}


def mixed_precision_policy(precision: str) -> MixedPrecisionPolicy | None:
    """FSDP2's policy for Lightning's precision flag, or a clear error for one it cannot honour."""
    if precision not in _POLICIES:
        raise DHPConfigError(f"sharding='fsdp' supports precision {sorted(_POLICIES)}, got {precision!r}; choose one "
                             "of them or sharding='replicate'")
    return _POLICIES[precision]


def blocks_to_shard(module: nn.Module, block_types: Collection[type[nn.Module]]) -> list[nn.Module]:
    """The submodules :func:`shard_model` shards on their own, or a :class:`DHPConfigError` when the
    model cannot be sharded as asked. Touches no process group, so every rank checks before any
    collective. Empty when the user sharded the model already (in ``configure_model``)."""
    if any(True for _ in module.parameters(recurse=False)):
        raise DHPConfigError(f"sharding='fsdp' shards the submodules of {type(module).__name__}, but it holds "
                             "parameters of its own; move them into a submodule (e.g. self.model)")
    if is_sharded(module):
        return []
    block_types = tuple(block_types)
    blocks = [child for child in module.modules() if isinstance(child, block_types)]
    if block_types and not blocks:
        present = sorted({type(child).__name__ for child in module.modules()})
        raise DHPConfigError(
            f"fsdp_modules={{{', '.join(block.__name__ for block in block_types)}}} matches no module of "
            f"{type(module).__name__}; its module classes are {present}")
    return blocks


def fsdp_unsupported_reason() -> str | None:
    """Why this torch cannot shard under DHP, or None. Ranks differentiate different parameters (a rank without
    frames never runs the vision tower), so every rank's reduce-scatter must still cover every parameter:
    FSDP2's ``set_reduce_scatter_unused_params``, which torch 2.11 lacks (2.13 has it)."""
    if hasattr(FSDPModule, "set_reduce_scatter_unused_params"):
        return None
    return (f"sharding='fsdp' needs FSDP2's set_reduce_scatter_unused_params, which torch {torch.__version__} lacks "
            "(ranks that skip a module, such as a vision tower on a rank without frames, would otherwise run "
            "mismatched reduce-scatters); use torch >= 2.13, or sharding='replicate'")


def shard_model(module: nn.Module, mesh: DeviceMesh, blocks: list[nn.Module],
                policy: MixedPrecisionPolicy | None) -> list[FSDPModule]:
    """Shard ``blocks`` (from :func:`blocks_to_shard`) on their own, then each direct child of ``module``
    as a root.

    The roots are the children (e.g. a LightningModule's ``self.model``): a step calls them, which is
    when FSDP gathers their parameters. A module the user sharded already (in ``configure_model``)
    is kept as it is. Returns every FSDP module, with gradients summed over the mesh.
    """
    kwargs: dict[str, Any] = {"mesh": mesh} if policy is None else {"mesh": mesh, "mp_policy": policy}
    if not is_sharded(module):
        for block in blocks:
            fully_shard(block, **kwargs)
        for child in module.children():
            if not isinstance(child, FSDPModule) and any(True for _ in child.parameters()):
                fully_shard(child, **kwargs)
    sharded = _fsdp_modules(module)
    for fsdp_module in sharded:
        fsdp_module.set_gradient_divide_factor(1.0)
        fsdp_module.set_force_sum_reduction_for_comms(True)  # a plain SUM (gloo has no PREMUL_SUM)
        # Ranks use different parameters (a rank without frames never runs the vision tower): unused
        # parameters join the reduce-scatter as zeros, so every rank's collective matches.
        fsdp_module.set_reduce_scatter_unused_params(True, recurse=False)
    return sharded


def is_sharded(module: nn.Module) -> bool:
    """Whether FSDP already shards ``module`` or one of its submodules."""
    return bool(_fsdp_modules(module))


def _fsdp_modules(module: nn.Module) -> list[FSDPModule]:
    return [child for child in module.modules() if isinstance(child, FSDPModule)]


class ShardedGradientSync:
    """FSDP2's reduce-scatter, summed, once per optimizer step: earlier rounds (and global batches that
    Lightning accumulates) backward with gradient sync off, keeping unsharded gradients locally.

    Ranks differentiate different parameters (a rank without frames never runs the vision tower), so
    unused parameters join the reduce-scatter as zeros; a parameter that no rank differentiated would then
    get a zero gradient, which AdamW's weight decay moves, unlike on one device. Each rank counts, per
    parameter, whether it got a gradient since the last synced backward; one small all-reduce after that
    backward finds the parameters no rank differentiated, and they keep no gradient.
    """

    def __init__(self, modules: list[FSDPModule], group: dist.ProcessGroup | None) -> None:
        self.modules = modules
        self.group = group
        self.enabled = True
        self._params = _fsdp_params(modules)
        self._had_gradient = torch.zeros(len(self._params), dtype=torch.int32)
        self._watched: set[int] = set()  # ids of the unsharded parameters with a gradient hook
        self._gradient_before: list[bool] | None = None  # per parameter, during a synced backward

    def _set_sync(self, sync: bool) -> None:
        for fsdp_module in self.modules:
            fsdp_module.set_requires_gradient_sync(sync, recurse=False)

    def new_step(self) -> None:
        """Nothing to track: every synced backward's reduce-scatter adds to the sharded gradients."""

    @contextmanager
    def early_backward(self) -> Iterator[None]:
        yield  # before_backward(last_round=False) already turned the sync off

    def before_backward(self, last_round: bool) -> None:
        self._watch_unsharded_parameters()
        sync = last_round and self.enabled
        self._set_sync(sync)
        self._gradient_before = [_sharded(p).grad is not None for p in self._params] if sync else None

    def finish_backward(self, only_if_any: bool = False) -> None:
        """After a synced backward: parameters that no rank differentiated since the last one keep no gradient."""
        if self._gradient_before is None or self.group is None:
            return
        counts = self._had_gradient.to(_sharded(self._params[0]).device)
        dist.all_reduce(counts, group=self.group)
        for fsdp_param, count, had_before in zip(self._params, counts.tolist(), self._gradient_before, strict=True):
            if count == 0 and not had_before:
                _sharded(fsdp_param).grad = None
        self._had_gradient.zero_()
        self._gradient_before = None

    def discard(self) -> None:
        """Nothing kept aside outside FSDP."""

    def _watch_unsharded_parameters(self) -> None:
        for index, fsdp_param in enumerate(self._params):
            unsharded = _unsharded(fsdp_param)
            if unsharded is not None and id(unsharded) not in self._watched:
                self._watched.add(id(unsharded))
                unsharded.register_post_accumulate_grad_hook(partial(self._mark, index))

    def _mark(self, index: int, _: torch.Tensor) -> None:
        self._had_gradient[index] = 1


# FSDP2's per-parameter state is not public API; these three helpers are the only places that read it.
def _fsdp_params(modules: list[FSDPModule]) -> list[Any]:
    return [fsdp_param for module in modules for group in module._get_fsdp_state()._fsdp_param_groups
            for fsdp_param in group.fsdp_params]


def _sharded(fsdp_param: Any) -> nn.Parameter:
    return fsdp_param.sharded_param


def _unsharded(fsdp_param: Any) -> nn.Parameter | None:
    """The parameter the forward uses (and autograd accumulates into), once FSDP has first gathered it."""
    return getattr(fsdp_param, "_unsharded_param", None)
