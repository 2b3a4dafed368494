"""Cross-round rebalancing: moves keep plans valid and never make them slower; a hand-made case."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lightning_dhp.planner import CostModel, plan_batch, static_plan
from lightning_dhp.planner.assemble import PlannedGroup, build_plan
from lightning_dhp.planner.options import PlannerOptions
from lightning_dhp.planner.rebalance import rebalance, rebalance_plan

COST = CostModel.default()


def test_a_sample_moves_into_the_idle_group_of_a_round_a_long_sample_sets():
    # round 0: a long sample on 2 devices (slow) beside a short one on 1 device (idle most of the round);
    # round 1: two medium samples together on 1 device. Moving one medium sample into round 0's idle
    # group shortens round 1 and leaves round 0 as long as before.
    lengths = np.array([2000, 100, 700, 600])
    rounds = [[PlannedGroup((0,), 2, 0), PlannedGroup((1,), 1, 2)], [PlannedGroup((2, 3), 1, 0)]]
    before = build_plan(rounds, lengths, 3, 1000, COST, None, 0.0)
    moved = rebalance(rounds, lengths, 1000, COST, None)
    after = build_plan(moved, lengths, 3, 1000, COST, None, 0.0)
    assert moved == [[PlannedGroup((0,), 2, 0), PlannedGroup((1, 2), 1, 2)], [PlannedGroup((3,), 1, 0)]]
    assert after.rounds[0].predicted_time == pytest.approx(before.rounds[0].predicted_time)  # 700 fits its idle time
    expected = COST.group_time([2000], 2) + COST.group_time([600], 1)
    assert after.predicted_time == pytest.approx(expected, rel=1e-12) and after.predicted_time < before.predicted_time


@settings(max_examples=40, deadline=None)
@given(
    lengths=st.lists(st.integers(1, 6000), min_size=2, max_size=60),
    num_devices=st.sampled_from([2, 4, 6, 8]),
    node_size=st.sampled_from([None, 2, 4]),
    static_degree=st.sampled_from([None, 1, 2]),
)
def test_rebalanced_plans_stay_valid_and_never_get_slower(lengths, num_devices, node_size, static_degree):
    capacity = 2048
    lengths = [min(length, num_devices * capacity - 2 * num_devices) for length in lengths]  # every sample fits
    if static_degree is None:
        plan = plan_batch(lengths, num_devices, capacity, COST, node_size=node_size)
    else:
        lengths = [min(length, static_degree * capacity - 2 * static_degree) for length in lengths]
        plan = static_plan(lengths, num_devices, capacity, static_degree, COST, node_size=node_size)
    moved = rebalance_plan(plan, np.array(lengths, dtype=np.int64), COST)
    moved.validate()
    assert moved.predicted_time <= plan.predicted_time * (1 + 1e-12)
    assert moved.lengths == plan.lengths and moved.lower_bound == plan.lower_bound
    assert [len(r.groups) for r in moved.rounds] == [len(r.groups) for r in plan.rounds]  # degrees, ranks kept


def test_a_swap_brings_work_into_a_memory_full_round_where_no_move_fits():
    # attention-heavy costs: a sample's time grows with its square, so long samples are the heavy ones.
    # Round 0: one long sample on 2 devices sets the makespan; group 1 holds 900 of its 1000 tokens,
    # idle most of the round. Round 1: one group [700, 250]. No move fits any group's memory; swapping
    # the 700 with round 0's 600 fits both groups, keeps round 0 as long and shortens round 1.
    cost = CostModel(attention_s_per_token2=1e-6, linear_s_per_token=1e-5, overhead_s=0.0, ring_step_latency_s=0.0)
    lengths = np.array([1900, 600, 300, 700, 250])
    rounds = [[PlannedGroup((0,), 2, 0), PlannedGroup((1, 2), 1, 2)], [PlannedGroup((3, 4), 1, 0)]]
    swapped = [[PlannedGroup((0,), 2, 0), PlannedGroup((2, 3), 1, 2)], [PlannedGroup((1, 4), 1, 0)]]
    assert rebalance(rounds, lengths, 1000, cost, None) == swapped
    before = build_plan(rounds, lengths, 3, 1000, cost, None, 0.0)
    after = build_plan(swapped, lengths, 3, 1000, cost, None, 0.0)
    assert after.rounds[0].predicted_time == pytest.approx(before.rounds[0].predicted_time)
    assert after.rounds[1].predicted_time == pytest.approx(cost.group_time([600, 250], 1), rel=1e-12)
    assert after.rounds[1].predicted_time < before.rounds[1].predicted_time
    moves_only = PlannerOptions(rebalance_swaps=False)
    assert rebalance(rounds, lengths, 1000, cost, None, options=moves_only) == rounds  # moves alone find nothing
