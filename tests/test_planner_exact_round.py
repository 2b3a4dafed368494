"""Exact enumeration of small rounds (``lightning_dhp.planner.exact_round``) against a brute-force oracle."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from lightning_dhp.planner import CostModel, PlannerOptions, plan_batch
from lightning_dhp.planner.exact_round import exact_layout, layout_count
from lightning_dhp.planner.problem import batch_problem


def _set_partitions(items: list[int]) -> list[list[list[int]]]:
    if not items:
        return [[]]
    first, rest = items[0], items[1:]
    partitions = []
    for partition in _set_partitions(rest):
        partitions.append([[first], *partition])
        for index in range(len(partition)):
            partitions.append([*partition[:index], [first, *partition[index]], *partition[index + 1:]])
    return partitions


def _group_time(cost: CostModel, lengths: list[int], degree: int, capacity: int) -> float:
    """One group's time from the cost model's formula, inf when its padded tokens overflow its memory."""
    padded = [length if degree == 1 else math.ceil(length / (2 * degree)) * 2 * degree for length in lengths]
    if sum(padded) > degree * capacity:
        return math.inf
    work = sum(cost.attention_s_per_token2 * p * p + cost.linear_s_per_token * p for p in padded)
    ring = (degree - 1) * (1 - cost.comm_overlap)
    comm = ring * cost.kv_bytes_per_token * sum(padded) / cost.intra_node_bytes_per_s
    return cost.overhead_s + ring * cost.ring_step_latency_s + (work + comm) / degree


def _brute_force(lengths: list[int], num_devices: int, capacity: int, cost: CostModel) -> float:
    best = math.inf
    for partition in _set_partitions(list(range(len(lengths)))):
        if len(partition) > num_devices:
            continue
        for degrees in itertools.product(range(1, num_devices + 1), repeat=len(partition)):
            if sum(degrees) <= num_devices:
                best = min(best, max(_group_time(cost, [lengths[i] for i in group], degree, capacity)
                                     for group, degree in zip(partition, degrees, strict=True)))
    return best


def test_layout_count_counts_partitions_times_degree_vectors():
    assert layout_count(2, 4) == 4 + 6  # one bin at 4 degrees; two bins at the 6 vectors summing to <= 4
    assert layout_count(3, 2) == 2 + 3 * 1  # three 2-bin partitions at (1, 1); three bins do not fit
    assert layout_count(8, 4) == 6331


@pytest.mark.parametrize("seed", range(12))
def test_exact_layout_matches_brute_force(seed):
    rng = np.random.default_rng(seed)
    num_samples, num_devices = int(rng.integers(1, 7)), int(rng.integers(1, 6))
    capacity = 512
    lengths = rng.integers(10, capacity * num_devices // 2, num_samples).tolist()
    cost = CostModel.default()
    problem = batch_problem(np.array(lengths, dtype=np.int64), num_devices, capacity, cost, None, None, None)
    expected = _brute_force(lengths, num_devices, capacity, cost)
    layout = exact_layout(problem)
    if math.isinf(expected):
        assert layout is None
        return
    assert layout is not None
    assert layout.makespan == pytest.approx(expected, rel=1e-12)
    assert sorted(itertools.chain.from_iterable(layout.bins)) == list(range(num_samples))
    assert sum(layout.degrees) <= num_devices
    timed = [_group_time(cost, [lengths[i] for i in group], degree, capacity)
             for group, degree in zip(layout.bins, layout.degrees, strict=True)]
    assert max(timed) == pytest.approx(expected, rel=1e-12)


def test_enumerated_one_round_batches_are_never_slower_than_the_starts():
    rng = np.random.default_rng(7)
    starts_only = PlannerOptions(exact_round_layouts=0)
    compared = 0
    for _ in range(20):
        lengths = rng.integers(20, 1200, int(rng.integers(2, 7))).tolist()
        exact, heuristic = plan_batch(lengths, 4, 1024), plan_batch(lengths, 4, 1024, options=starts_only)
        if len(exact.rounds) == len(heuristic.rounds) == 1:
            compared += 1
            assert exact.predicted_time <= heuristic.predicted_time * (1 + 1e-12)
    assert compared >= 10
