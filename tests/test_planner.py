"""plan_batch / static_plan: every plan rule checked independently of Plan.validate, over random and
long-tailed lengths; determinism, digest stability, pickling and the Plan helpers."""

from __future__ import annotations

import gc
import math
import pickle
import subprocess
import sys

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lightning_dhp.planner import CostModel, Group, Plan, PlanError, Round, dhp, plan_batch, static_plan
from lightning_dhp.planner.allocation import bin_min_degrees
from lightning_dhp.planner.baselines import checked_static_slots, static_time
from lightning_dhp.planner.dhp import _static_bound
from lightning_dhp.planner.inputs import check_inputs
from lightning_dhp.planner.options import DEFAULT_OPTIONS
from lightning_dhp.planner.placement import PlacementFailure, place
from lightning_dhp.planner.problem import batch_problem

COST = CostModel.default()
PROPERTY_SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def padded(length: int, degree: int) -> int:
    return length if degree == 1 else math.ceil(length / (2 * degree)) * 2 * degree


def min_degree(length: int, capacity: int, limit: int) -> int | None:
    return next((d for d in range(1, limit + 1) if padded(length, d) <= d * capacity), None)


def check_rules(plan: Plan, lengths: list[int], num_devices: int, capacity: int, node_size: int | None) -> None:
    """The issue's rules, recomputed from scratch."""
    assert plan.lengths == tuple(lengths)
    seen = []
    total = 0.0
    for round_ in plan.rounds:
        used = set()
        for group in round_.groups:
            assert group.ranks == tuple(range(group.ranks[0], group.ranks[0] + group.degree))
            assert group.ranks[0] >= 0 and group.ranks[-1] < num_devices
            assert used.isdisjoint(group.ranks)
            used.update(group.ranks)
            assert group.samples, "a group without samples"
            seen.extend(group.samples)
            tokens = sum(padded(lengths[i], group.degree) for i in group.samples)
            assert tokens == group.tokens_per_rank * group.degree
            assert tokens <= group.degree * capacity
            crosses = node_size is not None and group.ranks[0] // node_size != group.ranks[-1] // node_size
            if node_size is not None and group.degree <= node_size:
                assert not crosses, f"group {group.ranks} fits in a node of {node_size} but crosses one"
            expected = COST.group_time([lengths[i] for i in group.samples], group.degree, crosses_node=crosses)
            assert group.predicted_time == pytest.approx(expected, rel=1e-12)
        total += max(group.predicted_time for group in round_.groups)
    assert sorted(seen) == list(range(len(lengths))), "every sample exactly once"
    assert plan.predicted_time == pytest.approx(total, rel=1e-12)
    assert plan.lower_bound <= plan.predicted_time * (1 + 1e-9)
    assert len(plan.rounds) >= math.ceil(sum(lengths) / (num_devices * capacity))
    plan.validate()


uniform_lengths = st.lists(st.integers(1, 6000), min_size=1, max_size=40)
long_tailed_lengths = st.lists(st.floats(0.0, 0.999).map(lambda u: int(64 / (1.0 - u) ** 1.2)), min_size=1, max_size=40)


@PROPERTY_SETTINGS
@given(
    lengths=st.one_of(uniform_lengths, long_tailed_lengths),
    num_devices=st.integers(1, 16),
    capacity=st.sampled_from([1, 2, 3, 64, 1000, 2048, 4096, 8191]),
    node_size=st.sampled_from([None, 1, 2, 3, 4, 8]),
)
def test_plan_batch_obeys_every_rule_or_names_the_sample_that_cannot_fit(lengths, num_devices, capacity, node_size):
    needs = [min_degree(length, capacity, num_devices) for length in lengths]
    if None in needs:
        index = needs.index(None)
        with pytest.raises(PlanError, match=rf"sample {index} has length {lengths[index]} tokens"):
            plan_batch(lengths, num_devices, capacity, node_size=node_size)
        return
    plan = plan_batch(lengths, num_devices, capacity, node_size=node_size)
    check_rules(plan, lengths, num_devices, capacity, node_size)


@PROPERTY_SETTINGS
@given(
    lengths=st.lists(st.integers(1, 1024), min_size=1, max_size=48),
    num_devices=st.integers(1, 12),
    node_size=st.sampled_from([None, 4]),
)
def test_a_batch_using_at_most_half_the_memory_runs_in_one_round(lengths, num_devices, node_size):
    capacity = 2048  # every sample <= capacity / 2
    if sum(lengths) > num_devices * capacity // 2:
        lengths = lengths[: max(1, num_devices)]
    plan = plan_batch(lengths, num_devices, capacity, node_size=node_size)
    assert len(plan.rounds) == 1
    check_rules(plan, lengths, num_devices, capacity, node_size)


@PROPERTY_SETTINGS
@given(
    lengths=st.one_of(uniform_lengths, long_tailed_lengths),
    exponent=st.integers(0, 3),
    capacity=st.sampled_from([2048, 8192]),
)
def test_static_plan_uses_exactly_the_given_degree(lengths, exponent, capacity):
    num_devices, degree, node_size = 8, 2**exponent, 2
    if None in [min_degree(length, capacity, num_devices) for length in lengths]:
        with pytest.raises(PlanError, match="cannot fit even on all num_devices=8"):
            static_plan(lengths, num_devices, capacity, degree, node_size=node_size)
        return
    if any(padded(length, degree) > degree * capacity for length in lengths):
        with pytest.raises(PlanError, match=f"at degree {degree}"):
            static_plan(lengths, num_devices, capacity, degree, node_size=node_size)
        return
    plan = static_plan(lengths, num_devices, capacity, degree, node_size=node_size)
    check_rules(plan, lengths, num_devices, capacity, node_size)
    assert {group.degree for round_ in plan.rounds for group in round_.groups} == {degree}


@pytest.mark.parametrize("degree", [3, 5, 6, 7])
def test_degrees_are_not_restricted_to_powers_of_two(degree):
    capacity = 1000
    lengths = [degree * capacity - 2 * degree]  # needs exactly `degree` devices
    plan = plan_batch(lengths, degree, capacity)
    assert [group.degree for group in plan.rounds[0].groups] == [degree]
    mixed_lengths = [degree * capacity - 2 * degree, 2 * capacity - 4]  # memory forces degree + 2
    mixed = plan_batch(mixed_lengths, degree + 2, capacity)
    check_rules(mixed, mixed_lengths, degree + 2, capacity, None)
    assert sorted(group.degree for group in mixed.rounds[0].groups) == sorted([degree, 2])


def test_node_size_keeps_small_groups_inside_a_node_and_large_ones_pay_inter_node_bandwidth():
    capacity = 1000
    lengths = [11 * capacity - 22, 5 * capacity - 10, 3 * capacity - 6, 400, 300]
    plan = plan_batch(lengths, 24, capacity, node_size=8)
    check_rules(plan, lengths, 24, capacity, 8)
    wide = [group for round_ in plan.rounds for group in round_.groups if group.degree > 8]
    assert wide and all(
        group.predicted_time > COST.group_time([lengths[i] for i in group.samples], group.degree) for group in wide
    )


def test_a_batch_too_large_for_one_round_uses_the_fewest_rounds_it_can():
    capacity, num_devices = 1000, 4
    lengths = [900] * 12  # 3 per round fit memory-wise only one per device: 12 / 4 = 3 rounds
    plan = plan_batch(lengths, num_devices, capacity)
    check_rules(plan, lengths, num_devices, capacity, None)
    assert len(plan.rounds) == 3


def test_planning_is_deterministic_across_processes():
    rng = np.random.default_rng(7)
    lengths = (rng.pareto(1.1, size=200) * 500 + 20).astype(int).clip(max=60000).tolist()
    plan = plan_batch(lengths, 32, 8192, node_size=8)
    again = plan_batch(list(lengths), 32, 8192, node_size=8)
    assert again == plan and again.digest() == plan.digest()
    code = (
        "import numpy as np; from lightning_dhp.planner import plan_batch;"
        "rng = np.random.default_rng(7);"
        "lengths = (rng.pareto(1.1, size=200) * 500 + 20).astype(int).clip(max=60000).tolist();"
        "print(plan_batch(lengths, 32, 8192, node_size=8).digest())"
    )
    for hash_seed in ("1", "2"):
        result = subprocess.run(
            [sys.executable, "-c", code],
            capture_output=True,
            text=True,
            check=True,
            env={"PYTHONHASHSEED": hash_seed, "PATH": ""},
        )
        assert result.stdout.strip() == plan.digest()


def hand_made_plan() -> Plan:
    groups = (
        Group(ranks=(0, 1, 2), samples=(1,), predicted_time=0.5, tokens_per_rank=2),
        Group(ranks=(3,), samples=(0, 2), predicted_time=0.25, tokens_per_rank=7),
    )
    return Plan(
        rounds=(Round(groups=groups),),
        lengths=(3, 5, 4),
        num_devices=4,
        tokens_per_device=8,
        predicted_time=0.5,
        lower_bound=0.4,
    )


def test_digest_is_pinned_and_ignores_float_times():
    plan = hand_made_plan()
    assert plan.digest() == "64d3f7b05a99e4a7eb4ac56ebe757354dc0b9ecd3b8d95a83eb914d8ba5e9df6"
    retimed = Plan(
        rounds=plan.rounds,
        lengths=plan.lengths,
        num_devices=4,
        tokens_per_device=8,
        predicted_time=0.5000001,
        lower_bound=0.1,
    )
    assert retimed.digest() == plan.digest()
    moved = Plan(
        rounds=(Round(groups=(plan.rounds[0].groups[0], Group((3,), (2, 0), 0.25, 7))),),
        lengths=plan.lengths,
        num_devices=4,
        tokens_per_device=8,
        predicted_time=0.5,
        lower_bound=0.4,
    )
    assert moved.digest() != plan.digest(), "packing order is part of the plan"


def test_plan_pickles_and_helpers_describe_it():
    lengths = [5000, 1200, 800, 300, 300, 7000]
    plan = plan_batch(lengths, 6, 2048, node_size=4)
    restored = pickle.loads(pickle.dumps(plan))
    assert restored == plan and restored.digest() == plan.digest()
    for round_index, round_ in enumerate(plan.rounds):
        for rank in range(6):
            group = plan.group_for(round_index, rank)
            owners = [g for g in round_.groups if rank in g.ranks]
            assert group == (owners[0] if owners else None)
    stats = plan.stats()
    assert stats["num_samples"] == 6 and stats["num_rounds"] == len(plan.rounds)
    assert stats["idle_device_rounds"] == 6 * len(plan.rounds) - sum(g.degree for r in plan.rounds for g in r.groups)
    assert stats["padding_tokens"] == sum(g.tokens_per_rank * g.degree for r in plan.rounds for g in r.groups) - sum(
        lengths
    )
    assert all(isinstance(value, float) for value in stats.values())
    summary = plan.summary()
    assert summary.startswith("Plan: 6 samples (14600 tokens) on 6 devices x 2048 tokens, nodes of 4")
    assert summary.count("(d=") == sum(len(r.groups) for r in plan.rounds)


def test_validate_names_each_broken_rule():
    good = hand_made_plan()
    good.validate()
    first, second = good.rounds[0].groups

    def with_groups(*groups: Group, **overrides) -> Plan:
        fields = dict(
            rounds=(Round(groups=groups),),
            lengths=good.lengths,
            num_devices=4,
            tokens_per_device=8,
            predicted_time=0.5,
            lower_bound=0.4,
        )
        fields.update(overrides)
        return Plan(**fields)

    cases = [
        (with_groups(first, Group((2, 3), (0, 2), 0.25, 4)), "overlaps another group"),
        (with_groups(first, Group((3,), (0, 1), 0.25, 8)), "sample 1 appears in round 0 and again"),
        (with_groups(first), r"samples \[0, 2\]"),
        (with_groups(first, Group((3, 5), (0, 2), 0.25, 4)), "not a contiguous rank range"),
        (with_groups(first, Group((3, 4), (0, 2), 0.25, 4)), "outside range\\(num_devices=4\\)"),
        (
            with_groups(first, Group((3,), (0, 2), 0.25, 7), tokens_per_device=6, lower_bound=0.1),
            "needs 7 tokens per rank, over tokens_per_device=6",
        ),
        (with_groups(first, Group((3,), (0, 2), 0.25, 6)), "occupy 7 padded tokens"),
        (with_groups(first, Group((3,), (0, 7), 0.25, 7)), "sample 7, outside"),
        (with_groups(Group((1, 2), (1,), 0.5, 3), second, node_size=2), "crosses nodes 0 and 1"),
        (with_groups(first, second, predicted_time=0.75), "rounds sum to 0.5"),
        (with_groups(first, second, lower_bound=0.6), "exceeds predicted_time"),
        (with_groups(first, Group((3,), (), 0.25, 0)), "holds no samples"),
    ]
    for plan, message in cases:
        with pytest.raises(PlanError, match=message):
            plan.validate()


@pytest.mark.parametrize(
    ("lengths", "num_devices", "capacity", "message"),
    [
        ([], 4, 100, "lengths is empty"),
        ([5, 0, 3], 4, 100, r"sample 1 has length 0; .*positive integer.*drop that sample or fix"),
        ([5, -3], 4, 100, "sample 1 has length -3"),
        (np.array([5, 0]), 4, 100, "sample 1 has length 0;"),
        ([5, 2.5], 4, 100, "sample 1 has length 2.5"),
        ([float("nan")], 4, 100, "sample 0 has length nan"),
        (["7"], 4, 100, "sample 0 has length '7'"),
        ([True], 4, 100, "sample 0 has length True"),
        ([2**41], 4, 100, "sample 0 has length 2199023255552, above the supported"),
        ([5], 0, 100, r"num_devices=0 must be an integer >= 1; use at least one device"),
        ([5], 2.0, 100, r"num_devices=2.0 must be an integer"),
        ([5], 4, 0, r"tokens_per_device=0 must be an integer >= 1"),
    ],
)
def test_bad_input_raises_plan_error_naming_the_item(lengths, num_devices, capacity, message):
    with pytest.raises(PlanError, match=message):
        plan_batch(lengths, num_devices, capacity)


def test_a_sample_too_long_for_all_devices_names_index_length_limits_and_both_fixes():
    lengths = [100, 9000, 50]
    with pytest.raises(PlanError) as error:
        plan_batch(lengths, 4, 2000)
    message = str(error.value)
    for part in (
        "sample 1",
        "length 9000",
        "num_devices=4",
        "tokens_per_device=2000",
        "raise tokens_per_device to >= 2250",
        "use >= 5 devices",
    ):
        assert part in message
    plan_batch(lengths, 4, 2250).validate()  # the suggested capacity is enough ...
    plan_batch(lengths, 5, 2000).validate()  # ... and so is the suggested device count
    with pytest.raises(PlanError):
        plan_batch(lengths, 4, 2249)
    with pytest.raises(PlanError, match="tokens_per_device >= 2 to be split"):
        plan_batch([1, 2], 4, 1)


def test_static_plan_rejects_a_degree_that_does_not_divide_the_devices():
    with pytest.raises(PlanError, match=r"degree=3 does not divide num_devices=8; use one of \[1, 2, 4, 8\]"):
        static_plan([100], 8, 1000, 3)
    with pytest.raises(PlanError, match=r"degree=0 does not divide"):
        static_plan([100], 8, 1000, 0)
    with pytest.raises(PlanError, match=r"degree=3 does not divide node_size=4, .* use one of \[1, 2, 4, 6, 12\]"):
        static_plan([100], 12, 1000, 3, node_size=4)
    with pytest.raises(
        PlanError,
        match=r"sample 1 has length 3000 tokens and needs 1500 tokens per device at "
        r"degree 2, over tokens_per_device=1000; use a degree in \[4, 8\]",
    ):
        static_plan([100, 3000], 8, 1000, 2)


@PROPERTY_SETTINGS
@given(
    lengths=st.one_of(uniform_lengths, long_tailed_lengths),
    exponent=st.integers(0, 4),
    degree_exponent=st.integers(0, 4),
    capacity=st.sampled_from([64, 1000, 4096]),
    node_size=st.sampled_from([None, 2, 4]),
)
def test_the_static_bound_that_skips_static_candidates_never_exceeds_their_time(
    lengths, exponent, degree_exponent, capacity, node_size
):
    num_devices, degree = 2**exponent, 2 ** min(degree_exponent, exponent)
    try:
        static = static_plan(lengths, num_devices, capacity, degree, node_size=node_size)
    except PlanError:
        return  # some sample does not fit at this degree
    bound = _static_bound(np.array(lengths, dtype=np.int64), num_devices, capacity, degree, COST, node_size)
    assert bound <= static.predicted_time * (1 + 1e-12)


@pytest.mark.parametrize("vision", [False, True])
@pytest.mark.parametrize("seed", range(6))
def test_static_time_is_the_static_plans_predicted_time(seed, vision):
    """The planner times static CP's layouts from their slots (static_time) and builds only the fastest one's
    plan: the time must be the plan's, to the last bit, or the static candidate could win or lose wrongly."""
    rng = np.random.default_rng(seed)
    num_devices, node_size = int(rng.choice([8, 16, 64])), [None, 4, 8][seed % 3]
    lengths = (rng.pareto(1.2, int(rng.integers(20, 400))) * 300 + 16).astype(np.int64)
    capacity = int(rng.choice([2048, 8192]))
    lengths = np.minimum(lengths, capacity * num_devices // 2)
    patches = rng.integers(0, 400, len(lengths)) if vision else None
    budget = int(rng.integers(400, 900)) if vision else None
    checked = check_inputs(lengths, num_devices, capacity, node_size, patches, budget)
    batch = batch_problem(*checked[:3], COST, *checked[3:])
    for degree in [2**k for k in range(num_devices.bit_length()) if 2**k >= int(batch.min_degree.max())]:
        try:
            expected = static_plan(lengths, num_devices, capacity, degree, COST, node_size=node_size,
                                   vision_patches=patches, vision_patches_per_device=budget).predicted_time
        except PlanError:
            continue  # the degree does not suit the node size
        assert static_time(batch, checked_static_slots(batch, degree), degree) == expected


def test_bin_minimum_degrees_match_a_scan_over_degrees():
    rng = np.random.default_rng(5)
    for _ in range(200):
        num_bins, capacity, limit = int(rng.integers(1, 6)), int(rng.choice([64, 1000, 4096])), int(rng.integers(4, 40))
        owner = np.sort(np.concatenate([np.arange(num_bins), rng.integers(0, num_bins, size=int(rng.integers(0, 12)))]))
        lengths = rng.integers(1, 3 * capacity, size=len(owner))  # minimum degrees <= 3 <= limit
        member_min = np.array([min_degree(int(length), capacity, 10**6) for length in lengths], dtype=np.int64)
        got = bin_min_degrees(lengths, owner, member_min, num_bins, capacity, limit)
        for bin_index in range(num_bins):
            members = lengths[owner == bin_index]
            start = int(member_min[owner == bin_index].max())
            fitting = (d for d in range(start, limit + 1) if sum(padded(int(x), d) for x in members) <= d * capacity)
            assert got[bin_index] == next(fitting, limit + 1)


def test_planning_restores_the_garbage_collector_state():
    assert gc.isenabled()
    plan_batch([5, 9, 700], 4, 512)
    assert gc.isenabled()
    with pytest.raises(PlanError):
        plan_batch([5, 10**6], 2, 512)
    assert gc.isenabled()
    gc.disable()
    try:
        plan_batch([5, 9, 700], 4, 512)
        assert not gc.isenabled()
    finally:
        gc.enable()


def test_node_aware_allocation_narrows_the_widest_group_when_nodes_fragment():
    """Degrees 2, 5, 1 leave no whole node for the third bin's minimum of 2: the widest group gives a rank up."""
    from lightning_dhp.planner.dhp import _allocate_and_place
    from lightning_dhp.planner.inputs import min_degrees
    from lightning_dhp.planner.problem import Problem

    lengths = np.array([1984, 2173, 1338])
    problem = Problem(lengths, min_degrees(lengths, 1000), 8, 1000, CostModel.default(), 4, 0.0, 3)
    degrees, starts, _ = _allocate_and_place(problem, [[0], [1], [2]])
    assert degrees.tolist() == [2, 4, 2]
    placed = zip(degrees.tolist(), starts, strict=True)
    ranks = [rank for degree, start in placed for rank in range(start, start + degree)]
    assert sorted(ranks) == list(range(8))  # disjoint, all inside the 8 devices
    for degree, start in zip(degrees.tolist(), starts, strict=True):
        assert start // 4 == (start + degree - 1) // 4  # inside one node


@settings(max_examples=25, deadline=None)
@given(lengths=st.lists(st.integers(1, 3000), min_size=2, max_size=12), seed=st.integers(0, 2**16))
def test_a_remembered_allocation_answers_for_the_same_bins_in_any_order(lengths, seed):
    """Allocations are remembered per set of bins; asking with the bins reordered (and members shuffled)
    returns the same degree, first rank and time for every bin, mapped back to the caller's order."""
    from lightning_dhp.planner.dhp import _allocate_and_place
    from lightning_dhp.planner.inputs import min_degrees
    from lightning_dhp.planner.problem import Problem

    lengths = np.array(lengths)
    rng = np.random.default_rng(seed)
    bins = [list(part) for part in np.array_split(rng.permutation(len(lengths)), min(4, len(lengths))) if len(part)]
    problem = Problem(lengths, min_degrees(lengths, 1000), 8, 1000, CostModel.default(), 4, 0.0, len(lengths))
    first = _allocate_and_place(problem, bins)
    order = rng.permutation(len(bins)).tolist()
    again = _allocate_and_place(problem, [list(rng.permutation(bins[index])) for index in order])
    assert (first is None) == (again is None)
    if first is not None:
        for position, index in enumerate(order):
            assert again[0][position] == first[0][index]
            assert again[1][position] == first[1][index]
            assert again[2][position] == first[2][index]


def _large_batch(kind: str, seed: int) -> tuple[np.ndarray, int, int]:
    """(lengths, devices, tokens per device) of a batch past ``cross_round_max_samples``: memory-full (static CP
    packs full rounds best) or a few long samples among short ones."""
    rng = np.random.default_rng(seed)
    samples, num_devices, capacity = int(rng.integers(2049, 2400)), int(rng.choice([16, 32, 64])), 4096
    assert samples > DEFAULT_OPTIONS.cross_round_max_samples
    if kind == "memory-full":
        return rng.integers(capacity // 2, capacity + 1, samples), num_devices, capacity
    lengths = rng.integers(1, capacity // 4 + 2, samples)
    lengths[: samples // 8] = rng.integers(capacity, 3 * capacity, samples // 8)
    return lengths, num_devices, capacity


def _large_problem(kind: str, seed: int):
    lengths, num_devices, capacity = _large_batch(kind, seed)
    checked = check_inputs(lengths, num_devices, capacity, 8, None, None)
    return batch_problem(*checked[:3], COST, *checked[3:])


def _static_first_plan(kind: str, seed: int) -> tuple[Plan, bool]:
    """What plan_batch picked past cross_round_max_samples when static CP was laid out first (the pruning
    incumbent of the fewest-rounds assignment), and whether that assignment was pruned."""
    batch = _large_problem(kind, seed)
    static = dhp._best_static(batch, dhp._static_bounds(batch))
    limit = static.predicted_time * (1 + batch.options.prune_margin) if static is not None else math.inf
    fewest = dhp._fewest_rounds_plan(batch, lambda time: time > limit)
    candidates = [candidate for candidate in (fewest, static) if candidate is not None]
    return dhp._as_plan(batch, min(candidates, key=lambda candidate: candidate.predicted_time)), fewest is None


@pytest.mark.parametrize(
    ("kind", "seed", "static_laid_out"),
    [("memory-full", 1, "to prune"), ("few long", 1, "after the plan"), ("few long", 2, "never")],
)
def test_large_batches_lay_out_static_cp_only_when_it_could_matter_and_pick_the_same_plan(
    kind, seed, static_laid_out, monkeypatch
):
    """Past ``cross_round_max_samples`` static CP's layouts wait until the fewest-rounds assignment could be
    pruned by them, or until it is planned and some layout's bound beats it: same plan as laying them out
    first, whether static CP prunes the assignment, wins after it or cannot win."""
    expected, pruned = _static_first_plan(kind, seed)
    incumbents, fewest_plans = [], []
    best_static, fewest_rounds_plan = dhp._best_static, dhp._fewest_rounds_plan
    monkeypatch.setattr(dhp, "_best_static", lambda batch, bounds, incumbent=math.inf: (
        incumbents.append(incumbent), best_static(batch, bounds, incumbent))[1])
    monkeypatch.setattr(dhp, "_fewest_rounds_plan", lambda batch, prunes: (
        fewest_plans.append(fewest_rounds_plan(batch, prunes)), fewest_plans[-1])[1])
    lengths, num_devices, capacity = _large_batch(kind, seed)
    plan = plan_batch(lengths, num_devices, capacity, node_size=8)
    assert plan.digest() == expected.digest()
    assert pruned == (fewest_plans == [None]) == (static_laid_out == "to prune")  # pruned where it was
    assert (incumbents == [math.inf]) == (static_laid_out == "to prune")
    if static_laid_out != "to prune":  # laid out after the plan, with its time to beat: used or not
        static_won = plan.predicted_time < incumbents[0]
        assert static_won == (static_laid_out == "after the plan")


def test_pending_static_prunes_as_the_best_layout_would_and_lays_it_out_only_past_the_least_bound():
    batch = _large_problem("few long", 1)
    pending = dhp._PendingStatic(batch)
    static = dhp._best_static(batch, dhp._static_bounds(batch))
    margin = 1 + batch.options.prune_margin
    least, limit = pending.least_bound * margin, static.predicted_time * margin
    assert least < limit  # the layout is slower than its bound: the times between tell a bound from a layout
    assert not pending.prunes(least * (1 - 1e-6)) and not pending.laid_out
    assert not pending.prunes((least + limit) / 2) and pending.laid_out
    assert pending.prunes(limit * (1 + 1e-6)) and not pending.prunes(limit)


def place_oracle(degrees, num_devices, node_size):
    """Groups widest first (the lower index on ties): those wider than a node side by side from rank 0, then each
    other one at the first rank of the narrowest free range inside a node that holds it (the lowest on ties)."""
    order = sorted(range(len(degrees)), key=lambda index: (-degrees[index], index))
    starts, cursor = [0] * len(degrees), 0
    wide = [index for index in order if degrees[index] > node_size]
    for index in wide:
        starts[index], cursor = cursor, cursor + degrees[index]
    if cursor > num_devices:
        return PlacementFailure(wide[-1], 0)
    ranges = [(max(node, cursor), min(node + node_size, num_devices)) for node in range(0, num_devices, node_size)]
    ranges = [(start, end) for start, end in ranges if start < end]
    for index in order[len(wide):]:
        fitting = [(end - start, start, end) for start, end in ranges if end - start >= degrees[index]]
        if not fitting:
            return PlacementFailure(index, max((end - start for start, end in ranges), default=0))
        _, start, end = min(fitting)
        ranges.remove((start, end))
        ranges.append((start + degrees[index], end))
        starts[index] = start
    return starts


@pytest.mark.parametrize("seed", range(40))
def test_place_matches_best_fit_one_group_at_a_time(seed):
    """Placement (groups of one rank laid out range by range) as best fit decreasing places them one at a time,
    failures included, over node sizes that do and do not divide the devices."""
    rng = np.random.default_rng(seed)
    node_size = int(rng.choice([2, 4, 8]))
    num_devices = int(rng.integers(1, 80))
    count = int(rng.integers(1, 60))
    degrees = np.where(rng.random(count) < 0.6, 1, rng.integers(1, 2 * node_size + 2, count)).tolist()
    while sum(degrees) > num_devices:  # they fit in total (placement may still fail) ...
        degrees.pop()
    degrees += [1] * (seed % 4 == 0) * int(rng.integers(1, 4))  # ... or a few ranks too many
    assert place(degrees, num_devices, node_size) == place_oracle(degrees, num_devices, node_size)
