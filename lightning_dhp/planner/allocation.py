"""Exact min-max degree allocation for bins of fixed membership.

Given bins (each a set of samples), choose each bin's degree ``d_b >= min_degree_b`` with
``sum d_b <= num_devices`` minimising ``max_b T_b(d_b)``. Parametric search: with the monotone
envelope ``E_b(d) = min_{d' <= d} T_b(d')`` a makespan ``T`` needs ``d_b(T) = min{d : E_b(d) <= T}``
devices for bin ``b``, i.e. ``min_degree_b`` plus the number of envelope entries above ``T``. So the
devices needed at ``T`` is one count over a single sorted array of all envelope entries, and a
binary search over those entries (the only values the optimum can take) finds the exact optimum
in ``O(E log E)`` for ``E`` table entries, instead of the paper's ``O(K' N^2)`` DP.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from lightning_dhp.planner.cost_model import CostModel, padded_lengths, take
from lightning_dhp.planner.memory import vision_budget, vision_min_degrees


@dataclass
class DegreeTable:
    """Times of every bin over its candidate degrees ``min_degree[b] .. min_degree[b] + width - 1``.

    Rows are grouped into buckets of similar width; ``times`` is the raw cost model time (inf past
    the bin's degree limit) and ``envelope`` its running minimum along the degree axis.
    """

    min_degree: np.ndarray
    buckets: list[tuple[np.ndarray, np.ndarray, np.ndarray]]  # (bin ids, times, envelope)
    location: np.ndarray  # (bins, 2): bucket index and row of every bin

    def entries(self) -> np.ndarray:
        return np.concatenate([envelope.ravel() for _, _, envelope in self.buckets])

    @property
    def size(self) -> int:
        """Number of table entries."""
        return sum(envelope.size for _, _, envelope in self.buckets)

    def floor_time(self) -> float:
        """Smallest makespan the table can reach: the slowest bin at its best degree."""
        return max(float(envelope[:, -1].max()) for _, _, envelope in self.buckets)

    def degrees_at(self, makespan: float) -> np.ndarray:
        """Fewest devices per bin that bring it to ``makespan`` or below."""
        degrees = self.min_degree.copy()
        for bins, _, envelope in self.buckets:
            degrees[bins] += (envelope > makespan).sum(axis=1)
        return degrees

    def degrees_and_times_at(self, makespans: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """:meth:`degrees_at` and each bin's time there (inf for bins that cannot reach it), one
        row per makespan."""
        degrees = np.repeat(self.min_degree[None, :], len(makespans), axis=0)
        times = np.empty(degrees.shape)
        for bins, _, envelope in self.buckets:
            above = (envelope[None, :, :] > makespans[:, None, None]).sum(axis=2)
            degrees[:, bins] += above
            reached = envelope[np.arange(len(bins))[None, :], np.minimum(above, envelope.shape[1] - 1)]
            times[:, bins] = np.where(above < envelope.shape[1], reached, np.inf)
        return degrees, times

    def times_at(self, degrees: np.ndarray) -> np.ndarray:
        """Raw time of every bin at ``degrees[bin]`` (inf outside its table)."""
        times = np.empty(len(degrees))
        for bins, raw, _ in self.buckets:
            column = degrees[bins] - self.min_degree[bins]
            inside = column < raw.shape[1]
            times[bins] = np.where(inside, raw[np.arange(len(bins)), np.minimum(column, raw.shape[1] - 1)], np.inf)
        return times

    def cap(self, bin_index: int, max_degree: int) -> None:
        """Forbid ``bin_index`` every degree above ``max_degree`` (in place)."""
        bucket, row = self.location[bin_index]
        _, raw, envelope = self.buckets[bucket]
        column = max_degree - int(self.min_degree[bin_index]) + 1
        if column < raw.shape[1]:
            raw[row, max(column, 0):] = np.inf
            envelope[row] = np.minimum.accumulate(raw[row])

    def time_at(self, bin_index: int, degree: int) -> float:
        """Raw time of ``bin_index`` at ``degree`` (inf when outside its table)."""
        bucket, row = self.location[bin_index]
        times = self.buckets[bucket][1]
        column = degree - int(self.min_degree[bin_index])
        return float(times[row, column]) if 0 <= column < times.shape[1] else float("inf")


def bin_min_degrees(
    lengths: np.ndarray,
    owner: np.ndarray,
    member_min_degree: np.ndarray,
    num_bins: int,
    capacity: int,
    limit: int,
    patches: np.ndarray | None = None,
    vision_patches_per_device: int | None = None,
) -> np.ndarray:
    """Smallest degree of every bin in ``[its largest member's minimum degree, limit]`` whose padded
    per-device tokens fit (and, under a vision budget, its members' ``patches`` together), or ``limit + 1``;
    ``owner[i]`` is the bin of sample ``i``.

    Most bins fit at their start degree. Per-device tokens ``sum_i 2 * ceil(L_i / 2d)`` never grow
    with ``d`` (d >= 2), so the others bisect, all of them side by side, up to a degree where they surely fit
    (below ``L_i / d + 2`` each, so from ``sum_i L_i / (capacity - 2 n)`` devices on for ``n`` members). Patches
    do not depend on the degree: they only raise the start.
    """
    start = np.zeros(num_bins, dtype=np.int64)
    np.maximum.at(start, owner, member_min_degree)
    budget = vision_budget(patches, vision_patches_per_device)
    if budget is not None:
        held = np.bincount(owner, weights=patches, minlength=num_bins).astype(np.int64)
        start = np.minimum(np.maximum(start, vision_min_degrees(held, budget)), limit + 1)
    total = np.bincount(owner, weights=lengths, minlength=num_bins)
    degrees = start.copy()
    hard = np.where(start == 1, total > capacity, _per_device(lengths, owner, start, num_bins) > capacity)
    if not hard.any():
        return degrees
    selected = hard[owner]
    hard_lengths, hard_owner = lengths[selected], owner[selected]
    low = np.maximum(start, 2)
    slack = capacity - 2 * np.bincount(owner, minlength=num_bins)
    surely = np.where(slack > 0, -(-total.astype(np.int64) // np.maximum(slack, 1)), limit)
    high = np.minimum(np.maximum(surely, low), limit)
    possible = hard & (low <= high) & (_per_device(hard_lengths, hard_owner, high, num_bins) <= capacity)
    while (active := possible & (low < high)).any():
        middle = (low + high) // 2
        fits = _per_device(hard_lengths, hard_owner, middle, num_bins) <= capacity
        high = np.where(active & fits, middle, high)
        low = np.where(active & ~fits, middle + 1, low)
    degrees[hard] = np.where(possible, low, limit + 1)[hard]
    return degrees


def _per_device(lengths: np.ndarray, owner: np.ndarray, degrees: np.ndarray, num_bins: int) -> np.ndarray:
    """Padded tokens per device of every bin at ``degrees[bin]``."""
    member_degrees = degrees[owner]
    return np.bincount(owner, weights=padded_lengths(lengths, member_degrees) // member_degrees, minlength=num_bins)


def build_table(
    bin_lengths: list[np.ndarray],
    min_degree: np.ndarray,
    max_degree: np.ndarray,
    target: float,
    cost: CostModel,
    node_size: int | None,
) -> DegreeTable:
    """Time tables of every bin from its minimum degree until its envelope reaches ``target``.

    Degrees beyond the first that reaches ``target`` (a lower bound of the makespan) can never be
    needed, which keeps tables short. Widths are powers of two: a first guess from the degree-1
    work, doubled until the row reaches ``target`` or covers ``max_degree``; degrees past
    ``max_degree`` get an infinite time.
    """
    sizes = np.array([len(lengths) for lengths in bin_lengths], dtype=np.int64)
    flat_lengths = np.concatenate(bin_lengths) if bin_lengths else np.zeros(0, dtype=np.int64)
    return table_from_flat(flat_lengths, sizes, min_degree, max_degree, target, cost, node_size)


def table_from_flat(
    flat_lengths: np.ndarray,
    sizes: np.ndarray,
    min_degree: np.ndarray,
    max_degree: np.ndarray,
    target: float,
    cost: CostModel,
    node_size: int | None,
    flat_patches: np.ndarray | None = None,
) -> DegreeTable:
    """:func:`build_table` with the bins' lengths (and vision patches, None: none) concatenated and
    ``sizes`` samples per bin."""
    num_bins = len(sizes)
    flat_bins = np.repeat(np.arange(num_bins), sizes)
    degree_one_work = np.bincount(flat_bins, weights=cost.sample_costs(flat_lengths, 1, patches=flat_patches),
                                  minlength=num_bins)
    bin_patches = None if flat_patches is None else np.bincount(flat_bins, weights=flat_patches, minlength=num_bins)
    headroom = max(target - cost.overhead_s, 1e-12)
    guess = np.ceil(degree_one_work / headroom).astype(np.int64) + 2 - min_degree
    full = max_degree - min_degree + 1
    widths = 1 << np.ceil(np.log2(np.clip(np.minimum(guess, full), 1, None))).astype(np.int64)
    done: dict[int, list[tuple[np.ndarray, np.ndarray, np.ndarray]]] = {}
    pending = np.arange(num_bins)
    while pending.size:
        retry = []
        for width in np.unique(widths[pending]).tolist():
            chosen = pending[widths[pending] == width]
            times = _times_for(chosen, width, flat_bins, flat_lengths, min_degree, max_degree, cost, node_size,
                               take(bin_patches, chosen))
            envelope = np.minimum.accumulate(times, axis=1)
            finished = (envelope[:, -1] <= target) | (width >= full[chosen])
            done.setdefault(width, []).append((chosen[finished], times[finished], envelope[finished]))
            retry.append(chosen[~finished])
        pending = np.concatenate(retry)
        widths[pending] *= 2
    buckets = []
    location = np.zeros((num_bins, 2), dtype=np.int64)
    for width in sorted(done):
        bins, times, envelope = (np.concatenate(parts) for parts in zip(*done[width], strict=True))
        if bins.size:
            location[bins, 0] = len(buckets)
            location[bins, 1] = np.arange(len(bins))
            buckets.append((bins, times, envelope))
    return DegreeTable(min_degree=min_degree.copy(), buckets=buckets, location=location)


def _times_for(
    chosen: np.ndarray,
    width: int,
    flat_bins: np.ndarray,
    flat_lengths: np.ndarray,
    min_degree: np.ndarray,
    max_degree: np.ndarray,
    cost: CostModel,
    node_size: int | None,
    chosen_patches: np.ndarray | None,
) -> np.ndarray:
    """Times of the ``chosen`` bins (ascending ids, with ``chosen_patches`` vision patches each, None:
    none) at ``width`` consecutive degrees each."""
    is_chosen = np.zeros(len(min_degree), dtype=bool)
    is_chosen[chosen] = True
    samples = np.flatnonzero(is_chosen[flat_bins])  # grouped by bin, bins ascending
    row = np.searchsorted(chosen, flat_bins[samples])
    degrees = min_degree[chosen][:, None] + np.arange(width)[None, :]
    sample_degrees = degrees[row]
    padded = padded_lengths(flat_lengths[samples][:, None], sample_degrees).astype(np.float64)
    boundaries = np.flatnonzero(np.concatenate([[True], row[1:] != row[:-1]]))
    sum_padded = np.add.reduceat(padded, boundaries, axis=0)
    sum_squares = np.add.reduceat(padded * padded, boundaries, axis=0)
    sum_patches = None if chosen_patches is None else chosen_patches[:, None]
    times = cost.times_from_sums(sum_padded, sum_squares, degrees, node_size=node_size, sum_patches=sum_patches)
    times[degrees > max_degree[chosen][:, None]] = np.inf
    return times


def allocate(table: DegreeTable, num_devices: int) -> tuple[np.ndarray, float] | None:
    """Exact min-max allocation: (degrees, makespan), or None if even minimum degrees overflow."""
    base = int(table.min_degree.sum())
    if base > num_devices:
        return None
    entries = np.sort(table.entries())
    floor = table.floor_time()
    candidates = np.unique(entries[entries >= floor])
    spare = num_devices - base

    def needed(makespan: float) -> int:
        return len(entries) - int(np.searchsorted(entries, makespan, side="right"))

    low, high = 0, len(candidates) - 1
    while low < high:
        middle = (low + high) // 2
        if needed(candidates[middle]) <= spare:
            high = middle
        else:
            low = middle + 1
    makespan = float(candidates[low])
    return table.degrees_at(makespan), makespan


class TimesByDegree(Protocol):
    """Each bin's time at a degree (inf where it has none): a :class:`DegreeTable`, or enumerated times."""

    def time_at(self, bin_index: int, degree: int) -> float: ...


def spend_leftover(table: TimesByDegree, degrees: np.ndarray, num_devices: int) -> np.ndarray:
    """Give unused devices, one at a time, to the slowest bin that gets strictly faster with one more."""
    degrees = degrees.copy()
    leftover = num_devices - int(degrees.sum())
    if leftover == 0:
        return degrees
    heap = [(-table.time_at(b, int(d)), b) for b, d in enumerate(degrees.tolist())]
    heapq.heapify(heap)
    while leftover > 0 and heap:
        negative_time, bin_index = heapq.heappop(heap)
        faster = table.time_at(bin_index, int(degrees[bin_index]) + 1)
        if faster < -negative_time:
            degrees[bin_index] += 1
            leftover -= 1
            heapq.heappush(heap, (-faster, bin_index))
    return degrees
