"""``Problem``: one batch's checked inputs, or one round of it, as every planning stage reads them."""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from lightning_dhp.planner.assemble import PlannedGroup, build_plan
from lightning_dhp.planner.cost_model import CostModel, padded_lengths, take
from lightning_dhp.planner.inputs import checked_min_degrees
from lightning_dhp.planner.memory import vision_budget
from lightning_dhp.planner.options import DEFAULT_OPTIONS, PlannerOptions
from lightning_dhp.planner.plan import Plan
from lightning_dhp.planner.rounds import bound_from_parts, device_seconds, fastest_alone, lower_bound, minimum_rounds


@dataclass(frozen=True)
class Problem:
    """Sample lengths (the batch's, or one round's at local positions), their minimum degrees, the limits,
    the cost model, the lower bound and the planner's options.

    :func:`batch_problem` makes the batch's; :meth:`round` one round's.
    """

    lengths: np.ndarray
    min_degree: np.ndarray
    num_devices: int
    tokens_per_device: int
    cost: CostModel
    node_size: int | None
    lower_bound: float
    batch_size: int  # samples in the whole batch (all rounds); sets the refinement budget
    patches: np.ndarray | None = None  # vision patches per sample; None: none
    vision_patches_per_device: int | None = None  # the vision memory budget; None: none
    options: PlannerOptions = DEFAULT_OPTIONS
    # what a round's stages computed for a set of bins before (several starts and refinement passes reach
    # the same bins)
    memo: dict[Any, Any] = field(default_factory=dict, compare=False, repr=False)

    def padded(self, lengths: np.ndarray, degrees: np.ndarray) -> np.ndarray:
        return padded_lengths(lengths, degrees)

    @property
    def patch_budget(self) -> int | None:
        """The vision budget the bins must respect (None: none, or no patches)."""
        return vision_budget(self.patches, self.vision_patches_per_device)

    def sample_costs(self, positions: Any, degrees: np.ndarray) -> np.ndarray:
        """Additive time share of the samples at ``positions`` (an index into :attr:`lengths`) at each
        degree (broadcasting)."""
        padded = self.padded(self.lengths[positions], degrees).astype(np.float64)
        with_work = self.cost.times_from_sums(padded, padded * padded, degrees, node_size=self.node_size,
                                              sum_patches=take(self.patches, positions))
        return with_work - self.cost.times_from_sums(0.0, 0.0, degrees, node_size=self.node_size)

    @functools.cached_property
    def sample_work(self) -> np.ndarray:
        """Each sample's device-seconds at the least (:func:`~.rounds.device_seconds`), computed once (read-only)."""
        work = device_seconds(self.lengths, self.min_degree, self.cost, self.patches)
        work.flags.writeable = False
        return work

    def round_bound(self, samples: np.ndarray) -> float:
        """Lower bound on the makespan of one round holding ``samples``."""
        return self.round_bounds([samples])[0]

    def round_bounds(self, rounds: list[np.ndarray]) -> list[float]:
        """Lower bound on the makespan of each round (its samples), as :func:`~.rounds.lower_bound` of the round
        alone: the longest samples' fastest times in one call, the device-seconds from :attr:`sample_work`."""
        longest = np.array([samples[np.argmax(self.lengths[samples])] for samples in rounds], dtype=np.int64)
        alone = fastest_alone(self.lengths[longest], self.min_degree[longest], self.num_devices, self.cost,
                              self.node_size, take(self.patches, longest)).tolist()
        return [bound_from_parts(float(self.sample_work[samples].sum()), fastest, self.num_devices, 1, self.cost)
                for samples, fastest in zip(rounds, alone, strict=True)]

    def round(self, samples: np.ndarray, bound: float) -> Problem:
        """The round of ``samples`` (whose lower bound is ``bound``) as a problem of local positions."""
        return Problem(self.lengths[samples], self.min_degree[samples], self.num_devices, self.tokens_per_device,
                       self.cost, self.node_size, bound, self.batch_size, take(self.patches, samples),
                       self.vision_patches_per_device, self.options)

    def plan(self, rounds: list[list[PlannedGroup]]) -> Plan:
        """The batch problem's timed :class:`Plan` of ``rounds`` (global sample indices)."""
        return build_plan(rounds, self.lengths, self.num_devices, self.tokens_per_device, self.cost, self.node_size,
                          self.lower_bound, self.patches, self.vision_patches_per_device)


def batch_problem(
    lengths: np.ndarray,
    num_devices: int,
    tokens_per_device: int,
    cost: CostModel,
    node_size: int | None,
    patches: np.ndarray | None,
    vision_patches_per_device: int | None,
    options: PlannerOptions = DEFAULT_OPTIONS,
) -> Problem:
    """The batch of checked inputs (:func:`~lightning_dhp.planner.inputs.check_inputs`) as a problem: every
    sample's minimum degree (a PlanError names the first sample no group holds) and the lower bound of any
    plan, over the fewest rounds memory allows."""
    min_degree = checked_min_degrees(lengths, num_devices, tokens_per_device, patches, vision_patches_per_device)
    fewest = minimum_rounds(lengths, num_devices, tokens_per_device, patches, vision_patches_per_device)
    bound = lower_bound(lengths, min_degree, num_devices, fewest, cost, node_size, patches)
    return Problem(lengths, min_degree, num_devices, tokens_per_device, cost, node_size, bound, len(lengths), patches,
                   vision_patches_per_device, options)
