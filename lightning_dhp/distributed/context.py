"""The context-parallel context of the running micro-step.

The strategy enters a :class:`CPContext` around each planned round; ``cp_attention`` called without an
explicit layout picks it up. This module is the only meeting point of the two, so attention knows
nothing of Lightning and the strategy knows nothing of attention kernels.

The context is process-wide, not thread-local: backward (and the forward recompute of activation
checkpointing inside it) may run on autograd's device threads, and it must see the round's context.
The strategy keeps a round's context current until that round's backward has run.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal, get_args

if TYPE_CHECKING:
    import torch.distributed as dist

    from lightning_dhp.attention.layout import ZigzagLayout

CPImplementation = Literal["ring", "allgather"]
CP_IMPLEMENTATIONS: tuple[str, ...] = get_args(CPImplementation)


@dataclass(frozen=True)
class CPContext:
    """Where this rank's attention runs: its layout, its group and the global ranks of that group.

    ``group`` is ``None`` at degree 1. For the group-free ring it is the world group, and ``ranks``
    names the global ranks of the ring in order.
    """

    layout: ZigzagLayout
    group: dist.ProcessGroup | None
    ranks: tuple[int, ...]
    implementation: CPImplementation = "ring"


class _State:
    context: CPContext | None = None
    required: str | None = None


_state = _State()


def current_cp_context() -> CPContext | None:
    """The context of the running micro-step, or ``None`` outside any."""
    return _state.context


@contextmanager
def cp_context(context: CPContext | None) -> Iterator[CPContext | None]:
    """Make ``context`` current for the duration of the block (nesting restores the outer one).

    ``None`` makes no context current (attention then runs locally, or raises where required).
    """
    outer = _state.context
    _state.context = context
    try:
        yield context
    finally:
        _state.context = outer


@contextmanager
def require_cp_context(reason: str) -> Iterator[None]:
    """While active, ``cp_attention`` without a context raises ``reason`` instead of running locally.

    The strategy sets this on multi-device runs: attention outside a planned batch would silently
    attend over the wrong tokens there.
    """
    outer = _state.required
    _state.required = reason
    try:
        yield
    finally:
        _state.required = outer


def missing_context_reason() -> str | None:
    """The reason set by :func:`require_cp_context`, or ``None`` when local attention is fine."""
    return _state.required
