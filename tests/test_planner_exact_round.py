"""Exact small rounds against independent oracles: the enumeration (``lightning_dhp.planner.exact_round``) and
the branch and bound (``lightning_dhp.planner.exact_search``) against brute force over every layout, the search
also against a dynamic program over subsets on rounds of 9-10 samples."""

from __future__ import annotations

import dataclasses
import functools
import itertools
import math
from pathlib import Path

import numpy as np
import pytest

from lightning_dhp.planner import CostModel, PlannerOptions, plan_batch
from lightning_dhp.planner.exact_round import exact_layout, layout_count
from lightning_dhp.planner.exact_search import search_layout
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


@pytest.mark.parametrize(("starts_only", "seed", "samples", "longest", "batches", "least_compared"), [
    pytest.param(PlannerOptions(exact_round_layouts=0), 7, (2, 7), 1200, 20, 10, id="enumerated"),
    pytest.param(PlannerOptions(exact_search_samples=0), 11, (9, 13), 600, 12, 8, id="searched"),
])
def test_exact_one_round_batches_are_never_slower_than_the_starts(starts_only, seed, samples, longest, batches,
                                                                  least_compared):
    """One-round batches solved exactly (enumerated: 2-6 samples; searched: 9-12) against the same batches
    planned from starts (``starts_only`` turns the exact method off)."""
    rng = np.random.default_rng(seed)
    compared = 0
    for _ in range(batches):
        lengths = rng.integers(20, longest, int(rng.integers(*samples))).tolist()
        exact, heuristic = plan_batch(lengths, 4, 1024), plan_batch(lengths, 4, 1024, options=starts_only)
        if len(exact.rounds) == len(heuristic.rounds) == 1:
            compared += 1
            assert exact.predicted_time <= heuristic.predicted_time * (1 + 1e-12)
    assert compared >= least_compared


CPU_MODEL = CostModel.load(Path(__file__).resolve().parents[1] / "benchmarks" / "results" / "cpu_cost_model.json")


def _check_layout(layout, lengths: list[int], num_devices: int, capacity: int, cost: CostModel, expected: float):
    """``layout`` reaches ``expected`` (the oracle's optimum) with a valid partition and degrees."""
    if math.isinf(expected):
        assert layout is None
        return
    assert layout is not None
    assert layout.makespan == pytest.approx(expected, rel=1e-12)
    assert sorted(itertools.chain.from_iterable(layout.bins)) == list(range(len(lengths)))
    assert sum(layout.degrees) <= num_devices
    timed = [_group_time(cost, [lengths[i] for i in group], degree, capacity)
             for group, degree in zip(layout.bins, layout.degrees, strict=True)]
    assert max(timed) == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("seed", range(16))
def test_search_layout_matches_brute_force(seed):
    rng = np.random.default_rng(100 + seed)
    num_samples, num_devices = int(rng.integers(1, 8)), int(rng.integers(1, 6))
    capacity = 512
    lengths = rng.integers(10, capacity * num_devices // 2, num_samples).tolist()
    cost = CostModel.default() if seed % 2 else CPU_MODEL
    problem = batch_problem(np.array(lengths, dtype=np.int64), num_devices, capacity, cost, None, None, None)
    expected = _brute_force(lengths, num_devices, capacity, cost)
    _check_layout(search_layout(problem, 1 << 20), lengths, num_devices, capacity, cost, expected)


def _subset_optimum(lengths: list[int], num_devices: int, capacity: int, cost: CostModel) -> float:
    """The optimal makespan by a dynamic program over subsets (every subset's best layout on each number of
    devices, from the subset's bin holding its lowest sample): ``O(3^n N^2)``, in plain Python."""
    count = len(lengths)
    group = [[math.inf] * (num_devices + 1) for _ in range(1 << count)]
    for mask in range(1, 1 << count):
        members = [lengths[i] for i in range(count) if mask >> i & 1]
        for degree in range(1, num_devices + 1):
            group[mask][degree] = _group_time(cost, members, degree, capacity)

    @functools.cache
    def best(mask: int, devices: int) -> float:
        if mask == 0:
            return -math.inf
        lowest, fastest = mask & -mask, math.inf
        free = mask ^ lowest
        subset = free
        while True:  # every subset of the free members, with the lowest one: the bin holding it
            chosen = subset | lowest
            for degree in range(1, devices + 1):
                if group[chosen][degree] < fastest:
                    fastest = min(fastest, max(group[chosen][degree], best(mask ^ chosen, devices - degree)))
            if subset == 0:
                return fastest
            subset = (subset - 1) & free

    return best((1 << count) - 1, num_devices)


@pytest.mark.parametrize("seed", range(12))
def test_search_layout_matches_a_subset_program_on_rounds_of_9_to_11_samples(seed):
    # the main job's shape: 4 devices, memory nearly full (a sample longer than one device's in every third
    # round); both of its cost models
    rng = np.random.default_rng(200 + seed)
    num_samples, num_devices, capacity = 9 + seed % 3, 4, int(rng.choice([384, 448]))
    lengths = rng.integers(10, capacity, num_samples)
    lengths = np.maximum(10, lengths * (0.9 * num_devices * capacity / lengths.sum())).astype(np.int64)
    if seed % 3 == 2:
        lengths[0] = capacity + capacity // 2
    lengths = lengths.tolist()
    cost = CostModel.default() if seed % 4 < 2 else CPU_MODEL
    problem = batch_problem(np.array(lengths, dtype=np.int64), num_devices, capacity, cost, None, None, None)
    assert seed % 3 != 2 or problem.min_degree.max() == 2
    expected = _subset_optimum(lengths, num_devices, capacity, cost)
    _check_layout(search_layout(problem, 1 << 20), lengths, num_devices, capacity, cost, expected)


@pytest.mark.parametrize("seed", range(12))
def test_search_layout_matches_the_enumeration_with_vision_patches(seed):
    rng = np.random.default_rng(300 + seed)
    num_samples, num_devices, capacity = int(rng.integers(2, 8)), int(rng.integers(2, 5)), 1024
    lengths = rng.integers(10, capacity, num_samples)
    patches = np.where(rng.random(num_samples) < 0.6, rng.integers(0, 2 * capacity, num_samples), 0)
    budget = None if seed % 2 else capacity
    cost = dataclasses.replace(CostModel.default(), vision_s_per_patch=1e-5)
    problem = batch_problem(lengths, num_devices, capacity, cost, None, patches, budget)
    enumerated, searched = exact_layout(problem), search_layout(problem, 1 << 20)
    assert (enumerated is None) == (searched is None)
    if enumerated is not None:
        assert searched.makespan == enumerated.makespan


def test_a_search_past_its_pair_budget_leaves_the_round_to_the_starts():
    lengths = np.random.default_rng(12).integers(20, 600, 11)
    problem = batch_problem(lengths, 4, 1024, CostModel.default(), None, None, None)
    assert search_layout(problem, 1) is None
    no_budget = plan_batch(lengths, 4, 1024, options=PlannerOptions(exact_search_pairs=1))
    assert no_budget.digest() == plan_batch(lengths, 4, 1024, options=PlannerOptions(exact_search_samples=0)).digest()
