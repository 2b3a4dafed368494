"""The vision tower's memory budget (``vision_patches_per_device``): a group of degree d holds at most
d x the budget of vision patches in every planner, samples get the degree their patches need, samples no
group can hold are named, and without a budget every plan is what it was."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lightning_dhp.planner import CostModel, Group, Plan, PlanError, Round, divisors, plan_batch, static_plan
from lightning_dhp.planner.inputs import min_degrees
from lightning_dhp.simulate import LengthSource, SimulationConfig, main, simulate_device_count
from tests.test_planner import min_degree, padded
from tests.test_planner_vision import PLANNERS, TEXT_ONLY_DIGESTS_SHA256, random_batches

VISION = dataclasses.replace(CostModel.default(), vision_s_per_patch=1e-5)
PROPERTY_SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def check_budgets(
    plan: Plan, lengths: list[int], patches: list[int], capacity: int, budget: int, node_size: int | None = None
) -> None:
    """Every sample once, every group within both budgets at its degree, every sample at least at the
    degree its patches need; recomputed from scratch, then :meth:`Plan.validate`."""
    assert plan.vision_patches_per_device == budget
    seen = []
    for round_ in plan.rounds:
        for group in round_.groups:
            seen.extend(group.samples)
            assert sum(padded(lengths[i], group.degree) for i in group.samples) <= group.degree * capacity
            assert sum(patches[i] for i in group.samples) <= group.degree * budget, (group, budget)
            assert all(group.degree >= math.ceil(patches[i] / budget) for i in group.samples)
    assert sorted(seen) == list(range(len(lengths)))
    if node_size is not None and plan.node_size is None:
        # dhp-paper laid a round that fits no node-aware placement out flat and timed it without nodes,
        # which can come below the node-aware lower bound (so it does without a vision budget)
        plan = dataclasses.replace(plan, lower_bound=0.0)
    plan.validate()


def first_refused(lengths: list[int], patches: list[int], num_devices: int, capacity: int, budget: int):
    """(index, message start) of the first sample no degree up to ``num_devices`` holds (scanned), or None."""
    for index, (length, count) in enumerate(zip(lengths, patches, strict=True)):
        degrees = range(1, num_devices + 1)
        if not any(padded(length, d) <= d * capacity and count <= d * budget for d in degrees):
            if min_degree(length, capacity, num_devices) is None:
                return index, rf"sample {index} has length {length} tokens and cannot fit even on all"
            return index, rf"sample {index} has {count} vision patches and cannot fit even on all"
    return None


# Capacities of the planners' property tests: with at most 40 samples no degree-1 bin holds more than a quarter
# of a device's tokens in 1-2 token samples, which pad to 2 tokens per rank at any higher degree (the degree
# tables assume a bin that fits at degree 1 fits at every higher one)
PLANNER_CAPACITIES = (256, 1000, 4096)


@st.composite
def vision_batches(draw, capacities: tuple[int, ...] = PLANNER_CAPACITIES):
    """(lengths, patches, num_devices, tokens_per_device, vision_patches_per_device, node_size): lengths fitting
    the devices by tokens, patches from none to several devices' budget, budgets that bind or refuse."""
    num_devices = draw(st.integers(1, 16))
    capacity = draw(st.sampled_from(capacities))
    longest = capacity if num_devices == 1 else max(1, num_devices * capacity - 2 * num_devices)
    lengths = draw(st.lists(st.integers(1, longest), min_size=1, max_size=40))
    budget = draw(st.sampled_from([1, 7, 256, 1000, 5000]))
    per_sample = st.one_of(st.just(0), st.integers(0, 3 * budget), st.integers(0, (num_devices + 1) * budget))
    patches = draw(st.lists(per_sample, min_size=len(lengths), max_size=len(lengths)))
    node_size = draw(st.sampled_from([None, 2, 4]))
    return lengths, patches, num_devices, capacity, budget, node_size


@pytest.mark.parametrize("planner", sorted(PLANNERS))
@PROPERTY_SETTINGS
@given(batch=vision_batches(), cost=st.sampled_from([CostModel.default(), VISION]))
def test_no_group_of_any_plan_exceeds_the_vision_budget_or_the_sample_is_named(planner, batch, cost):
    lengths, patches, num_devices, capacity, budget, node_size = batch
    arguments = (lengths, num_devices, capacity, cost)
    options = {"node_size": node_size, "vision_patches": patches, "vision_patches_per_device": budget}
    refused = first_refused(lengths, patches, num_devices, capacity, budget)
    if refused is not None:
        with pytest.raises(PlanError, match=refused[1]):
            PLANNERS[planner](*arguments, **options)
        return
    check_budgets(PLANNERS[planner](*arguments, **options), lengths, patches, capacity, budget, node_size)


@PROPERTY_SETTINGS
@given(batch=vision_batches((1, 3, 64, 1000, 4096)), choice=st.integers(0, 10**6),
       cost=st.sampled_from([CostModel.default(), VISION]))
def test_static_plans_keep_to_the_vision_budget_at_their_degree_or_name_the_sample(batch, choice, cost):
    lengths, patches, num_devices, capacity, budget, _ = batch
    degree = divisors(num_devices)[choice % len(divisors(num_devices))]
    arguments = (lengths, num_devices, capacity, degree, cost)
    options = {"vision_patches": patches, "vision_patches_per_device": budget}
    refused = first_refused(lengths, patches, num_devices, capacity, budget)
    if refused is not None:
        with pytest.raises(PlanError, match=refused[1]):
            static_plan(*arguments, **options)
        return
    over = [i for i, (length, count) in enumerate(zip(lengths, patches, strict=True))
            if padded(length, degree) > degree * capacity or count > degree * budget]
    if over:
        with pytest.raises(PlanError, match=rf"sample {over[0]} has .* per device at degree {degree}, over"):
            static_plan(*arguments, **options)
        return
    plan = static_plan(*arguments, **options)
    check_budgets(plan, lengths, patches, capacity, budget)
    assert {group.degree for round_ in plan.rounds for group in round_.groups} == {degree}


@pytest.mark.parametrize("planner", sorted(PLANNERS))
@pytest.mark.parametrize(("num_devices", "node_size"), [(8, None), (12, 4)])
def test_a_sample_whose_patches_need_more_devices_than_its_tokens_gets_at_least_that_degree(
    planner, num_devices, node_size
):
    # sample 0: the shortest, 1 device by its tokens, 7 by its patches; the others keep the devices busy
    lengths, patches = [1000] + [3000] * 7, [50000] + [0] * 7
    blind = PLANNERS[planner](lengths, num_devices, 4096, node_size=node_size, vision_patches=patches)
    budgeted = PLANNERS[planner](lengths, num_devices, 4096, node_size=node_size, vision_patches=patches,
                                 vision_patches_per_device=8000)
    (blind_group,) = [g for r in blind.rounds for g in r.groups if 0 in g.samples]
    (group,) = [g for r in budgeted.rounds for g in r.groups if 0 in g.samples]
    assert blind_group.degree < 7 <= group.degree
    check_budgets(budgeted, lengths, patches, 4096, 8000)


@pytest.mark.parametrize("planner", [*sorted(PLANNERS), "static"])
def test_two_samples_that_share_a_group_by_tokens_but_not_by_patches_are_split(planner):
    def plan(**options) -> Plan:
        if planner == "static":
            return static_plan([3000, 3000], 1, 8192, 1, **options)
        return PLANNERS[planner]([3000, 3000], 1, 8192, **options)

    together = plan(vision_patches=[6000, 6000])
    assert [group.samples for round_ in together.rounds for group in round_.groups] == [(0, 1)]
    apart = plan(vision_patches=[6000, 6000], vision_patches_per_device=8000)
    assert sorted(group.samples for round_ in apart.rounds for group in round_.groups) == [(0,), (1,)]
    assert len(apart.rounds) == 2


def test_patches_that_overflow_the_devices_together_take_more_rounds():
    lengths, patches = [100] * 8, [3000] * 8  # 24000 patches on 4 devices of 4000: 2 rounds at least
    plan = plan_batch(lengths, 4, 4096, vision_patches=patches, vision_patches_per_device=4000)
    assert len(plan.rounds) >= 2
    check_budgets(plan, lengths, patches, 4096, 4000)


@pytest.mark.parametrize("planner", [*sorted(PLANNERS), "static"])
def test_a_sample_too_many_patches_for_all_devices_names_index_patches_budget_and_both_fixes(planner):
    def plan(num_devices: int, budget: int) -> Plan:
        options = {"vision_patches": [0, 9000, 40], "vision_patches_per_device": budget}
        if planner == "static":
            return static_plan([100, 200, 50], num_devices, 2000, num_devices, **options)
        return PLANNERS[planner]([100, 200, 50], num_devices, 2000, **options)

    with pytest.raises(PlanError) as error:
        plan(4, 2000)
    message = str(error.value)
    for part in (
        "sample 1 has 9000 vision patches and cannot fit even on all num_devices=4 devices",
        "it needs 5 devices at vision_patches_per_device=2000",
        "raise vision_patches_per_device to >= 2250",
        "use >= 5 devices",
    ):
        assert part in message
    plan(4, 2250).validate()  # the suggested budget is enough ...
    plan(5, 2000).validate()  # ... and so is the suggested device count
    with pytest.raises(PlanError):
        plan(4, 2249)


@pytest.mark.parametrize("planner", [*sorted(PLANNERS), "static"])
def test_at_one_token_per_device_a_sample_whose_patches_need_two_devices_is_refused(planner):
    # one token pads to 2 per rank at any degree above 1, so no group of several devices holds it
    options = {"vision_patches": [5, 0], "vision_patches_per_device": 4}
    with pytest.raises(PlanError, match=r"sample 0 has 5 vision patches and cannot fit even on all num_devices=4 "
                       r"devices \(tokens_per_device=1 keeps every sample on one device, where its patches need "
                       r"vision_patches_per_device >= 5\); raise vision_patches_per_device to >= 5 or "
                       r"tokens_per_device to >= 2"):
        if planner == "static":
            static_plan([1, 1], 4, 1, 1, **options)
        else:
            PLANNERS[planner]([1, 1], 4, 1, **options)
    assert min_degrees(np.array([1, 1]), 1, np.array([4, 0]), 4).tolist() == [1, 1]  # 4 patches: one device


def test_a_static_degree_too_small_for_a_samples_patches_names_it_and_the_degrees_that_hold_it():
    with pytest.raises(
        PlanError,
        match=r"sample 1 has 9000 vision patches and needs 4500 vision patches per device at degree 2, over "
        r"vision_patches_per_device=2000; use a degree in \[8\] or raise vision_patches_per_device to >= 4500",
    ):
        static_plan([100, 200], 8, 2000, 2, vision_patches=[0, 9000], vision_patches_per_device=2000)


@pytest.mark.parametrize("planner", [*sorted(PLANNERS), "static"])
@pytest.mark.parametrize("budget", [0, -3, 2.5, True, "8"])
def test_a_bad_vision_budget_is_named(planner, budget):
    plan = (lambda *args, **kwargs: static_plan(*args[:3], 1, **kwargs)) if planner == "static" else PLANNERS[planner]
    with pytest.raises(PlanError, match=rf"vision_patches_per_device={budget!r} must be an integer >= 1"):
        plan([100, 200], 4, 4096, vision_patches=[10, 0], vision_patches_per_device=budget)


def test_an_explicit_none_budget_gives_the_pinned_text_only_digests():
    digests = []
    for lengths, num_devices, capacity, node_size in random_batches(200, seed=2024):
        for planner in PLANNERS.values():
            digests.append(planner(lengths, num_devices, capacity, CostModel.default(), node_size=node_size,
                                   vision_patches_per_device=None).digest())
        digests.append(static_plan(lengths, num_devices, capacity, num_devices, CostModel.default(),
                                   vision_patches_per_device=None).digest())
    assert hashlib.sha256("".join(digests).encode()).hexdigest() == TEXT_ONLY_DIGESTS_SHA256


@pytest.mark.parametrize("planner", [*sorted(PLANNERS), "static"])
def test_a_budget_that_never_binds_changes_no_plan_only_the_digest(planner):
    rng = np.random.default_rng(9)
    for lengths, num_devices, capacity, node_size in random_batches(30, seed=31):
        patches = np.where(rng.random(len(lengths)) < 0.5, 3 * lengths, 0)
        loose = int(patches.sum()) + 1  # every group of any degree holds every patch of the batch
        options = {"node_size": node_size, "vision_patches": patches}
        if planner == "static":
            free = static_plan(lengths, num_devices, capacity, num_devices, VISION, vision_patches=patches)
            budgeted = static_plan(lengths, num_devices, capacity, num_devices, VISION, vision_patches=patches,
                                   vision_patches_per_device=loose)
        else:
            free = PLANNERS[planner](lengths, num_devices, capacity, VISION, **options)
            budgeted = PLANNERS[planner](lengths, num_devices, capacity, VISION, vision_patches_per_device=loose,
                                         **options)
        assert budgeted.rounds == free.rounds and budgeted.predicted_time == free.predicted_time
        assert budgeted.digest() != free.digest()
        assert dataclasses.replace(budgeted, vision_patches_per_device=None).digest() == free.digest()


def test_validate_names_a_group_over_the_vision_budget_and_summary_states_the_budget():
    groups = (Group((0, 1, 2), (1,), 0.5, 2), Group((3,), (0, 2), 0.25, 7))
    plan = Plan((Round(groups),), (3, 5, 4), 4, 8, 0.5, 0.4, vision_patches=(4, 24, 4), vision_patches_per_device=8)
    plan.validate()  # 24 patches on 3 ranks and 8 on 1: exactly full
    over = dataclasses.replace(plan, vision_patches=(5, 24, 4))
    with pytest.raises(PlanError, match=r"round 0 group at ranks \(3,\) holds 9 vision patches, over 1 x "
                       r"vision_patches_per_device=8"):
        over.validate()
    dataclasses.replace(over, vision_patches_per_device=None).validate()  # no budget, nothing to break
    assert plan.summary().startswith("Plan: 3 samples (12 tokens, 32 vision patches) on 4 devices x 8 tokens "
                                     "and 8 vision patches, 1 round(s)")


def test_the_simulator_plans_every_policy_within_the_vision_budget(monkeypatch):
    from lightning_dhp.simulate import policies, replay

    budget, planned = 3000, []

    def checked(planner):
        def plan(*args, **kwargs):
            result = planner(*args, **kwargs)
            if kwargs.get("vision_patches") is not None:  # the vision-blind plan does not see the patches
                assert result.vision_patches_per_device == budget
                result.validate()
                planned.append(result)
            return result
        return plan

    for module, name in ((policies, "plan_batch"), (policies, "paper_plan"), (policies, "megatron_dcp_plan"),
                         (replay, "static_plan")):
        monkeypatch.setattr(module, name, checked(getattr(module, name)))
    rng = np.random.default_rng(4)
    lengths = rng.integers(100, 6000, size=64)
    source = LengthSource("mix", "test", lengths, np.where(rng.random(64) < 0.5, 4 * lengths, 0))
    config = SimulationConfig(devices=(8,), samples_per_device=4, tokens_per_device=8192,
                              vision_patches_per_device=budget, node_size=4, steps=2, pool_size=8)
    row = simulate_device_count(source, 8, config, VISION)
    # ring-8 is the only static degree that holds the sample with the most patches (4 x 5999 > 4 x 3000)
    assert [policy for policy in row.step_time_s if policy.startswith("ring-")] == ["ring-8"]
    assert len(planned) == 2 * (3 + 1)  # steps x (three dynamic policies and ring-8)


def test_the_simulator_reports_the_vision_budget_and_refuses_one_too_small(tmp_path, capsys):
    json_path = tmp_path / "result.json"
    main(["--preset", "qwen2.5-vl-7b-vision-h100", "--dist", "activitynet+mooncake", "--devices", "32",
          "--steps", "1", "--samples-per-device", "2", "--vision-patches-per-device", "16384",
          "--json", str(json_path)])
    assert "16384 tokens per device; 16384 vision patches per device; 8 devices per node" in capsys.readouterr().out
    assert json.loads(json_path.read_text())["config"]["vision_patches_per_device"] == 16384
    with pytest.raises(SystemExit) as exit_info:
        main(["--preset", "qwen2.5-vl-7b-vision-h100", "--dist", "activitynet+mooncake", "--devices", "8",
              "--steps", "1", "--vision-patches-per-device", "16384"])
    assert exit_info.value.code == 2
    assert ("its sample with the most vision patches (249600) needs a power-of-two degree >= 16 dividing --devices 8 "
            "at --vision-patches-per-device 16384") in capsys.readouterr().err
