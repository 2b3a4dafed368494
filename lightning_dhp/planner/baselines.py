"""Static baselines on the same cost model: Megatron-style ring CP with one fixed degree."""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence

import numpy as np

from lightning_dhp.planner.assemble import PlannedGroup, group_times
from lightning_dhp.planner.cost_model import CostModel, padded_lengths
from lightning_dhp.planner.inputs import check_inputs, divisors, refuse_over_degree
from lightning_dhp.planner.memory import vision_budget
from lightning_dhp.planner.plan import Plan, PlanError
from lightning_dhp.planner.problem import Problem, batch_problem
from lightning_dhp.planner.rounds import balanced_assignment, minimum_rounds


def static_slots(
    lengths: np.ndarray,
    num_devices: int,
    tokens_per_device: int,
    degree: int,
    cost: CostModel,
    extra_rounds: int = 0,
    patches: np.ndarray | None = None,
    vision_patches_per_device: int | None = None,
) -> list[list[list[int]]]:
    """Per round, the members of its ``num_devices // degree`` groups of ``degree`` (checked inputs;
    ``patches``: vision patches per sample or None, ``vision_patches_per_device``: their budget or None):
    samples heaviest first to the least-loaded group slot with memory left over all rounds at once, over
    the fewest rounds that hold them plus ``extra_rounds``."""
    groups_per_round = num_devices // degree
    padded = padded_lengths(lengths, degree)
    work = cost.sample_costs(lengths, degree, patches=patches)
    num_rounds = minimum_rounds(padded, num_devices, tokens_per_device, patches, vision_patches_per_device)
    num_rounds += extra_rounds
    while (
        slots := balanced_assignment(work, padded, num_rounds * groups_per_round, degree, tokens_per_device, patches,
                                     vision_patches_per_device)
    ) is None:
        num_rounds += 1
    return [slots[index * groups_per_round : (index + 1) * groups_per_round] for index in range(num_rounds)]


def static_plan(
    lengths: Sequence[int] | np.ndarray,
    num_devices: int,
    tokens_per_device: int,
    degree: int,
    cost_model: CostModel | None = None,
    *,
    node_size: int | None = None,
    vision_patches: Sequence[int] | np.ndarray | None = None,
    vision_patches_per_device: int | None = None,
) -> Plan:
    """Every group has exactly ``degree`` ranks (``num_devices / degree`` groups per round).

    Samples go heaviest first (vision work included, ``vision_patches`` per sample as in
    :func:`~lightning_dhp.planner.plan_batch`) to the least-loaded group slot with memory left (tokens,
    and vision patches under ``vision_patches_per_device``), over the fewest rounds that hold them.
    ``degree`` must divide ``num_devices`` (and ``node_size`` when it is smaller, so that no group that
    fits in a node crosses one), and hold every sample.
    """
    lengths_array, num_devices, tokens_per_device, node_size, patches, vision_patches_per_device = check_inputs(
        lengths, num_devices, tokens_per_device, node_size, vision_patches, vision_patches_per_device
    )
    degree = _checked_degree(degree, num_devices, node_size)
    batch = batch_problem(lengths_array, num_devices, tokens_per_device, cost_model or CostModel.default(), node_size,
                          patches, vision_patches_per_device)
    return batch.plan(static_groups(checked_static_slots(batch, degree), degree))


def checked_static_slots(batch: Problem, degree: int) -> list[list[list[int]]]:
    """:func:`static_slots` of a batch problem at ``degree``, after :func:`static_plan`'s checks (a PlanError
    names what is wrong): the planner times them (:func:`static_time`) and builds only the fastest degree's
    plan."""
    degree = _checked_degree(degree, batch.num_devices, batch.node_size)
    _check_degree_holds_every_sample(batch.lengths, batch.patches, degree, batch.tokens_per_device,
                                     batch.vision_patches_per_device, batch.min_degree, divisors(batch.num_devices))
    return static_slots(batch.lengths, batch.num_devices, batch.tokens_per_device, degree, batch.cost,
                        patches=batch.patches, vision_patches_per_device=batch.vision_patches_per_device)


def static_groups(slots: list[list[list[int]]], degree: int) -> list[list[PlannedGroup]]:
    """Per round, its slots as groups (slot ``p`` on the ranks from ``p x degree``), empty ones left out."""
    rounds = [
        [PlannedGroup(tuple(sorted(members)), degree, position * degree) for position, members in enumerate(groups)
         if members]
        for groups in slots
    ]
    return [planned for planned in rounds if planned]


def static_time(batch: Problem, slots: list[list[list[int]]], degree: int) -> float:
    """The predicted time of :func:`static_groups`'s plan (the same float as ``batch.plan(...)``'s, from the
    same group times in the same order), without making its groups or plan: at 8192 samples that was half
    the cost of a static layout, and only the fastest one's plan may be used."""
    sizes: list[int] = []
    first: list[int] = []
    groups_per_round: list[int] = []
    for groups in slots:
        held = [position for position, members in enumerate(groups) if members]
        sizes += [len(groups[position]) for position in held]
        first += [position * degree for position in held]
        if held:
            groups_per_round.append(len(held))
    owner = np.repeat(np.arange(len(sizes)), sizes)
    members = np.fromiter(itertools.chain.from_iterable(itertools.chain.from_iterable(slots)), dtype=np.int64,
                          count=len(owner))
    # each group's samples ascending, as its plan lists them: one sort of (group, sample) keys (owner ascends)
    group_base = owner * len(batch.lengths)
    members = np.sort(group_base + members) - group_base
    times = group_times(members, owner, np.full(len(sizes), degree, dtype=np.int64), np.array(first, dtype=np.int64),
                        batch.lengths, batch.cost, batch.node_size, batch.patches)[0].tolist()
    ends = itertools.accumulate(groups_per_round)
    # a round takes its slowest group's time, the plan the sum of its rounds' (Round, build_plan)
    return math.fsum(max(times[end - count : end]) for count, end in zip(groups_per_round, ends, strict=True))


def _checked_degree(degree: int, num_devices: int, node_size: int | None) -> int:
    """``degree`` as an int, or a PlanError when it does not divide ``num_devices`` (or ``node_size`` when it
    is smaller, so that no group that fits in a node crosses one), naming the degrees that would."""
    valid = divisors(num_devices)
    if isinstance(degree, bool) or not isinstance(degree, int | np.integer) or degree not in valid:
        raise PlanError(f"degree={degree!r} does not divide num_devices={num_devices}; use one of {valid}")
    degree = int(degree)
    if node_size is not None and degree < node_size and node_size % degree:
        raise PlanError(
            f"degree={degree} does not divide node_size={node_size}, so some group would cross a node; "
            f"use one of {[d for d in valid if d >= node_size or node_size % d == 0]}"
        )
    return degree


def _check_degree_holds_every_sample(
    lengths: np.ndarray,
    patches: np.ndarray | None,
    degree: int,
    tokens_per_device: int,
    vision_patches_per_device: int | None,
    min_degree: np.ndarray,
    valid: list[int],
) -> None:
    """PlanError for the first sample a group of ``degree`` cannot hold, naming the budget it breaks (its
    tokens when both do) and the ``valid`` degrees at or above its ``min_degree`` that would hold it."""
    padded = padded_lengths(lengths, degree)
    over_tokens = padded > degree * tokens_per_device
    budget = vision_budget(patches, vision_patches_per_device)
    refused = np.flatnonzero(over_tokens if budget is None else over_tokens | (patches > degree * budget))
    if refused.size == 0:
        return
    index = int(refused[0])
    fitting = [d for d in valid if d >= min_degree[index]]
    if over_tokens[index]:
        refuse_over_degree(index, f"length {int(lengths[index])} tokens", degree, "tokens_per_device",
                           tokens_per_device, -(-int(padded[index]) // degree), "tokens", fitting)
    count = int(patches[index])
    refuse_over_degree(index, f"{count} vision patches", degree, "vision_patches_per_device", budget,
                       -(-count // degree), "vision patches", fitting)
