"""Turning planned groups (sample indices, degree, first rank) into a timed :class:`Plan`."""

from __future__ import annotations

import itertools
import math
from typing import NamedTuple

import numpy as np

from lightning_dhp.planner.cost_model import CostModel, padded_lengths
from lightning_dhp.planner.plan import Group, Plan, Round


class PlannedGroup(NamedTuple):
    """A group before it becomes a :class:`Group`: global sample indices, degree, first rank (a named tuple:
    thousands are made per plan at scale, in half a frozen dataclass's time)."""

    samples: tuple[int, ...]
    degree: int
    first_rank: int


def build_plan(
    rounds: list[list[PlannedGroup]],
    lengths: np.ndarray,
    num_devices: int,
    tokens_per_device: int,
    cost: CostModel,
    node_size: int | None,
    bound: float,
    patches: np.ndarray | None = None,
    vision_patches_per_device: int | None = None,
) -> Plan:
    """Turn planned groups into a :class:`Plan`, timing every group with the cost model (``patches``:
    each sample's vision patches, None: none; ``vision_patches_per_device``: the vision budget the groups
    respect, None: none)."""
    ordered = [sorted(planned, key=lambda planned_group: planned_group.first_rank) for planned in rounds]
    flat = [group for planned in ordered for group in planned]
    degrees = np.array([group.degree for group in flat], dtype=np.int64)
    first = np.array([group.first_rank for group in flat], dtype=np.int64)
    counts = [len(group.samples) for group in flat]
    owner = np.repeat(np.arange(len(flat)), counts)
    members = np.fromiter(itertools.chain.from_iterable(group.samples for group in flat), dtype=np.int64,
                          count=sum(counts))
    times, sum_padded = group_times(members, owner, degrees, first, lengths, cost, node_size, patches)
    # thousands of groups at scale: their ranks are slices of one tuple, their numbers one list each
    every_rank = tuple(range(num_devices))
    tokens_per_rank = (sum_padded.astype(np.int64) // degrees).tolist()
    groups = [
        Group(
            every_rank[start:end] if (end := start + group.degree) <= num_devices else tuple(range(start, end)),
            group.samples,
            time,
            tokens,
        )
        for group, start, time, tokens in zip(flat, first.tolist(), times.tolist(), tokens_per_rank, strict=True)
    ]
    ends = list(itertools.accumulate(map(len, ordered)))
    plan_rounds = [Round(groups=tuple(groups[end - len(planned) : end]))
                   for planned, end in zip(ordered, ends, strict=True)]
    predicted = math.fsum(round_.predicted_time for round_ in plan_rounds)
    return Plan(
        rounds=tuple(plan_rounds),
        lengths=tuple(lengths.astype(np.int64, copy=False).tolist()),
        num_devices=num_devices,
        tokens_per_device=tokens_per_device,
        predicted_time=predicted,
        lower_bound=bound,
        node_size=node_size,
        vision_patches=None if patches is None else tuple(patches.tolist()),
        vision_patches_per_device=vision_patches_per_device,
    )


def group_times(
    members: np.ndarray,
    owner: np.ndarray,
    degrees: np.ndarray,
    first: np.ndarray,
    lengths: np.ndarray,
    cost: CostModel,
    node_size: int | None,
    patches: np.ndarray | None,
) -> tuple[np.ndarray, np.ndarray]:
    """Every group's predicted time and summed padded tokens: ``members`` (sample indices, each group's
    together, in the plan's order) of group ``owner``, of ``degrees`` and ``first`` ranks (placed, so a group
    that crosses a node pays the inter-node bandwidth). The one computation of a plan's times:
    :func:`build_plan` and static CP's layouts timed without their plans
    (:func:`~lightning_dhp.planner.baselines.static_time`) give the same floats."""
    padded = padded_lengths(lengths[members], degrees[owner]).astype(np.float64)
    sum_padded = np.bincount(owner, weights=padded, minlength=len(degrees))
    sum_squares = np.bincount(owner, weights=padded * padded, minlength=len(degrees))
    sum_patches = None if patches is None else np.bincount(owner, weights=patches[members], minlength=len(degrees))
    times = cost.placed_times(sum_padded, sum_squares, degrees, first, node_size, sum_patches=sum_patches)
    return times, sum_padded
