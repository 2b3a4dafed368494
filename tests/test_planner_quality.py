"""Planner quality: the exact allocation against brute force, the lower bound and plan_batch against
an exact ILP optimum (scipy HiGHS) on small one-round instances."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from benchmarks.ilp import ILP_COST_MODELS as MODELS
from benchmarks.ilp import ilp_optimum, small_instances
from lightning_dhp.planner import plan_batch, static_plan
from lightning_dhp.planner.allocation import allocate, build_table

pytest.importorskip("scipy")


@pytest.mark.parametrize("model_name", sorted(MODELS))
def test_plan_batch_is_within_3_percent_of_the_ilp_optimum(model_name):
    cost = MODELS[model_name]
    gaps = []
    for lengths, num_devices, capacity in small_instances(seed=len(model_name), count=16):
        plan = plan_batch(lengths, num_devices, capacity, cost)
        optimum = ilp_optimum(lengths, num_devices, capacity, cost)
        if len(plan.rounds) > 1:
            assert optimum is None, f"{lengths} fits one round (ILP {optimum}) but got {len(plan.rounds)}"
            continue
        assert optimum is not None
        assert plan.lower_bound <= optimum * (1 + 1e-9), "the lower bound must hold for the optimum"
        assert plan.predicted_time >= optimum * (1 - 1e-6), "nothing beats the optimum"
        gaps.append(plan.predicted_time / optimum - 1)
    assert len(gaps) >= 8
    assert max(gaps) <= 0.03, f"worst gap {max(gaps):.3%}"


def brute_force_allocation(times: list[dict[int, float]], num_devices: int) -> float:
    best = np.inf
    for degrees in itertools.product(*[sorted(row) for row in times]):
        if sum(degrees) <= num_devices:
            best = min(best, max(row[d] for row, d in zip(times, degrees, strict=True)))
    return best


def test_exact_allocation_matches_brute_force_over_degree_vectors():
    rng = np.random.default_rng(3)
    for trial in range(40):
        num_bins, num_devices = int(rng.integers(1, 5)), int(rng.integers(4, 11))
        cost = list(MODELS.values())[trial % 3]
        node_size = [None, 2, 4][trial % 3]
        bins = [rng.integers(1, 5000, size=int(rng.integers(1, 4))) for _ in range(num_bins)]
        min_degree = np.ones(num_bins, dtype=np.int64)
        max_degree = np.full(num_bins, num_devices - num_bins + 1, dtype=np.int64)
        table = build_table(bins, min_degree, max_degree, 0.0, cost, node_size)
        degrees, makespan = allocate(table, num_devices)
        times = [
            {
                d: cost.group_time(lengths.tolist(), d, crosses_node=bool(node_size and d > node_size))
                for d in range(1, num_devices - num_bins + 2)
            }
            for lengths in bins
        ]
        assert makespan == pytest.approx(brute_force_allocation(times, num_devices), rel=1e-12)
        assert degrees.sum() <= num_devices
        assert max(times[b][int(d)] for b, d in enumerate(degrees)) == pytest.approx(makespan, rel=1e-12)


def test_plan_batch_beats_or_matches_every_static_degree_on_a_mixed_batch():
    rng = np.random.default_rng(11)
    lengths = np.concatenate([rng.integers(100, 600, size=48), rng.integers(8000, 30000, size=4)]).tolist()
    dynamic = plan_batch(lengths, 16, 8192)
    statics = [static_plan(lengths, 16, 8192, degree).predicted_time for degree in (4, 8, 16)]
    assert dynamic.predicted_time < min(statics)


def test_two_long_samples_share_a_group_when_alone_they_would_need_too_many_devices():
    """Four samples above one device's memory need 8 devices alone but 7 are there: the optimum
    (ILP) puts two of them in one degree-3 group; sizing alone never pairs them."""
    lengths, num_devices, capacity = [10583, 6934, 1778, 1334, 8250, 631, 8795, 10095], 7, 8192
    cost = MODELS["comm_heavy"]
    plan = plan_batch(lengths, num_devices, capacity, cost)
    assert len(plan.rounds) == 1
    assert plan.predicted_time == pytest.approx(ilp_optimum(lengths, num_devices, capacity, cost), rel=1e-6)


def test_the_multi_round_ilp_sums_the_rounds_and_needs_enough_of_them():
    cost = MODELS["default"]
    one = cost.group_time([1000], 1)
    assert ilp_optimum([1000, 1000], 1, 1000, cost) is None  # two full samples do not fit one round
    assert ilp_optimum([1000, 1000], 1, 1000, cost, num_rounds=2) == pytest.approx(2 * one, rel=1e-6)
    together = cost.group_time([900, 10], 1)  # one round holds both: the second stays empty and free
    assert ilp_optimum([900, 10], 1, 1000, cost, num_rounds=2) == pytest.approx(together, rel=1e-6)
