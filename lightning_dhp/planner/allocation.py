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

import numpy as np

from lightning_dhp.planner.cost_model import CostModel


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

    def floor_time(self) -> float:
        """Smallest makespan the table can reach: the slowest bin at its best degree."""
        return max(float(envelope[:, -1].max()) for _, _, envelope in self.buckets)

    def degrees_at(self, makespan: float) -> np.ndarray:
        """Fewest devices per bin that bring it to ``makespan`` or below."""
        degrees = self.min_degree.copy()
        for bins, _, envelope in self.buckets:
            degrees[bins] += (envelope > makespan).sum(axis=1)
        return degrees

    def degrees_and_times_at(self, makespan: float) -> tuple[np.ndarray, np.ndarray]:
        """:meth:`degrees_at` and each bin's time there (inf for bins that cannot reach it)."""
        degrees = self.min_degree.copy()
        times = np.empty(len(degrees))
        for bins, _, envelope in self.buckets:
            above = (envelope > makespan).sum(axis=1)
            degrees[bins] += above
            reached = envelope[np.arange(len(bins)), np.minimum(above, envelope.shape[1] - 1)]
            times[bins] = np.where(above < envelope.shape[1], reached, np.inf)
        return degrees, times

    def time_at(self, bin_index: int, degree: int) -> float:
        """Raw time of ``bin_index`` at ``degree`` (inf when outside its table)."""
        bucket, row = self.location[bin_index]
        times = self.buckets[bucket][1]
        column = degree - int(self.min_degree[bin_index])
        return float(times[row, column]) if 0 <= column < times.shape[1] else float("inf")


def bin_min_degree(lengths: np.ndarray, tokens_per_device: int, start: int, limit: int) -> int:
    """Smallest degree in ``[start, limit]`` whose padded per-device tokens fit, or ``limit + 1``.

    Per-device tokens ``sum_i 2 * ceil(L_i / 2d)`` never grow with ``d`` (d >= 2), so bisect.
    """
    if start <= 1 and int(lengths.sum()) <= tokens_per_device:
        return 1
    low, high = max(2, start), limit
    if low > high:
        return limit + 1

    def fits(degree: int) -> bool:
        return int((2 * -(-lengths // (2 * degree))).sum()) <= tokens_per_device

    if not fits(high):
        return limit + 1
    while low < high:
        middle = (low + high) // 2
        if fits(middle):
            high = middle
        else:
            low = middle + 1
    return low


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
    needed, which keeps tables short; a first guess of each width from the degree-1 work is
    doubled until the row reaches ``target`` or its ``max_degree``.
    """
    num_bins = len(bin_lengths)
    sizes = np.array([len(lengths) for lengths in bin_lengths], dtype=np.int64)
    flat_lengths = np.concatenate(bin_lengths) if num_bins else np.zeros(0, dtype=np.int64)
    flat_bins = np.repeat(np.arange(num_bins), sizes)
    degree_one_work = np.bincount(flat_bins, weights=cost.sample_costs(flat_lengths, 1), minlength=num_bins)
    headroom = max(target - cost.overhead_s, 1e-12)
    guess = np.ceil(degree_one_work / headroom).astype(np.int64) + 2 - min_degree
    widths = np.clip(guess, 1, max_degree - min_degree + 1)
    final: dict[int, tuple[np.ndarray, np.ndarray]] = {}
    pending = np.arange(num_bins)
    starts = np.concatenate([[0], np.cumsum(sizes)])
    while pending.size:
        times = _tables_for(pending, widths, min_degree, max_degree, starts, flat_lengths, cost, node_size)
        retry = []
        for bin_index, row in zip(pending.tolist(), times, strict=True):
            envelope = np.minimum.accumulate(row)
            full = widths[bin_index] >= max_degree[bin_index] - min_degree[bin_index] + 1
            if envelope[-1] <= target or full:
                final[bin_index] = (row, envelope)
            else:
                retry.append(bin_index)
                widths[bin_index] = min(2 * widths[bin_index], max_degree[bin_index] - min_degree[bin_index] + 1)
        pending = np.array(retry, dtype=np.int64)
    buckets = _bucket(final, num_bins)
    location = np.zeros((num_bins, 2), dtype=np.int64)
    for bucket_index, (members, _, _) in enumerate(buckets):
        location[members, 0] = bucket_index
        location[members, 1] = np.arange(len(members))
    return DegreeTable(min_degree=min_degree.copy(), buckets=buckets, location=location)


def _tables_for(
    bins: np.ndarray,
    widths: np.ndarray,
    min_degree: np.ndarray,
    max_degree: np.ndarray,
    starts: np.ndarray,
    flat_lengths: np.ndarray,
    cost: CostModel,
    node_size: int | None,
) -> list[np.ndarray]:
    """Raw time rows (one per bin in ``bins``), computed in one vectorised pass per width."""
    rows: dict[int, np.ndarray] = {}
    for width in np.unique(widths[bins]).tolist():
        chosen = bins[widths[bins] == width]
        sample_counts = starts[chosen + 1] - starts[chosen]
        sample_index = np.concatenate([np.arange(starts[b], starts[b + 1]) for b in chosen.tolist()])
        owner = np.repeat(np.arange(len(chosen)), sample_counts)
        degrees = min_degree[chosen][:, None] + np.arange(width)[None, :]
        sample_degrees = degrees[owner]
        lengths = flat_lengths[sample_index][:, None]
        chunk = 2 * sample_degrees
        padded = np.where(sample_degrees == 1, lengths, -(-lengths // chunk) * chunk).astype(np.float64)
        boundaries = np.concatenate([[0], np.cumsum(sample_counts)[:-1]])
        sum_padded = np.add.reduceat(padded, boundaries, axis=0)
        sum_squares = np.add.reduceat(padded * padded, boundaries, axis=0)
        times = cost.times_from_sums(sum_padded, sum_squares, degrees, node_size=node_size)
        times[degrees > max_degree[chosen][:, None]] = np.inf
        for position, bin_index in enumerate(chosen.tolist()):
            rows[bin_index] = times[position]
    return [rows[bin_index] for bin_index in bins.tolist()]


def _bucket(rows: dict[int, tuple[np.ndarray, np.ndarray]], num_bins: int) -> list:
    """Group rows by width rounded up to a power of two, padding the tail with the last value."""
    by_width: dict[int, list[int]] = {}
    for bin_index in range(num_bins):
        width = len(rows[bin_index][0])
        by_width.setdefault(1 << (width - 1).bit_length(), []).append(bin_index)
    buckets = []
    for width, members in sorted(by_width.items()):
        times = np.full((len(members), width), np.inf)
        envelope = np.empty((len(members), width))
        for position, bin_index in enumerate(members):
            row, env = rows[bin_index]
            times[position, : len(row)] = row
            envelope[position, : len(env)] = env
            envelope[position, len(env) :] = env[-1]
        buckets.append((np.array(members, dtype=np.int64), times, envelope))
    return buckets


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


def spend_leftover(table: DegreeTable, degrees: np.ndarray, num_devices: int) -> np.ndarray:
    """Give unused devices, one at a time, to the slowest bin that gets strictly faster with one more."""
    degrees = degrees.copy()
    leftover = num_devices - int(degrees.sum())
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
