"""Turning planned groups (sample indices, degree, first rank) into a timed :class:`Plan`."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from lightning_dhp.planner.cost_model import CostModel, padded_lengths
from lightning_dhp.planner.plan import Group, Plan, Round


@dataclass(frozen=True)
class PlannedGroup:
    """A group before it becomes a :class:`Group`: global sample indices, degree, first rank."""

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
) -> Plan:
    """Turn planned groups into a :class:`Plan`, timing every group with the cost model."""
    plan_rounds = []
    for planned in rounds:
        groups = []
        for group in sorted(planned, key=lambda planned_group: planned_group.first_rank):
            group_lengths = lengths[list(group.samples)]
            last_rank = group.first_rank + group.degree - 1
            crosses = node_size is not None and group.first_rank // node_size != last_rank // node_size
            tokens = int(padded_lengths(group_lengths, group.degree).sum())
            groups.append(
                Group(
                    ranks=tuple(range(group.first_rank, last_rank + 1)),
                    samples=group.samples,
                    predicted_time=cost.group_time(group_lengths.tolist(), group.degree, crosses_node=crosses),
                    tokens_per_rank=tokens // group.degree,
                )
            )
        plan_rounds.append(Round(groups=tuple(groups)))
    predicted = math.fsum(round_.predicted_time for round_ in plan_rounds)
    return Plan(
        rounds=tuple(plan_rounds),
        lengths=tuple(int(length) for length in lengths.tolist()),
        num_devices=num_devices,
        tokens_per_device=tokens_per_device,
        predicted_time=predicted,
        lower_bound=bound,
        node_size=node_size,
    )
