"""A capped, least-recently-used pool of process groups keyed by their global rank tuples.

Creating a communicator is expensive (NCCL: hundreds of MB and up to seconds; HCCL: twice
HCCL_BUFFSIZE), and ``new_group`` is a collective over the whole world. When the world group is bound
to a device (``init_process_group(device_id=...)``, see :mod:`lightning_dhp.distributed.world`), NCCL
creates each pooled group's communicator at once by splitting the world's (``ncclCommSplit``; ranks
outside the group take part without joining); otherwise it builds it from scratch at the group's first
collective. Every rank therefore calls
:meth:`GroupPool.acquire_plan` with the same rank sets in the same order (every rank knows the whole
plan), so creation and eviction happen in lockstep and the pools of all ranks stay identical.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch.distributed as dist

RankSet = tuple[int, ...]


@dataclass
class PoolStats:
    """Counters of one pool, for the logger. ``misses`` and ``evictions`` count groups (the same on
    every rank); ``communicators_*`` count the groups this rank belongs to, each of which holds one
    communicator on this rank."""

    hits: int = 0
    misses: int = 0
    evictions: int = 0
    creation_seconds: float = 0.0
    communicators_created: int = 0
    communicators_destroyed: int = 0

    @property
    def communicators_alive(self) -> int:
        return self.communicators_created - self.communicators_destroyed

    @property
    def hit_rate(self) -> float:
        lookups = self.hits + self.misses
        return self.hits / lookups if lookups else 1.0


class GroupPool:
    """Process groups of the plans seen so far, at most ``capacity`` alive between steps.

    Degree-1 groups never get a communicator. Groups needed by the current plan are pinned: if one
    plan needs more distinct groups than ``capacity``, the pool grows for that step and shrinks back
    at the next one. Eviction only happens inside :meth:`acquire_plan`, i.e. at the start of a step on
    every rank at once, so no rank can still be using an evicted group.
    """

    def __init__(self, capacity: int, *, create: Callable[[list[int]], dist.ProcessGroup] | None = None,
                 destroy: Callable[[dist.ProcessGroup], None] | None = None) -> None:
        if capacity < 1:
            raise ValueError(f"pool_size must be >= 1 (got {capacity}); it caps the live process groups")
        self.capacity = capacity
        self.stats = PoolStats()
        self._groups: OrderedDict[RankSet, dist.ProcessGroup] = OrderedDict()
        if create is None or destroy is None:  # real process groups (the simulator passes its own functions)
            import torch.distributed as dist

            create = create or dist.new_group  # groups take the world's backend
            destroy = destroy or dist.destroy_process_group
        self._create = create
        self._destroy = destroy

    def __len__(self) -> int:
        return len(self._groups)

    def __contains__(self, ranks: RankSet) -> bool:
        return tuple(ranks) in self._groups

    def acquire_plan(self, rank_sets: Iterable[RankSet]) -> dict[RankSet, dist.ProcessGroup]:
        """Groups for every multi-rank set of one plan, created or reused in the given order.

        Must be called with the same sequence on every rank of the world.
        """
        wanted = list(dict.fromkeys(tuple(ranks) for ranks in rank_sets if len(ranks) > 1))
        for ranks in wanted:
            if ranks in self._groups:
                self.stats.hits += 1
                self._groups.move_to_end(ranks)
            else:
                self.stats.misses += 1
                started = time.perf_counter()
                self._groups[ranks] = self._create(list(ranks))
                self.stats.creation_seconds += time.perf_counter() - started
                self.stats.communicators_created += _is_member(self._groups[ranks])
        self._evict(keep=set(wanted))
        return {ranks: self._groups[ranks] for ranks in wanted}

    def _evict(self, keep: set[RankSet]) -> None:
        for ranks in list(self._groups):
            if len(self._groups) <= self.capacity:
                return
            if ranks not in keep:
                self._release(self._groups.pop(ranks))
                self.stats.evictions += 1

    def _release(self, group: dist.ProcessGroup) -> None:
        self._destroy(group)
        self.stats.communicators_destroyed += _is_member(group)

    def clear(self) -> None:
        """Destroy every pooled group (at teardown, on every rank)."""
        while self._groups:
            _, group = self._groups.popitem(last=False)
            self._release(group)


_NON_GROUP_MEMBER = -100  # torch.distributed.GroupMember.NON_GROUP_MEMBER, without importing torch


def _is_member(group: dist.ProcessGroup) -> bool:
    """Whether this rank belongs to a group ``new_group`` returned (others get a placeholder)."""
    return not (isinstance(group, int) and group == _NON_GROUP_MEMBER)
