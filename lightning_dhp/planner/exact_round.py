"""Exact layout of a small round: every partition of its samples into bins, every degree vector.

A round of few samples on few devices has few layouts: ``sum_k S(n, k) * C(N, k)`` for ``n`` samples
on ``N`` devices (Stirling numbers of the second kind times the degree vectors of ``k`` bins summing to
at most ``N``), 6,331 for 8 samples on 4 devices. Enumerating them all, side by side in numpy, finds the
round's optimal makespan in less time than the heuristic's starts and refinement take to approach it.
The bins' memory limits and times follow :mod:`.allocation` (each bin from its minimum degree up,
padded per degree, timed by the cost model), so the makespan found is the one exact allocation reaches
for the winning bins. Ranks are not placed here: the caller only enumerates rounds whose groups cannot
cross a node.
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


@dataclass(frozen=True)
class _Partitions:
    """Every partition of ``n`` samples into at most ``max_bins`` bins, laid out for matrix products."""

    labels: np.ndarray  # partition x sample: each sample's bin, bins numbered in order of first appearance
    member: np.ndarray  # sample x (partition * max_bins + bin): 1.0 where the sample is in the bin
    by_bins: tuple[np.ndarray, ...]  # [k - 1]: the partitions of exactly k bins, ascending
    max_bins: int


@functools.cache
def _partitions(num_samples: int, max_bins: int) -> _Partitions:
    """The partitions of ``num_samples`` samples into at most ``max_bins`` bins (restricted growth strings,
    in lexicographic order), remembered."""
    rows: list[tuple[int, ...]] = [()]
    for _ in range(num_samples):
        rows = [(*row, label) for row in rows for label in range(min(max(row, default=-1) + 2, max_bins))]
    labels = np.array(rows, dtype=np.int64).reshape(len(rows), num_samples)
    columns = np.arange(len(rows))[:, None] * max_bins + labels
    member = np.zeros((num_samples, len(rows) * max_bins))
    member[np.arange(num_samples)[None, :], columns] = 1.0
    bins_used = labels.max(axis=1, initial=0) + 1
    by_bins = tuple(np.flatnonzero(bins_used == k) for k in range(1, max_bins + 1))
    for array in (labels, member, *by_bins):
        array.flags.writeable = False
    return _Partitions(labels, member, by_bins, max_bins)


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
    lengths, num_devices = problem.lengths, problem.num_devices
    partitions = _partitions(len(lengths), min(len(lengths), num_devices))
    member, max_bins = partitions.member, partitions.max_bins
    degrees = np.arange(1, num_devices + 1)
    # degree x sample: padded tokens, and per-device tokens (as bin_min_degrees counts them); products with
    # member give degree x (partition, bin) sums
    padded_tokens = padded_lengths(lengths[None, :], degrees[:, None])
    per_device = padded_tokens // degrees[:, None]
    padded = padded_tokens.astype(np.float64)
    sum_padded = padded @ member
    sum_squares = (padded * padded) @ member
    fits = per_device.astype(np.float64) @ member <= problem.tokens_per_device
    start = np.ones(member.shape[1])  # each bin's largest member minimum degree (and vision minimum)
    for threshold in range(2, int(problem.min_degree.max()) + 1):
        start += (problem.min_degree >= threshold).astype(np.float64) @ member > 0
    sum_patches = None
    if problem.patches is not None:
        held = problem.patches.astype(np.float64) @ member
        sum_patches = held
        if problem.patch_budget is not None:
            start = np.maximum(start, vision_min_degrees(held.astype(np.int64), problem.patch_budget))
    times = problem.cost.times_from_sums(sum_padded, sum_squares, degrees[:, None], node_size=problem.node_size,
                                         sum_patches=sum_patches)
    # bin_min_degrees: the smallest degree from the start that fits; every degree above it is allowed
    allowed = fits[0] & (start <= 1)
    for index in range(num_devices):
        allowed = allowed | (fits[index] & (start <= index + 1))
        times[index] = np.where(allowed, times[index], np.inf)
    times = times.reshape(num_devices, -1, max_bins)  # degree x partition x bin
    best_time, best_partition = math.inf, -1
    for num_bins, chosen in enumerate(partitions.by_bins, start=1):
        if chosen.size == 0:
            continue
        vectors = _degree_vectors(num_bins, num_devices)  # layout x bin
        chosen_times = times[:, chosen, :num_bins]  # degree x partition x bin
        makespans = chosen_times[vectors[:, 0] - 1, :, 0]  # degree vector x partition
        for bin_index in range(1, num_bins):
            makespans = np.maximum(makespans, chosen_times[vectors[:, bin_index] - 1, :, bin_index])
        fastest = makespans.min(axis=0)
        index = int(np.argmin(fastest))
        if fastest[index] < best_time:
            best_time, best_partition = float(fastest[index]), int(chosen[index])
    if best_partition < 0:
        return None
    row = partitions.labels[best_partition].tolist()
    bins = [[position for position, label in enumerate(row) if label == bin_index] for bin_index in range(max(row) + 1)]
    return finished_layout(bins, times[:, best_partition, :len(bins)].T.tolist(), best_time, num_devices)


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
