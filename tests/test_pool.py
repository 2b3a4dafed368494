"""The group pool: lockstep creation in plan order, capped LRU eviction, pinned current plan."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from lightning_dhp.distributed.pool import GroupPool
from lightning_dhp.testing import run_distributed


class FakeGroups:
    def __init__(self) -> None:
        self.created: list[tuple[int, ...]] = []
        self.destroyed: list[tuple[int, ...]] = []

    def create(self, ranks: list[int]) -> tuple[int, ...]:
        self.created.append(tuple(ranks))
        return tuple(ranks)

    def destroy(self, group: tuple[int, ...]) -> None:
        self.destroyed.append(group)


def test_degree_one_gets_no_group_and_repeats_are_hits():
    fake = FakeGroups()
    pool = GroupPool(4, create=fake.create, destroy=fake.destroy)
    groups = pool.acquire_plan([(0,), (1, 2), (3, 4, 5), (1, 2)])
    assert list(groups) == [(1, 2), (3, 4, 5)]
    assert fake.created == [(1, 2), (3, 4, 5)]
    pool.acquire_plan([(3, 4, 5)])
    assert (pool.stats.hits, pool.stats.misses) == (1, 2)


def test_least_recently_used_is_evicted_but_never_the_current_plan():
    fake = FakeGroups()
    pool = GroupPool(2, create=fake.create, destroy=fake.destroy)
    pool.acquire_plan([(0, 1), (2, 3)])
    pool.acquire_plan([(0, 1)])  # (2, 3) is now the least recently used
    pool.acquire_plan([(4, 5)])
    assert fake.destroyed == [(2, 3)]
    # One plan needing more groups than the cap keeps them all for its step ...
    groups = pool.acquire_plan([(0, 1, 2), (3, 4, 5), (6, 7)])
    assert len(groups) == 3 and len(pool) == 3
    # ... and the pool shrinks back at the next step.
    pool.acquire_plan([(6, 7)])
    assert len(pool) == 2 and (6, 7) in pool
    assert pool.stats.evictions == len(fake.destroyed)
    assert (pool.stats.communicators_created, pool.stats.communicators_destroyed) == (6, 4)
    pool.clear()
    assert pool.stats.communicators_alive == 0 and len(fake.destroyed) == 6


def test_pool_size_must_be_positive():
    with pytest.raises(ValueError, match="pool_size must be >= 1"):
        GroupPool(0)


def _changing_plans(rank: int, world_size: int) -> list[float]:
    """Plans whose degrees change every step (including 3 and odd splits), through a pool of 2."""
    pool = GroupPool(2)
    plans = [[(0, 1, 2), (3,)], [(0, 1), (2, 3)], [(0, 1, 2, 3)], [(0,), (1, 2, 3)], [(0, 1, 2), (3,)]]
    sums = []
    for plan in plans:
        groups = pool.acquire_plan(plan)
        for ranks in plan:
            if rank in ranks and len(ranks) > 1:
                value = torch.tensor([float(rank)])
                dist.all_reduce(value, group=groups[ranks])
                sums.append(value.item())
        assert len(pool) <= max(2, len(groups))
    stats = pool.stats
    return [*sums, stats.misses, stats.evictions, stats.communicators_created, stats.communicators_alive]


def test_pool_creates_and_evicts_in_lockstep_on_real_groups():
    results = run_distributed(_changing_plans, 4, timeout_s=180)
    # 6 groups created and 4 evicted on every rank, in lockstep; communicators only where the rank is a
    # member: rank 0 is in (0,1,2) twice, (0,1), (0,1,2,3); rank 3 in (2,3), (0,1,2,3), (1,2,3); one of
    # each rank's stays alive ((0,1,2), resp. (1,2,3)).
    assert results[0] == [3.0, 1.0, 6.0, 3.0, 6, 4, 4, 1]
    assert results[3] == [5.0, 6.0, 6.0, 6, 4, 3, 1]
