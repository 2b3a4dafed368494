"""The simulated policies and how their groups are timed.

Dynamic policies plan every batch: ``dhp`` (:func:`~lightning_dhp.planner.plan_batch`) and the peers
(:mod:`lightning_dhp.simulate.peers`: ``dhp-paper``, ``megatron-dcp``). Static policies run one degree for
the whole run: ``ring-<d>`` (:func:`~lightning_dhp.planner.static_plan`) and ``ulysses-<d>`` (the same groups,
timed with :func:`ulysses_group_time`). ``dhp-vision-blind`` is ``plan_batch`` without the vision patches,
timed with them.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from lightning_dhp.planner import CostModel, Plan, padded_length, plan_batch
from lightning_dhp.planner.inputs import min_degrees
from lightning_dhp.planner.memory import vision_min_degrees
from lightning_dhp.planner.placement import crosses_node
from lightning_dhp.simulate.peers import megatron_dcp_plan, paper_plan, sequential_group_time

PEERS = ("dhp-paper", "megatron-dcp")
VISION_BLIND = "dhp-vision-blind"
# Bytes one Ulysses token moves per step over the ring's K/V bytes per token (kv_bytes_per_token).
# For the default 7B-class model (32 query heads, 8 KV heads): the ring moves K, V forward and
# K, V, dK, dV backward = 3 x 16 KV-head vectors per layer; Ulysses all-to-alls q, k, v, out forward
# and their gradients backward = 2 x (32 + 8 + 8 + 32) head vectors per layer: 160 / 48 = 10 / 3.
ULYSSES_VOLUME_RATIO = 10 / 3

# (lengths, degree, crosses a node, vision patches per sample or None) -> seconds
GroupTime = Callable[[list[int], int, bool, "list[int] | None"], float]


def ring_group_time(cost: CostModel) -> GroupTime:
    """The cost model's own ring-CP group time."""

    def group_time(lengths: list[int], degree: int, crosses_node: bool, patches: list[int] | None = None) -> float:
        return cost.group_time(lengths, degree, crosses_node=crosses_node, patches=patches)

    return group_time


def ulysses_group_time(cost: CostModel, volume_ratio: float) -> GroupTime:
    """Ulysses (all-to-all over heads) group time from the cost model's fields.

    ``overhead + (a sum P^2 + b sum P + vision sum V) / d + [d > 1] (d - 1) (step_latency + volume_ratio
    * kv_bytes * (sum P / d) / d / bandwidth)``: the same compute as the ring with ``P`` = length padded
    to a multiple of ``d``; each rank sends ``(d - 1) / d`` of its ``sum P / d`` tokens' head vectors;
    the all-to-alls sit between projection and attention, so nothing overlaps them; ``d - 1`` peers per
    collective pay the ring's per-step latency.
    """

    def group_time(lengths: list[int], degree: int, crosses_node: bool, patches: list[int] | None = None) -> float:
        padded = np.asarray([-(-length // degree) * degree for length in lengths], dtype=np.float64)
        compute = (cost.attention_s_per_token2 * (padded * padded).sum() + cost.linear_s_per_token * padded.sum())
        if patches is not None:
            compute += cost.vision_s_per_patch * sum(patches)
        if degree == 1:
            return cost.overhead_s + compute
        bandwidth = cost.inter_node_bytes_per_s if crosses_node else cost.intra_node_bytes_per_s
        tokens_per_rank = padded.sum() / degree
        all_to_all = volume_ratio * cost.kv_bytes_per_token * tokens_per_rank / degree / bandwidth
        return cost.overhead_s + compute / degree + (degree - 1) * (cost.ring_step_latency_s + all_to_all)

    return group_time


def megatron_group_time(cost: CostModel) -> GroupTime:
    """Megatron's hybrid-CP groups run their samples one after another: one forward+backward each."""

    def group_time(lengths: list[int], degree: int, crosses_node: bool, patches: list[int] | None = None) -> float:
        return sequential_group_time(cost, lengths, degree, crosses_node, patches)

    return group_time


def retimed(
    plan: Plan, group_time: GroupTime, node_size: int, *, vision_patches: Sequence[int] | None = None
) -> float:
    """Predicted time of ``plan``'s rounds under ``group_time``; groups spanning two nodes cross. The groups
    hold ``vision_patches`` (per sample; default: the plan's own, :attr:`Plan.vision_patches`)."""
    patches = plan.vision_patches if vision_patches is None else vision_patches
    total = 0.0
    for round_ in plan.rounds:
        total += max(
            group_time(
                [plan.lengths[sample] for sample in group.samples],
                group.degree,
                bool(crosses_node(group.ranks[0], group.degree, node_size)),
                None if patches is None else [int(patches[sample]) for sample in group.samples],
            )
            for group in round_.groups
        )
    return total


@dataclass(frozen=True)
class DynamicPolicy:
    """A planner that picks the degrees per batch (``plan_batch``'s signature) and how its groups run
    (``group_time``; None: as the plan predicts them, the cost model's ring)."""

    planner: Callable[..., Plan]
    group_time: GroupTime | None = None

    def step_time(self, plan: Plan, node_size: int) -> float:
        """Seconds of one step run as this policy runs it."""
        return plan.predicted_time if self.group_time is None else retimed(plan, self.group_time, node_size)


def dynamic_policies(cost: CostModel) -> dict[str, DynamicPolicy]:
    """``dhp`` and its :data:`PEERS`, in report order."""
    return {
        "dhp": DynamicPolicy(plan_batch),
        "dhp-paper": DynamicPolicy(paper_plan),
        "megatron-dcp": DynamicPolicy(megatron_dcp_plan, megatron_group_time(cost)),
    }


def fitting_static_degrees(
    longest: int, num_devices: int, tokens_per_device: int, most_patches: int = 0,
    vision_patches_per_device: int | None = None,
) -> list[int]:
    """Power-of-two degrees dividing ``num_devices`` that hold a sample of ``longest`` tokens and, under a
    vision budget, one of ``most_patches`` vision patches."""
    needed = int(min_degrees(np.array([longest]), tokens_per_device)[0])
    if vision_patches_per_device is not None:
        needed = max(needed, int(vision_min_degrees(np.int64(most_patches), vision_patches_per_device)))
    degrees, degree = [], 1
    while degree <= num_devices:
        fits = padded_length(longest, degree) <= degree * tokens_per_device
        if degree >= needed and num_devices % degree == 0 and fits:
            degrees.append(degree)
        degree *= 2
    return degrees


def policy_order(policy: str) -> tuple[int, int]:
    """Sort key of the report's columns: dhp, the peers, vision-blind; then ring, then Ulysses, by degree."""
    dynamic = ("dhp", *PEERS, VISION_BLIND)
    if policy in dynamic:
        return (0, dynamic.index(policy))
    kind, _, degree = policy.partition("-")
    return ({"ring": 1, "ulysses": 2}[kind], int(degree))
