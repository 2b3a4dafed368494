"""Peers rebuilt for the simulator: valid plans, the paper's DP is exact, Megatron's groups are
power-of-two aligned blocks, and a sequential group costs its samples one by one."""

from __future__ import annotations

import dataclasses
import itertools

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lightning_dhp.planner import CostModel, PlanError
from lightning_dhp.simulate.peers import (
    _min_max_dp,
    megatron_cp_size,
    megatron_dcp_plan,
    paper_plan,
    sequential_group_time,
)

COST = CostModel.default()
PEERS = {"dhp-paper": paper_plan, "megatron-dcp": megatron_dcp_plan}


@st.composite
def batches(draw):
    num_devices = draw(st.sampled_from([1, 2, 3, 4, 6, 8, 12, 16]))
    capacity = draw(st.sampled_from([8, 100, 4096]))
    longest = capacity if num_devices == 1 else num_devices * capacity - 2 * num_devices
    lengths = draw(st.lists(st.integers(1, max(1, longest)), min_size=1, max_size=40))
    node_size = draw(st.sampled_from([None, 2, 4, 8]))
    return lengths, num_devices, capacity, node_size


@pytest.mark.parametrize("peer", sorted(PEERS))
@settings(max_examples=60, deadline=None)
@given(batch=batches())
def test_peer_plans_are_valid_plans(peer, batch):
    lengths, num_devices, capacity, node_size = batch
    plan = PEERS[peer](lengths, num_devices, capacity, COST, node_size=node_size)
    plan.validate()
    assert plan.lengths == tuple(lengths) and plan.num_devices == num_devices
    if peer == "megatron-dcp":
        for round_ in plan.rounds:
            for group in round_.groups:
                assert group.degree == num_devices or group.degree & (group.degree - 1) == 0, group.degree
                assert group.ranks[0] % group.degree == 0 or group.degree == num_devices  # pre-created blocks
                for sample in group.samples:
                    assert group.degree >= megatron_cp_size(lengths[sample], num_devices, capacity)


@pytest.mark.parametrize("peer", sorted(PEERS))
def test_peers_reject_a_sample_that_fits_nowhere(peer):
    with pytest.raises(PlanError, match="sample 1 has length 5000 tokens and cannot fit"):
        PEERS[peer]([10, 5000], 2, 1000, COST)


def test_the_paper_dp_finds_the_brute_force_min_max_degrees():
    rng = np.random.default_rng(5)
    for _ in range(30):
        num_bins, num_devices = int(rng.integers(1, 4)), int(rng.integers(3, 9))
        times = rng.uniform(1, 10, size=(num_bins, num_devices + 1))
        times[:, 0] = np.inf
        times[:, 1:] = np.sort(times[:, 1:], axis=1)[:, ::-1]  # faster with more devices ...
        times[rng.random(times.shape) < 0.2] = np.inf  # ... except where a degree is not allowed
        degrees = _min_max_dp(times, num_devices)
        best = min(
            (max(times[b, d] for b, d in enumerate(choice))
             for choice in itertools.product(range(1, num_devices + 1), repeat=num_bins)
             if sum(choice) <= num_devices),
            default=np.inf,
        )
        assert degrees.sum() <= num_devices
        assert max(times[b, d] for b, d in enumerate(degrees)) == best


def test_megatron_cp_size_is_the_smallest_fitting_power_of_two_else_every_device():
    assert [megatron_cp_size(length, 16, 1000) for length in (1, 1000, 1001, 2000, 3990, 4100)] == [1, 1, 2, 2, 4, 8]
    assert megatron_cp_size(9000, 12, 1000) == 12  # 16 > 12 devices: the whole DP x CP domain


def test_a_sequential_group_pays_every_sample_as_its_own_step():
    lengths = [1000, 3000, 500]
    expected = sum(
        COST.overhead_s + (COST.attention_s_per_token2 * p * p + COST.linear_s_per_token * p) / 4
        + 3 * (1 - COST.comm_overlap) * (COST.ring_step_latency_s + COST.kv_bytes_per_token * p / 4
                                         / COST.intra_node_bytes_per_s)
        for p in (1000, 3000, 504)
    )
    assert sequential_group_time(COST, lengths, 4, False) == pytest.approx(expected, rel=1e-12)
    assert sequential_group_time(COST, lengths, 4, False) > COST.group_time(lengths, 4)
    vision = dataclasses.replace(COST, vision_s_per_patch=1e-5)
    assert sequential_group_time(vision, lengths, 4, False, [4000, 0, 800]) == pytest.approx(
        expected + 1e-5 * 4800 / 4, rel=1e-12)


def test_a_paper_plan_laid_out_flat_bounds_itself_without_node_terms():
    """Found by hypothesis: degrees 10, 3, 3 do not fit nodes of 4, so the plan is laid out flat; its lower
    bound must not charge node-crossing groups either (it exceeded the plan's own time)."""
    plan = paper_plan([33, 33, 35, 487], 16, 100, COST, node_size=4)
    plan.validate()
    assert plan.node_size is None and plan.lower_bound <= plan.predicted_time
