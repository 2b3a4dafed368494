"""The planner's LPT loops, in waves and with bins set aside, against one-item-at-a-time oracles.

``balanced_assignment`` and ``pack_round`` place items in waves over many bins (``lightning_dhp.planner.lpt``)
and set aside bins too full for the item at hand; the oracles below scan every bin for every item, as the rule
says, so any shortcut that changes a single choice fails here.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from lightning_dhp.planner import CostModel, packing, rounds
from lightning_dhp.planner.inputs import check_inputs
from lightning_dhp.planner.lpt import WAVE_MIN_BINS
from lightning_dhp.planner.packing import pack_round, size_round
from lightning_dhp.planner.problem import batch_problem
from lightning_dhp.planner.rounds import SCAN_MAX_BINS, SORT_KEYS_MIN_ITEMS, balanced_assignment, heaviest_first


def lpt_oracle(work, size, num_bins, degree, tokens_per_device, patches=None, patches_per_device=None):
    """Items heaviest first (lower index on ties) to the least-loaded bin (lower index on ties) with room."""
    load, used, held = [0.0] * num_bins, [0] * num_bins, [0] * num_bins
    members = [[] for _ in range(num_bins)]
    for item in sorted(range(len(work)), key=lambda index: (-work[index], index)):
        room = [
            bin_index for bin_index in range(num_bins)
            if used[bin_index] + size[item] <= degree * tokens_per_device
            and (patches is None or held[bin_index] + patches[item] <= degree * patches_per_device)
        ]
        if not room:
            return None
        chosen = min(room, key=lambda bin_index: (load[bin_index], bin_index))
        load[chosen] += float(work[item])
        used[chosen] += int(size[item])
        held[chosen] += 0 if patches is None else int(patches[item])
        members[chosen].append(item)
    return members


@pytest.mark.parametrize("seed", range(12))
def test_balanced_assignment_matches_one_item_at_a_time(seed):
    rng = np.random.default_rng(seed)
    items = int(rng.integers(300, 1200))
    num_bins = WAVE_MIN_BINS + int(rng.integers(0, 200)) if seed % 4 else int(rng.integers(2, 8))
    work = [rng.pareto(1.5, items) + 0.01, rng.integers(1, 4, items).astype(float)][seed % 2]  # spread, ties
    size = rng.integers(1, 1000, items)
    tokens_per_device = int(size.sum() / num_bins * rng.uniform(0.9, 2.0))  # memory binds, or nearly
    patches = patches_per_device = None
    if seed % 3 == 0:
        patches = rng.integers(0, 50, items)
        patches_per_device = int(patches.sum() / num_bins * rng.uniform(0.9, 2.0))
    expected = lpt_oracle(work, size, num_bins, 1, tokens_per_device, patches, patches_per_device)
    assert balanced_assignment(work, size, num_bins, 1, tokens_per_device, patches, patches_per_device) == expected



@pytest.mark.parametrize("count", [SORT_KEYS_MIN_ITEMS - 1, SORT_KEYS_MIN_ITEMS, 5000])
def test_heaviest_first_orders_by_work_then_index(count):
    """Both ways (``np.lexsort`` below ``SORT_KEYS_MIN_ITEMS`` items, integer keys from it on), with many ties."""
    rng = np.random.default_rng(count)
    for work in (rng.pareto(1.5, count), rng.integers(1, 6, count).astype(float), np.zeros(count)):
        expected = sorted(range(count), key=lambda index: (-work[index], index))
        assert heaviest_first(work).tolist() == expected


@pytest.mark.parametrize("scan", [True, False])
@pytest.mark.parametrize("seed", range(8))
def test_balanced_assignment_over_few_bins_matches_one_item_at_a_time(seed, scan, monkeypatch):
    """Over few bins the scan (``scan``) and the heap (the scan turned off) both choose as the oracle does."""
    if not scan:
        monkeypatch.setattr(rounds, "SCAN_MAX_BINS", 0)
    rng = np.random.default_rng(100 + seed)
    items = int(rng.integers(50, 400))
    num_bins = int(rng.integers(1, SCAN_MAX_BINS + 1))
    work = [rng.pareto(1.5, items) + 0.01, rng.integers(1, 4, items).astype(float)][seed % 2]  # spread, ties
    size = rng.integers(1, 1000, items)
    tokens_per_device = int(size.sum() / num_bins * rng.uniform(1.01, 1.3))  # memory binds, or nearly
    patches = patches_per_device = None
    if seed % 4 >= 2:
        patches = rng.integers(0, 50, items)
        patches_per_device = int(patches.sum() / num_bins * rng.uniform(1.01, 1.3))
    expected = lpt_oracle(work, size, num_bins, 1, tokens_per_device, patches, patches_per_device)
    assert balanced_assignment(work, size, num_bins, 1, tokens_per_device, patches, patches_per_device) == expected


def pack_oracle(problem, singles, single_degrees, pool):
    """Pool samples by cost at the smallest degree, longest first (lower position on ties), each to the bin that
    finishes earliest with it (the smaller degree, then the earlier time and bin on ties) among those with room."""
    cost = problem.cost
    pool_bins = min(problem.num_devices - int(single_degrees.sum()), len(pool))
    degrees = [int(degree) for degree in single_degrees] + [1] * pool_bins
    members = [[int(single)] for single in singles] + [[] for _ in range(pool_bins)]
    single_pairs = list(zip(singles.tolist(), degrees[: len(singles)], strict=True))
    tokens = [int(problem.padded(problem.lengths[single], degree)) for single, degree in single_pairs] + [0] * pool_bins
    held = [int(problem.patches[single]) if problem.patches is not None else 0 for single in singles] + [0] * pool_bins
    times = [float(cost.times_from_sums(0.0, 0.0, degree, node_size=problem.node_size)) for degree in degrees]
    for index, (single, degree) in enumerate(single_pairs):
        times[index] += float(problem.sample_costs(np.array([single]), np.array([degree]))[0])
    smallest = min(degrees)
    costs = {degree: problem.sample_costs(slice(None), np.full(len(problem.lengths), degree)).tolist()
             for degree in set(degrees)}
    padded = {degree: problem.padded(problem.lengths, np.full(len(problem.lengths), degree)).tolist()
              for degree in set(degrees)}
    first_cost = problem.sample_costs(pool, np.full(len(pool), smallest)).tolist()
    order = [sample for _, sample in sorted(zip((-cost for cost in first_cost), pool.tolist(), strict=True))]
    budget = problem.patch_budget
    for sample in order:
        best = (math.inf, math.inf, math.inf, -1)
        for bin_index, degree in enumerate(degrees):
            need = padded[degree][sample]
            patches = 0 if problem.patches is None else int(problem.patches[sample])
            if tokens[bin_index] + need > degree * problem.tokens_per_device:
                continue
            if budget is not None and held[bin_index] + patches > degree * budget:
                continue
            finish = times[bin_index] + costs[degree][sample]
            best = min(best, (finish, degree, times[bin_index], bin_index))
        if best[3] < 0:
            return None
        finish, degree, _, chosen = best
        times[chosen] = finish
        tokens[chosen] += padded[degree][sample]
        held[chosen] += 0 if problem.patches is None else int(problem.patches[sample])
        members[chosen].append(int(sample))
    return [bin_members for bin_members in members if bin_members]


@pytest.mark.parametrize("seed", range(6))
def test_pack_round_matches_one_sample_at_a_time(seed):
    rng = np.random.default_rng(100 + seed)
    samples, devices, capacity = 500, 400, 4096
    lengths = np.where(rng.random(samples) < 0.1, rng.integers(4000, 9000, samples), rng.integers(50, 2000, samples))
    patches = patches_per_device = None
    if seed % 2:
        patches = rng.integers(0, 400, samples) * (rng.random(samples) < 0.5)
        patches_per_device = 800
    checked = check_inputs(lengths, devices, capacity, 8, patches, patches_per_device)
    batch = batch_problem(*checked[:3], CostModel.default(), *checked[3:])
    positions = np.arange(samples)
    problem = batch.round(positions, batch.round_bound(positions))
    singles, single_degrees, pool = size_round(problem)
    assert devices - single_degrees.sum() >= WAVE_MIN_BINS  # the pool's bins go in waves
    assert pack_round(problem, singles, single_degrees, pool) == pack_oracle(problem, singles, single_degrees, pool)


# every sample costs its padded tokens / degree seconds: sums of small multiples of 1/2 and 1/4, so bins of
# different degrees often finish at exactly the same time (the smaller degree must win such ties)
EXACT_COST = CostModel(attention_s_per_token2=0.0, linear_s_per_token=1.0, overhead_s=0.0, ring_step_latency_s=0.0,
                       comm_overlap=1.0)


@pytest.mark.parametrize("descending", [True, False])
@pytest.mark.parametrize("seed", range(12))
def test_pack_round_without_vision_matches_one_sample_at_a_time(seed, descending, monkeypatch):
    """Without a vision budget each class's first bin is kept one with room (``descending``) or, the needs' order
    check turned off, the earliest bin with room is searched for: both choose as the oracle does, over many or
    few pool bins, with tied lengths and finishing times, and memory that binds (bins leave and return)."""
    if not descending:
        monkeypatch.setattr(packing, "_needs_descend", lambda needs: False)
    rng = np.random.default_rng(200 + seed)
    devices, capacity = [(400, 4096), (40, 2048), (24, 1024)][seed % 3]
    cost = [CostModel.default(), EXACT_COST][seed // 3 % 2]
    long = rng.random(1000) < 0.1
    lengths = np.where(long, rng.integers(capacity, 3 * capacity, 1000), rng.integers(50, capacity // 2, 1000))
    if seed // 6:  # few distinct lengths: many ties
        lengths = np.where(long, lengths, rng.choice([64, 100, 101, 200, capacity // 4], 1000))
    lengths = lengths[np.cumsum(lengths) <= rng.uniform(0.85, 0.97) * devices * capacity]  # one round, nearly full
    checked = check_inputs(lengths, devices, capacity, 8, None, None)
    batch = batch_problem(*checked[:3], cost, *checked[3:])
    positions = np.arange(len(lengths))
    problem = batch.round(positions, batch.round_bound(positions))
    singles, single_degrees, pool = size_round(problem)
    assert len(set(single_degrees.tolist())) >= 2  # several degree classes compete
    assert pack_round(problem, singles, single_degrees, pool) == pack_oracle(problem, singles, single_degrees, pool)
