"""Published dynamic-CP planners, rebuilt on the planner's cost model so the simulator can compare them with DHP.

- :func:`paper_plan` (``dhp-paper``): the DHP paper's algorithm as published (arXiv 2602.21788):
  per round, memory-aware best-fit-decreasing (BFD) packing into bins sized at the minimum degree of
  their longest member, then the exact ``O(K' N^2)`` min-max dynamic program over (bins x devices),
  ``F[i][j] = min_d max(F[i-1][j-d], T_i(d))``, then leftover devices handed out round-robin.
  The paper does not say how a batch becomes rounds; here it gets the same split as
  :func:`~lightning_dhp.planner.plan_batch` (the fewest rounds memory allows, samples heaviest
  first to the least-loaded round with memory left, one more round while some round cannot be
  packed), so that only the per-round algorithm differs.
- :func:`megatron_dcp_plan` (``megatron-dcp``): Megatron-Core's hybrid ("dynamic") context
  parallelism (``BalancedCPScheduler``): every sub-sample runs at the smallest power-of-two CP size
  that holds it (or the whole DP x CP domain), on pre-created aligned groups of consecutive ranks;
  samples longest first go to a new group while free ranks remain, else to the least-loaded group
  of their size; a scheduling group (a round here) closes once its ranks are balanced within 5%,
  the most-loaded group's last sample is trimmed back while that narrows the spread, and empty
  ranks are filled by doubling the smallest groups. Megatron runs a group's sub-samples one after
  another, so time its groups with :func:`sequential_group_time`. Two departures, both in its
  favour: balancing uses the shared cost model instead of its ``L^2 / cp`` estimate, and a group
  takes a sample only while the group's padded tokens fit ``degree x tokens_per_device`` (so that
  its plan is also valid for this package's packed runtime).

Both respect a vision budget (``vision_patches_per_device``) the way they respect tokens: a sample's
minimum degree (and Megatron's CP size) also holds its patches, and a bin or group takes a sample only
while its patches fit ``degree x vision_patches_per_device``.

Both return a validated-shape :class:`~lightning_dhp.planner.Plan` (``plan.validate()`` passes).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from lightning_dhp.planner.assemble import PlannedGroup, build_plan
from lightning_dhp.planner.cost_model import CostModel, padded_length, padded_lengths, take
from lightning_dhp.planner.inputs import check_every_sample_fits, check_inputs, checked_min_degrees
from lightning_dhp.planner.memory import fits_memory, vision_budget, vision_min_degrees
from lightning_dhp.planner.placement import PlacementFailure, needlessly_crosses_node, place
from lightning_dhp.planner.plan import Plan
from lightning_dhp.planner.rounds import balanced_assignment, device_seconds, lower_bound, minimum_rounds

MEGATRON_BALANCE_SLACK = 0.05  # BalancedCPScheduler's delta: a group is balanced within 5%
MEGATRON_BUCKET_SLACK = 1.1  # make_buckets_equal closes a bucket past 110% of its work target


def sequential_group_time(
    cost: CostModel, lengths: Sequence[int], degree: int, crosses_node: bool, patches: Sequence[int] | None = None
) -> float:
    """A group that runs its samples one after another, each as its own forward+backward (``patches``:
    each sample's vision patches, None: none)."""
    each: list[list[int] | None] = [None] * len(lengths) if patches is None else [[count] for count in patches]
    return sum(
        cost.group_time([length], degree, crosses_node=crosses_node, patches=sample_patches)
        for length, sample_patches in zip(lengths, each, strict=True)
    )


# -- dhp-paper -------------------------------------------------------------------------------------------


def paper_plan(
    lengths: Sequence[int] | np.ndarray,
    num_devices: int,
    tokens_per_device: int,
    cost_model: CostModel | None = None,
    *,
    node_size: int | None = None,
    vision_patches: Sequence[int] | np.ndarray | None = None,
    vision_patches_per_device: int | None = None,
) -> Plan:
    """The DHP paper's planner (module docstring): BFD bins, ``O(K' N^2)`` DP, round-robin leftover;
    ``vision_patches`` and ``vision_patches_per_device`` as in :func:`~lightning_dhp.planner.plan_batch`."""
    lengths_array, num_devices, tokens_per_device, node_size, patches, vision_patches_per_device = check_inputs(
        lengths, num_devices, tokens_per_device, node_size, vision_patches, vision_patches_per_device
    )
    cost = cost_model or CostModel.default()
    min_degree = checked_min_degrees(lengths_array, num_devices, tokens_per_device, patches, vision_patches_per_device)
    work = device_seconds(lengths_array, min_degree, cost, patches)
    fewest = minimum_rounds(lengths_array, num_devices, tokens_per_device, patches, vision_patches_per_device)
    rounds: list[list[PlannedGroup]] = []
    placed_in_nodes = True
    for num_rounds in range(fewest, len(lengths_array) + 1):
        assignment = balanced_assignment(work, lengths_array, num_rounds, num_devices, tokens_per_device, patches,
                                         vision_patches_per_device)
        if assignment is None:
            continue
        solved = [
            _paper_round(np.array(sorted(members), dtype=np.int64), lengths_array, patches, min_degree, num_devices,
                         tokens_per_device, vision_patches_per_device, cost, node_size)
            for members in assignment
            if members
        ]
        if all(round_ is not None for round_ in solved):
            rounds = [groups for groups, _ in solved]
            placed_in_nodes = all(in_nodes for _, in_nodes in solved)
            break
    # a round whose degrees do not fit node-aware placement is laid out flat; its plan then claims no nodes,
    # and its times (so its lower bound) have no node-crossing terms
    plan_nodes = node_size if placed_in_nodes else None
    bound = lower_bound(lengths_array, min_degree, num_devices, fewest, cost, plan_nodes, patches)
    return build_plan(rounds, lengths_array, num_devices, tokens_per_device, cost, plan_nodes, bound, patches,
                      vision_patches_per_device)


def _best_fit_decreasing(
    lengths: np.ndarray,
    patches: np.ndarray | None,
    min_degree: np.ndarray,
    tokens_per_device: int,
    vision_patches_per_device: int | None,
) -> tuple[list[list[int]], list[int]]:
    """Positions into bins and the bins' degrees: longest first, each sample to the fullest bin that
    still holds it (memory at the bin's degree, the minimum degree of its first, longest member:
    tokens, and ``patches`` under a vision budget, None: none), or to a new bin when none does."""
    bins: list[list[int]] = []
    degrees = np.zeros(len(lengths), dtype=np.int64)  # bins never outnumber samples
    room = np.zeros(len(lengths), dtype=np.int64)  # free padded tokens of each bin
    held = np.zeros(len(lengths), dtype=np.int64)  # vision patches of each bin (under a vision budget)
    budget = vision_budget(patches, vision_patches_per_device)
    for position in np.lexsort((np.arange(len(lengths)), -lengths)).tolist():
        count = len(bins)
        need = padded_lengths(np.full(count, lengths[position]), degrees[:count])
        patch_room = None if budget is None else degrees[:count] * budget
        fits = fits_memory(need, room[:count], None if budget is None else held[:count] + patches[position],
                           patch_room)
        left = np.where(fits, room[:count] - need, np.iinfo(np.int64).max)
        best = int(np.argmin(left)) if count else -1
        if best < 0 or left[best] == np.iinfo(np.int64).max:
            degree = int(min_degree[position])
            degrees[count] = degree
            room[count] = degree * tokens_per_device - padded_length(int(lengths[position]), degree)
            bins.append([position])
            best = count
        else:
            room[best] = left[best]
            bins[best].append(position)
        if budget is not None:
            held[best] += patches[position]
    return bins, degrees[: len(bins)].tolist()


def _paper_round(
    samples: np.ndarray,
    all_lengths: np.ndarray,
    all_patches: np.ndarray | None,
    all_min_degree: np.ndarray,
    num_devices: int,
    tokens_per_device: int,
    vision_patches_per_device: int | None,
    cost: CostModel,
    node_size: int | None,
) -> tuple[list[PlannedGroup], bool] | None:
    """One round's groups and whether they sit inside nodes, or None when its bins need > N devices."""
    lengths, patches = all_lengths[samples], take(all_patches, samples)
    bins, bin_min = _best_fit_decreasing(lengths, patches, all_min_degree[samples], tokens_per_device,
                                         vision_patches_per_device)
    if sum(bin_min) > num_devices:
        return None
    all_degrees = np.arange(num_devices + 1)
    times = np.full((len(bins), num_devices + 1), np.inf)
    for index, members in enumerate(bins):
        # a bin's patches fit its first degree (BFD checked them there) and so every wider one
        candidates = all_degrees[bin_min[index] :]
        fits = padded_lengths(lengths[members][:, None], candidates[None, :]).sum(axis=0) <= (
            candidates * tokens_per_device
        )
        candidates = candidates[fits]
        times[index, candidates] = cost.times_over_degrees(lengths[members], candidates, node_size=node_size,
                                                           patches=take(patches, members))
    degrees = _min_max_dp(times, num_devices)
    _round_robin_leftover(degrees, times, num_devices)
    starts = place(degrees.tolist(), num_devices, node_size)
    in_nodes = not isinstance(starts, PlacementFailure)
    if not in_nodes:
        starts = place(degrees.tolist(), num_devices, None)
    groups = [
        PlannedGroup(tuple(sorted(samples[members].tolist())), int(degree), int(start))
        for members, degree, start in zip(bins, degrees.tolist(), starts, strict=True)
    ]
    return groups, in_nodes


def _min_max_dp(times: np.ndarray, num_devices: int) -> np.ndarray:
    """Degrees minimising the slowest bin with at most ``num_devices`` devices: the paper's DP.

    ``F[i][j]`` is the best makespan of the first ``i`` bins on ``j`` devices, ``F[i][j] = min_d
    max(F[i-1][j-d], T_i(d))``: ``O(K' N^2)`` in general. Degrees no plan can give a bin (below its
    minimum, or leaving the other bins less than their minimums) are skipped, which changes no result.
    """
    num_bins = len(times)
    finite = np.isfinite(times)
    lowest = np.where(finite.any(axis=1), finite.argmax(axis=1), num_devices + 1)
    devices = np.arange(num_devices + 1)
    best = np.zeros(num_devices + 1)  # F[0][j] = 0: devices may stay unused
    choice = np.zeros((num_bins, num_devices + 1), dtype=np.int64)
    for index in range(num_bins):
        highest = min(num_devices, num_devices - int(lowest.sum() - lowest[index]))
        degrees = np.arange(int(lowest[index]), max(int(lowest[index]), highest) + 1)
        degrees = degrees[degrees <= num_devices]
        if degrees.size == 0:
            degrees = np.array([0])
        taken = devices[:, None] - degrees[None, :]  # j - d
        candidates = np.where(
            taken >= 0, np.maximum(best[np.maximum(taken, 0)], times[index][degrees][None, :]), np.inf
        )
        column = np.argmin(candidates, axis=1)
        choice[index] = degrees[column]
        best = candidates[devices, column]
    result = np.zeros(num_bins, dtype=np.int64)
    left = num_devices
    for index in range(num_bins - 1, -1, -1):
        result[index] = choice[index, left]
        left -= result[index]
    return result


def _round_robin_leftover(degrees: np.ndarray, times: np.ndarray, num_devices: int) -> None:
    """Unused devices one at a time to the bins in order, cycling, each to a bin it makes faster."""
    leftover = num_devices - int(degrees.sum())
    while leftover > 0:
        given = 0
        for index in range(len(degrees)):
            degree = int(degrees[index])
            if leftover > given and degree < num_devices and times[index, degree + 1] < times[index, degree]:
                degrees[index] += 1
                given += 1
        if given == 0:
            return
        leftover -= given


# -- megatron-dcp ----------------------------------------------------------------------------------------


def megatron_cp_size(length: int, num_devices: int, tokens_per_device: int, vision_degree: int = 1) -> int:
    """Megatron's CP size of a sub-sample: the smallest power of two that holds it (and is at least
    ``vision_degree``, the ranks its vision patches need), else all devices."""
    degree = 1
    while degree < num_devices and (
        degree < vision_degree or padded_length(length, degree) > degree * tokens_per_device
    ):
        degree *= 2
    return min(degree, num_devices)


def megatron_dcp_plan(
    lengths: Sequence[int] | np.ndarray,
    num_devices: int,
    tokens_per_device: int,
    cost_model: CostModel | None = None,
    *,
    node_size: int | None = None,
    vision_patches: Sequence[int] | np.ndarray | None = None,
    vision_patches_per_device: int | None = None,
) -> Plan:
    """Megatron-Core hybrid context parallelism's schedule (module docstring) as a :class:`Plan`;
    ``vision_patches`` and ``vision_patches_per_device`` as in :func:`~lightning_dhp.planner.plan_batch`.

    Its groups run their samples in sequence: time them with :func:`sequential_group_time`; the
    plan's own ``predicted_time`` times them packed, as this package's runtime would run them.
    """
    lengths_array, num_devices, tokens_per_device, node_size, patches, vision_patches_per_device = check_inputs(
        lengths, num_devices, tokens_per_device, node_size, vision_patches, vision_patches_per_device
    )
    cost = cost_model or CostModel.default()
    min_degree = checked_min_degrees(lengths_array, num_devices, tokens_per_device, patches, vision_patches_per_device)
    budget = vision_budget(patches, vision_patches_per_device)
    vision_degrees = [1] * len(lengths_array) if budget is None else vision_min_degrees(patches, budget).tolist()
    sizes = [
        megatron_cp_size(length, num_devices, tokens_per_device, vision_degree)
        for length, vision_degree in zip(lengths_array.tolist(), vision_degrees, strict=True)
    ]
    for index, size in enumerate(sizes):
        if padded_length(int(lengths_array[index]), size) > size * tokens_per_device:
            check_every_sample_fits(lengths_array[index : index + 1], np.array([num_devices + 1]), num_devices,
                                    tokens_per_device)
    order = np.lexsort((np.arange(len(lengths_array)), -lengths_array)).tolist()
    scheduler = _MegatronScheduler(lengths_array, patches, sizes, num_devices, tokens_per_device, budget, cost,
                                   node_size)
    rounds: list[list[PlannedGroup]] = []
    while order:
        groups, order = scheduler.next_round(order)
        rounds.append(groups)
    fewest = minimum_rounds(lengths_array, num_devices, tokens_per_device, patches, vision_patches_per_device)
    in_nodes = not any(needlessly_crosses_node(group.first_rank, group.degree, node_size)
                       for groups in rounds for group in groups)
    plan_nodes = node_size if in_nodes else None  # aligned blocks cross nodes only when node_size is odd-shaped
    bound = lower_bound(lengths_array, min_degree, num_devices, fewest, cost, plan_nodes, patches)  # as timed
    return build_plan(rounds, lengths_array, num_devices, tokens_per_device, cost, plan_nodes, bound, patches,
                      vision_patches_per_device)


class _MegatronScheduler:
    """``BalancedCPScheduler.next_hdp_group`` on aligned power-of-two rank blocks."""

    def __init__(self, lengths: np.ndarray, patches: np.ndarray | None, sizes: list[int], num_devices: int,
                 tokens_per_device: int, vision_budget: int | None, cost: CostModel, node_size: int | None):
        self.lengths, self.patches, self.sizes = lengths, patches, sizes
        self.num_devices, self.tokens_per_device = num_devices, tokens_per_device
        self.vision_budget = vision_budget  # vision patches per device (None: no budget, or no patches)
        self.cost, self.node_size = cost, node_size

    def _held(self, sample: int) -> int:
        """The vision patches ``sample`` adds to a group's memory (0 without a vision budget)."""
        return 0 if self.vision_budget is None else int(self.patches[sample])

    def _time(self, sample: int, degree: int) -> float:
        crosses = self.node_size is not None and degree > self.node_size
        patches = take(self.patches, slice(sample, sample + 1))
        return self.cost.group_time([int(self.lengths[sample])], degree, crosses_node=crosses, patches=patches)

    def _buckets(self, order: list[int]) -> list[list[int]]:
        """``make_buckets_equal``: as many consecutive buckets (longest first) as distinct CP sizes,
        each closed past 110% of an even share of the work or when later buckets need its samples."""
        count = len({self.sizes[sample] for sample in order})
        work = [self._time(sample, self.sizes[sample]) for sample in order]
        target = sum(work) / count
        buckets: list[list[int]] = []
        current: list[int] = []
        current_work = 0.0
        for position, sample in enumerate(order):
            if current and (current_work + work[position] > target * MEGATRON_BUCKET_SLACK
                            or len(order) - position <= count - len(buckets)):
                buckets.append(current)
                current, current_work = [], 0.0
            current.append(sample)
            current_work += work[position]
        if current:
            buckets.append(current)
        return buckets

    def next_round(self, order: list[int]) -> tuple[list[PlannedGroup], list[int]]:
        """One scheduling group (a round): its groups and the samples left for later rounds."""
        buckets = self._buckets(order)
        busy = np.zeros(self.num_devices, dtype=bool)  # ranks some group of this round holds
        groups: list[dict] = []  # {"start", "size", "samples", "load", "tokens", "patches"}
        first_size = None
        check_balance = False
        while any(buckets):
            picked = None
            for bucket in buckets:
                if not bucket:
                    continue
                sample = bucket[0]
                target = self._target(sample, groups, busy)
                if target is not None:
                    picked = (bucket, sample, target)
                    break
            if picked is None:
                break
            bucket, sample, target = picked
            size = self.sizes[sample]
            first_size = first_size or size
            if target == "new":
                start = self._free_block(size, busy)
                groups.append({"start": start, "size": size, "samples": [], "load": 0.0, "tokens": 0, "patches": 0})
                busy[start : start + size] = True
                target = groups[-1]
            target["samples"].append(sample)
            target["load"] += self._time(sample, size)
            target["tokens"] += padded_length(int(self.lengths[sample]), size)
            target["patches"] += self._held(sample)
            bucket.pop(0)
            if size < first_size:
                check_balance = True
            high, low = self._load_range(groups)
            if check_balance and any(buckets) and high - low <= MEGATRON_BALANCE_SLACK * high:
                break
        leftover = [sample for bucket in buckets for sample in bucket]
        leftover += self._trim_overload(groups)
        self._fill_empty_ranks(groups)
        planned = [
            PlannedGroup(tuple(sorted(group["samples"])), group["size"], group["start"])
            for group in groups
            if group["samples"]
        ]
        remaining = sorted(leftover, key=lambda sample: (-int(self.lengths[sample]), sample))
        return planned, remaining

    def _target(self, sample: int, groups: list[dict], busy: np.ndarray) -> dict | str | None:
        """A new group when free aligned ranks allow one, else the least-loaded group of the sample's
        size with memory left, else None (the sample waits for a later round)."""
        size = self.sizes[sample]
        if self._free_block(size, busy) is not None:
            return "new"
        # the room a group of its size may have used and still hold it
        token_room = size * self.tokens_per_device - padded_length(int(self.lengths[sample]), size)
        patch_room = None if self.vision_budget is None else size * self.vision_budget - self._held(sample)
        best = None
        for group in groups:
            if (
                group["size"] == size
                and group["tokens"] <= token_room
                and (patch_room is None or group["patches"] <= patch_room)
                and (best is None or group["load"] < best["load"])
            ):
                best = group
        return best

    def _free_block(self, size: int, busy: np.ndarray) -> int | None:
        """First rank of the lowest free aligned block of ``size`` ranks (pre-created groups)."""
        blocks = self.num_devices // size
        free = np.flatnonzero(~busy[: blocks * size].reshape(blocks, size).any(axis=1))
        return int(free[0]) * size if free.size else None

    def _load_range(self, groups: list[dict], shift: dict | None = None, by: float = 0.0) -> tuple[float, float]:
        """Highest and lowest per-rank load (idle ranks count 0), with ``shift``'s load lowered by ``by``."""
        loads = [group["load"] - (by if group is shift else 0.0) for group in groups]
        idle = sum(group["size"] for group in groups) < self.num_devices
        return max(loads, default=0.0), 0.0 if idle or not loads else min(loads)

    def _trim_overload(self, groups: list[dict]) -> list[int]:
        """``trim_overload``: pop the most-loaded group's last sample while that narrows the spread."""
        removed = []
        while groups:
            high, low = self._load_range(groups)
            if high - low <= MEGATRON_BALANCE_SLACK * high or low == 0:
                return removed
            group = max(groups, key=lambda g: g["load"])
            if len(group["samples"]) <= 1:
                return removed
            sample = group["samples"][-1]
            share = self._time(sample, group["size"])
            projected_high, projected_low = self._load_range(groups, group, share)
            if projected_high - projected_low >= high - low:
                return removed
            group["samples"].pop()
            group["load"] -= share
            group["tokens"] -= padded_length(int(self.lengths[sample]), group["size"])
            group["patches"] -= self._held(sample)
            removed.append(sample)
        return removed

    def _fill_empty_ranks(self, groups: list[dict]) -> None:
        """``fill_empty_gpus``: while ranks idle, double the first of the smallest groups, then lay the
        groups out again, widest first (power-of-two blocks stay aligned)."""
        groups[:] = [group for group in groups if group["samples"]]
        while groups and sum(group["size"] for group in groups) < self.num_devices:
            smallest = min(group["size"] for group in groups)
            grown = next(group for group in groups if group["size"] == smallest)
            if sum(group["size"] for group in groups) + smallest > self.num_devices:
                return
            grown["size"] *= 2
            grown["load"] = sum(self._time(sample, grown["size"]) for sample in grown["samples"])
            start = 0
            for group in sorted(groups, key=lambda g: -g["size"]):
                group["start"] = start
                start += group["size"]
