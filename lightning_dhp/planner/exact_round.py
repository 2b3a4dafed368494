"""Exact layout of a small round: every partition of its samples into bins, every degree vector.

A round of few samples on few devices has few layouts: ``sum_k S(n, k) * C(N, k)`` for ``n`` samples
on ``N`` devices (Stirling numbers of the second kind times the degree vectors of ``k`` bins summing to
at most ``N``), 6,331 for 8 samples on 4 devices. Enumerating them all, side by side in numpy, finds the
round's optimal makespan in less time than the heuristic's starts and refinement take to approach it.
The bins' memory limits and times follow :mod:`.allocation` (each bin from its minimum degree up,
padded per degree, timed by the cost model), so the makespan found is the one exact allocation reaches
for the winning bins. Ranks are not placed here: the caller only enumerates rounds whose groups cannot
cross a node.

Both exact methods (this one and :mod:`.exact_search`) time bins from one table of every subset of the
round's samples at every degree (:func:`subset_times`): 256 subsets of 8 samples, where their layouts on 4
devices have 11,180 (partition, bin) pairs, so each bin's time is looked up, not computed again.
"""

from __future__ import annotations

import functools
import itertools
import math
from dataclasses import dataclass

import numpy as np

from lightning_dhp.planner.allocation import spend_leftover
from lightning_dhp.planner.cost_model import padded_lengths
from lightning_dhp.planner.memory import vision_min_degrees
from lightning_dhp.planner.problem import Problem


@functools.cache
def layout_count(num_samples: int, num_devices: int) -> int:
    """Layouts of ``num_samples`` samples on ``num_devices`` devices: partitions into ``k`` non-empty bins
    times the degree vectors of ``k`` bins (each at least 1) summing to at most ``num_devices``."""
    most_bins = min(num_samples, num_devices)
    return sum(_stirling(num_samples, k) * math.comb(num_devices, k) for k in range(1, most_bins + 1))


@functools.cache
def _stirling(n: int, k: int) -> int:
    """Partitions of ``n`` items into ``k`` non-empty sets (Stirling numbers of the second kind)."""
    if n == k:
        return 1
    if k == 0 or k > n:
        return 0
    return k * _stirling(n - 1, k) + _stirling(n - 1, k - 1)


@functools.cache
def _partition_masks(num_samples: int, max_bins: int) -> tuple[np.ndarray, ...]:
    """The partitions of ``num_samples`` samples into at most ``max_bins`` bins (restricted growth strings, in
    lexicographic order), ``[k - 1]``: those of exactly ``k`` bins x ``k``, each bin's subset mask (bit ``s``:
    sample ``s``; bins in order of their lowest member), remembered."""
    rows: list[tuple[int, ...]] = [()]
    for _ in range(num_samples):
        rows = [(*row, label) for row in rows for label in range(min(max(row, default=-1) + 2, max_bins))]
    labels = np.array(rows, dtype=np.int64).reshape(len(rows), num_samples)
    in_bin = labels[:, :, None] == np.arange(max_bins)  # partition x sample x bin
    masks = (in_bin * (1 << np.arange(num_samples))[None, :, None]).sum(axis=1)  # partition x bin
    bins_used = labels.max(axis=1, initial=0) + 1
    by_bins = tuple(masks[bins_used == k, :k] for k in range(1, max_bins + 1))
    for array in by_bins:
        array.flags.writeable = False
    return by_bins


@functools.cache
def membership(num_samples: int) -> np.ndarray:
    """Sample x subset: 1.0 where the sample (bit) is in the subset (mask), read-only."""
    masks = np.arange(1 << num_samples)
    bits = ((masks[None, :] >> np.arange(num_samples)[:, None]) & 1).astype(np.float64)
    bits.flags.writeable = False
    return bits


@dataclass(frozen=True)
class SubsetTimes:
    """Every subset's (mask's) time as one bin at each degree, and the sums of the caller's extra rows."""

    times: np.ndarray  # degree - 1 x subset: the bin's time, inf where it does not fit (and for the empty set)
    extra_sums: np.ndarray  # extra row x subset: each extra row summed over the subset's members
    patches: np.ndarray | None  # subset: its vision patches (None: no patches)


def subset_times(problem: Problem, extra_rows: tuple[np.ndarray, ...] = ()) -> SubsetTimes:
    """The round's :class:`SubsetTimes`, from one product of per-sample rows (``extra_rows`` last but the
    patches) with the membership matrix. A bin is allowed from its largest member's minimum degree (and its
    patches' vision minimum) up, padded per degree: :mod:`.allocation`'s rules."""
    lengths, num_devices = problem.lengths, problem.num_devices
    degrees = np.arange(1, num_devices + 1)
    padded = padded_lengths(lengths[None, :], degrees[:, None])  # degree x sample
    thresholds = np.arange(2, int(problem.min_degree.max()) + 1)
    rows = [padded, padded * padded, problem.min_degree[None, :] >= thresholds[:, None],
            *(row[None, :] for row in extra_rows)]
    if problem.patches is not None:
        rows.append(problem.patches[None, :])
    # the sums that decide a bin (tokens, squares, patches, minimum degrees) are of integers: exact in float64
    sums = np.vstack(rows).astype(np.float64, copy=False) @ membership(len(lengths))
    sum_padded, sum_squares = sums[:num_devices], sums[num_devices:2 * num_devices]
    position = 2 * num_devices + len(thresholds)
    start = 1 + (sums[2 * num_devices:position] > 0).sum(axis=0)  # the largest member minimum degree
    held = None if problem.patches is None else sums[-1]
    if problem.patch_budget is not None:
        start = np.maximum(start, vision_min_degrees(held.astype(np.int64), problem.patch_budget))
    times = problem.cost.times_from_sums(sum_padded, sum_squares, degrees[:, None], node_size=problem.node_size,
                                         sum_patches=held)
    # bin_min_degrees: the smallest degree from the start that fits; every degree above it is allowed (padded
    # lengths are multiples of the degree: a bin's tokens per device are its padded sum / degree)
    allowed = (sum_padded <= degrees[:, None] * problem.tokens_per_device) & (start <= degrees[:, None])
    allowed[:, 0] = False  # the empty set is no bin
    for index in range(1, num_devices):  # (row by row: numpy's accumulate along the short axis is slower)
        allowed[index] |= allowed[index - 1]
    return SubsetTimes(np.where(allowed, times, np.inf), sums[position:position + len(extra_rows)], held)


@functools.cache
def _degree_vectors(num_bins: int, num_devices: int) -> np.ndarray:
    """Every degree vector of ``num_bins`` bins, each at least 1, summing to at most ``num_devices``
    (one row per vector, in lexicographic order), read-only."""
    vectors = np.array([degrees for degrees in itertools.product(range(1, num_devices + 1), repeat=num_bins)
                        if sum(degrees) <= num_devices], dtype=np.int64).reshape(-1, num_bins)
    vectors.flags.writeable = False
    return vectors


@dataclass(frozen=True)
class ExactLayout:
    """A round's fastest layout: bins of local sample positions, their degrees and the makespan."""

    bins: list[list[int]]
    degrees: list[int]
    makespan: float


def exact_layout(problem: Problem) -> ExactLayout | None:
    """The round's fastest layout, or None when no layout fits memory. Among equally fast layouts: the
    fewest bins, then the first partition in lexicographic order; each bin at the smallest degree that
    reaches the makespan, then unused devices given by :func:`~.allocation.spend_leftover`.

    The caller keeps :func:`layout_count` small: the work is that many layouts times their bins.
    """
    num_devices = problem.num_devices
    times = subset_times(problem).times  # degree x subset
    best_time, best_masks = math.inf, None
    for num_bins, masks in enumerate(_partition_masks(len(problem.lengths), min(len(problem.lengths), num_devices)),
                                     start=1):
        if masks.size == 0:
            continue
        vectors = _degree_vectors(num_bins, num_devices)  # layout x bin
        chosen_times = np.take(times, masks.T, axis=1)  # degree x bin x partition (rows gathered whole)
        makespans = chosen_times[vectors[:, 0] - 1, 0]  # degree vector x partition
        for bin_index in range(1, num_bins):
            makespans = np.maximum(makespans, chosen_times[vectors[:, bin_index] - 1, bin_index])
        fastest = makespans.min(axis=0)
        index = int(np.argmin(fastest))
        if fastest[index] < best_time:
            best_time, best_masks = float(fastest[index]), masks[index].tolist()
    if best_masks is None:
        return None
    bins = [[position for position in range(mask.bit_length()) if mask >> position & 1] for mask in best_masks]
    return finished_layout(bins, times[:, best_masks].T.tolist(), best_time, num_devices)


def finished_layout(bins: list[list[int]], bin_times: list[list[float]], makespan: float,
                    num_devices: int) -> ExactLayout:
    """The optimal ``bins`` (``bin_times[b][d - 1]``: bin ``b``'s time at degree ``d``, inf where it does not
    fit) as a layout: each bin at the smallest degree that reaches ``makespan``, then unused devices given by
    :func:`~.allocation.spend_leftover`."""
    degrees = [next(degree for degree, time in enumerate(row_times, start=1) if time <= makespan)
               for row_times in bin_times]
    spent = spend_leftover(_EnumeratedTimes(bin_times), np.array(degrees), num_devices)
    return ExactLayout(bins, spent.tolist(), makespan)


@dataclass(frozen=True)
class _EnumeratedTimes:
    """Each bin's enumerated time by degree (``times[b][d - 1]``, inf past the devices), as
    :func:`~.allocation.spend_leftover` reads a table."""

    times: list[list[float]]

    def time_at(self, bin_index: int, degree: int) -> float:
        row = self.times[bin_index]
        return row[degree - 1] if degree <= len(row) else math.inf
