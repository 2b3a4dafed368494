"""Activation checkpointing that recomputes a block inside the context-parallel context of its forward.

A checkpointed block runs its forward a second time during backward. If that block calls
``cp_attention``, the recompute must attend within the same layout and group as the first forward;
:func:`apply_activation_checkpointing` captures the context when the block runs and re-enters it
for the recompute, so the context travels with the autograd graph whichever thread runs backward.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Collection
from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from lightning_dhp.distributed.context import cp_context, current_cp_context
from lightning_dhp.errors import DHPConfigError

_WRAPPED = "_dhp_checkpointed_forward"


def apply_activation_checkpointing(model: nn.Module, block_types: Collection[type[nn.Module]], *,
                                   use_reentrant: bool = False) -> int:
    """Checkpoint every submodule of ``model`` whose type is in ``block_types``; return how many.

    The module's parameters, names and state dict are unchanged (only its ``forward`` is wrapped),
    and wrapping twice is a no-op. Raises :class:`DHPConfigError` if no submodule matches.
    """
    block_types = tuple(block_types)
    if not block_types or not all(isinstance(block, type) and issubclass(block, nn.Module)
                                  for block in block_types):
        raise DHPConfigError(f"activation_checkpointing takes nn.Module classes, e.g. {{MyBlock}}; got {block_types}")
    blocks = [module for module in model.modules() if isinstance(module, block_types)]
    if not blocks:
        present = sorted({type(module).__name__ for module in model.modules()})
        raise DHPConfigError(
            f"activation_checkpointing={{{', '.join(block.__name__ for block in block_types)}}} matches no module "
            f"of {type(model).__name__}; its module classes are {present}")
    for block in blocks:
        if not hasattr(block, _WRAPPED):
            setattr(block, _WRAPPED, True)
            block.forward = _checkpointed(block.forward, use_reentrant)
    return len(blocks)


def _checkpointed(forward: Callable[..., Any], use_reentrant: bool) -> Callable[..., Any]:
    @functools.wraps(forward)
    def run_checkpointed(*args: Any, **kwargs: Any) -> Any:
        if not torch.is_grad_enabled():  # nothing will be recomputed
            return forward(*args, **kwargs)
        context = current_cp_context()

        def run_in_context(*inner_args: Any) -> Any:
            with cp_context(context):
                return forward(*inner_args, **kwargs)

        return checkpoint(run_in_context, *args, use_reentrant=use_reentrant)

    return run_checkpointed
