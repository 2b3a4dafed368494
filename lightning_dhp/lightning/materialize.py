"""Models built on the meta device: checked, then given real tensors on the device they train on.

``trainer.init_module(empty_init=True)`` under ``sharding="fsdp"`` (or a module built under
``torch.device("meta")``) allocates nothing; the strategy shards the model first and only then
materialises it, so no rank ever holds a full copy. Materialising means ``to_empty`` and then each
module's own initialisation: ``reset_parameters()`` (PyTorch's convention) or, for a Hugging Face
model, its ``initialize_weights()`` (which also recomputes buffers such as rotary frequencies) and
``tie_weights()``. A module that owns tensors needs one of them: a buffer computed at construction
(rotary frequencies) is in no checkpoint, so nothing else would ever set it. The values are a fresh
initialisation: load pretrained weights after ``setup`` (see docs/lightning.md, "Sharded training").
"""

from __future__ import annotations

import itertools

import torch
from torch import nn

from lightning_dhp.errors import DHPConfigError


def has_meta_tensors(module: nn.Module) -> bool:
    """Whether any parameter or buffer of ``module`` lives on the meta device."""
    return any(tensor.is_meta for tensor in itertools.chain(module.parameters(), module.buffers()))


def check_materializable(module: nn.Module) -> None:
    """Raise :class:`DHPConfigError` when ``module`` is only partly on the meta device (materialising
    replaces every tensor), or names every module class whose meta tensors nothing would initialise (no
    ``reset_parameters`` and no Hugging Face model above it). Touches no process group, so every rank
    checks before any collective."""
    tensors = list(itertools.chain(module.named_parameters(), module.named_buffers()))
    real = [name for name, tensor in tensors if not tensor.is_meta]
    if real:
        raise DHPConfigError(
            f"{type(module).__name__} is partly on the meta device: {real[:3]} hold real values; build all of "
            "the model under trainer.init_module(empty_init=True) (then load its weights after setup) or none of it")
    covered = {id(child) for root in _hf_roots(module) for child in root.modules()}
    missing = sorted({type(child).__name__ for child in module.modules()
                      if id(child) not in covered and _owns_tensors(child)
                      and not callable(getattr(child, "reset_parameters", None))})
    if missing:
        raise DHPConfigError(
            f"{type(module).__name__} was built on the meta device, but {missing} define no reset_parameters(), so "
            "their parameters and buffers would hold uninitialised memory; give them a reset_parameters() that "
            "initialises every tensor they own, or build them outside trainer.init_module(empty_init=True)")


def materialize(module: nn.Module, device: torch.device) -> None:
    """Give every tensor of ``module`` (all on the meta device, see :func:`check_materializable`) real
    storage on ``device`` and initialise it; sharded parameters are initialised by each rank for its
    own shards. Children go before their parents, so a parent's ``reset_parameters()`` that applies its
    own scheme to its submodules has the last word."""
    module.to_empty(device=device)  # on the root: FSDP keeps its sharded storage in step
    roots = _hf_roots(module)
    covered = {id(child) for root in roots for child in root.modules() if child is not root}
    with torch.no_grad():
        for child in reversed(list(module.modules())):
            if id(child) in covered:
                continue
            if any(child is root for root in roots):
                child.initialize_weights()
                child.tie_weights()
            elif callable(getattr(child, "reset_parameters", None)):
                child.reset_parameters()


def _hf_roots(module: nn.Module) -> list[nn.Module]:
    """The outermost Hugging Face models in ``module`` (their ``initialize_weights`` covers their submodels)."""
    try:
        from transformers import PreTrainedModel
    except ImportError:
        return []
    roots: list[nn.Module] = []
    for child in module.modules():
        if isinstance(child, PreTrainedModel) and not any(child in root.modules() for root in roots):
            roots.append(child)
    return roots


def _owns_tensors(module: nn.Module) -> bool:
    return any(True for _ in itertools.chain(module.parameters(recurse=False), module.buffers(recurse=False)))
