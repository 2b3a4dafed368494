"""Exact layout of a round of up to about 12 samples on few devices: branch and bound over bins.

What: the round's optimal makespan over every partition of its samples into bins and every degree
vector (as :mod:`.exact_round`, whose enumeration stops at about 8 samples on 4 devices: 9 samples have
21,404 layouts, 11 have 1.2 million). Why: the main job's rounds of 9-16 samples on 4 devices went
through starts and refinement, 2-9 ms each and up to 2% above the optimum.

How: one table of every subset's time at every degree (inf where it does not fit memory, with
:mod:`.allocation`'s rules: from its largest member's minimum degree up, padded per degree), one matrix
product over the subsets' membership bits. Then bins are chosen one at a time, each holding the lowest
sample not yet placed (so every partition is reached once), level by level for all partial layouts
side by side: a partial layout is its remaining samples, remaining devices and slowest bin so far. It is
dropped when that bin, or a lower bound on the rest (their device-seconds spread over the remaining
devices, their tokens and vision patches over the remaining memory), is no faster than the best complete
layout so far (first: a greedy layout at each uniform degree of three or more bins); of equal remaining
samples and devices only the fastest is kept (a dynamic program over subsets, restricted to what can
still win).

Complexity: the tables cost ``O(2^n (n + N))`` time for ``n`` samples on ``N`` devices, and every mask's
bins (:func:`_submasks`, built once per ``n``) ``O(3^n)`` memory (4 MB at 12 samples); the search at most
``min(n, N) - 1`` levels of at most ``pair_budget`` (partial layout, bin) pairs times ``N - 1`` degrees
each: past the budget it gives up (None), and the caller plans the round from starts instead. Without
the bounds the pairs would number ``O(3^n)``.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy as np

from lightning_dhp.planner.exact_round import ExactLayout, finished_layout, membership, subset_times
from lightning_dhp.planner.problem import Problem


@dataclass(frozen=True)
class _Submasks:
    """For every mask of ``n`` bits, its subsets that hold its lowest member but not all of it (the bins a
    partial layout of those remaining samples can place next), concatenated; read-only."""

    first: np.ndarray  # mask: where its subsets start in ``bins``
    count: np.ndarray  # mask: how many it has (2^(members - 1) - 1)
    bins: np.ndarray  # the subsets, mask after mask, each mask's in ascending order
    rests: np.ndarray  # the mask without each subset


@functools.cache
def _submasks(num_samples: int) -> _Submasks:
    """The :class:`_Submasks` of ``num_samples`` bits (``3^n / 2`` entries), built once per size."""
    masks = np.arange(1 << num_samples)
    members = membership(num_samples).sum(axis=0).astype(np.int64)
    count = np.where(masks > 0, (1 << np.maximum(members - 1, 0)) - 1, 0)
    first = np.cumsum(count) - count
    owner = np.repeat(masks, count)
    index = np.arange(int(count.sum())) - np.repeat(first, count)
    lowest = owner & -owner
    free = owner ^ lowest
    bins, rank = lowest.copy(), np.zeros_like(free)  # rank: the free members below the bit
    for bit in range(num_samples):  # the bits of index go to the free members, lowest first
        free_bit = (free >> bit) & 1
        bins |= free_bit * ((index >> rank) & 1) << bit
        rank += free_bit
    submasks = _Submasks(first, count, bins, owner ^ bins)
    for array in (submasks.first, submasks.count, submasks.bins, submasks.rests):
        array.flags.writeable = False
    return submasks


@dataclass(frozen=True)
class _SubsetTables:
    """Every subset's (mask's) time as one bin at each degree, and what bounds it, for one round."""

    times: np.ndarray  # degree - 1 x subset: the bin's time, inf where it does not fit (and for the empty set)
    fastest_within: np.ndarray  # devices - 1 x subset: the fastest single bin on at most that many devices
    bound: np.ndarray  # devices - 1 x subset: lower bound on any layout of the subset on that many devices


def _subset_tables(problem: Problem) -> _SubsetTables:
    """The round's subset tables: :func:`~.exact_round.subset_times` with the members' tokens and device-seconds
    for the bound."""
    num_devices = problem.num_devices
    subsets = subset_times(problem, (problem.lengths, problem.sample_work))
    times, (tokens, device_work), held = subsets.times, subsets.extra_sums, subsets.patches
    fastest_within = np.empty_like(times)
    fastest_within[0] = times[0]
    for index in range(1, num_devices):  # (row by row: numpy's accumulate along the short axis is slower)
        fastest_within[index] = np.minimum(times[index], fastest_within[index - 1])
    # any layout: its device-seconds spread over the devices, if its tokens (and patches) fit their memory
    degrees = np.arange(1, num_devices + 1)[:, None]
    bound = problem.cost.overhead_s + device_work / degrees
    fits = tokens <= degrees * problem.tokens_per_device
    if problem.patch_budget is not None:
        fits &= held <= degrees * problem.patch_budget
    return _SubsetTables(times, fastest_within, np.where(fits, bound, np.inf))


def search_layout(problem: Problem, pair_budget: int) -> ExactLayout | None:
    """The round's fastest layout (bins of local positions, degrees as :func:`~.exact_round.exact_layout`
    gives them), or None when no layout fits memory or the search needs more than ``pair_budget``
    (partial layout, bin) pairs at one level (the caller then plans the round from starts).

    The caller keeps ``2^n`` small (``n`` samples) and groups within one node (placement never fails).
    """
    num_samples, num_devices = len(problem.lengths), problem.num_devices
    tables = _subset_tables(problem)
    everyone = (1 << num_samples) - 1
    best, best_layout = _greedy_start(tables, num_samples, num_devices)
    one_bin = tables.fastest_within[num_devices - 1, everyone]
    if one_bin <= best:  # ties: the fewest bins
        best, best_layout = float(one_bin), [everyone]
    degree_steps = np.arange(1, num_devices)[:, None]
    submasks = _submasks(num_samples)
    # the tables flat: row r of a table starts at r * subsets (one index array per lookup, not two)
    subsets = 1 << num_samples
    fastest_flat, bound_flat = tables.fastest_within.ravel(), tables.bound.ravel()
    # one level's partial layouts (the rest of the samples, their devices, the slowest bin so far), expandable ones
    remaining, devices_left, slowest = np.array([everyone]), np.array([num_devices]), np.array([-np.inf])
    history: list[tuple[np.ndarray, np.ndarray]] = []  # per level: (parent index, bin mask) of each kept entry
    found: tuple[int, int, int] | None = None  # (level, parent index, last bin) of the best layout, once found
    for level in range(num_devices - 1):
        if remaining.size == 0:
            break
        counts = submasks.count[remaining]
        total = int(counts.sum())
        if total > pair_budget:
            return None
        if remaining.size == 1:  # one partial layout (the first level): its bins are one run of the table
            start = int(submasks.first[remaining[0]])
            pair_parent = np.zeros(total, dtype=np.int64)
            bins, rest = submasks.bins[start:start + total], submasks.rests[start:start + total]
        else:
            pair_parent = np.repeat(np.arange(remaining.size), counts)
            entry = np.repeat(submasks.first[remaining] - (np.cumsum(counts) - counts), counts) + np.arange(total)
            bins, rest = submasks.bins[entry], submasks.rests[entry]
        steps = int(devices_left.max()) - 1  # the bin's degrees: up to all but one of the most devices left
        if steps > 1:  # (on two devices the check below is this one)
            # first with one degree each: the bin at its fastest on all but one device, the rest on all but one
            all_but_one = np.repeat((devices_left - 2) * subsets, counts)  # that row of the tables
            hopeful = np.flatnonzero(
                (fastest_flat[all_but_one + bins] < best) & (bound_flat[all_but_one + rest] < best)
            )
            pair_parent, bins, rest = pair_parent[hopeful], bins[hopeful], rest[hopeful]
        # degree of the bin - 1 x pair: the rest's devices, the slowest bin with it, a bound on the rest
        rest_devices = devices_left[pair_parent] - degree_steps[:steps]
        with_bin = np.maximum(slowest[pair_parent], np.take(tables.times[:steps], bins, axis=1))
        rest_row = (np.maximum(rest_devices, 1) - 1) * subsets + rest  # the rest on its devices (at least one)
        bound = bound_flat[rest_row]
        can_win = (with_bin < best) & (bound < best)
        finished = np.where((rest_devices >= 1) & can_win, np.maximum(with_bin, fastest_flat[rest_row]), np.inf)
        if finished.size:
            step, pair = divmod(int(np.argmin(finished)), finished.shape[1])
            if finished[step, pair] < best:
                best, found = float(finished[step, pair]), (level, int(pair_parent[pair]), int(bins[pair]))
                best_layout = None
                can_win = (with_bin < best) & (bound < best)
        if level == num_devices - 2:
            break  # every partial layout is down to two devices: none can hold two bins more
        # the partial layouts that can still win and still hold two bins (flat: degree step x pair, one gather
        # each); of equal rest and devices the fastest
        flat = np.flatnonzero((rest_devices >= 2) & can_win)
        flat_devices, flat_slowest, pair = rest_devices.ravel()[flat], with_bin.ravel()[flat], flat % bins.size
        key = rest[pair] * (num_devices + 1) + flat_devices
        order = np.lexsort((flat_slowest, key))  # per key the fastest first (then the first reached)
        sorted_key = key[order]
        first = np.ones(order.size, dtype=bool)
        first[1:] = sorted_key[1:] != sorted_key[:-1]
        kept = order[first]
        pair = pair[kept]
        history.append((pair_parent[pair], bins[pair]))
        remaining, devices_left, slowest = rest[pair], flat_devices[kept], flat_slowest[kept]
    if math.isinf(best):
        return None
    masks = best_layout if best_layout is not None else _walk_back(history, found, everyone)
    masks = sorted(masks, key=lambda mask: mask & -mask)  # by lowest member
    return finished_layout([_members(mask) for mask in masks], tables.times[:, masks].T.tolist(), best, num_devices)


def _walk_back(history: list[tuple[np.ndarray, np.ndarray]], found: tuple[int, int, int] | None,
               everyone: int) -> list[int]:
    """The bins (masks) of the layout found at ``found`` = (level, parent entry, its bin), in the order chosen;
    the rest of the samples form the last bin."""
    assert found is not None
    level, index, last = found
    masks = [last]
    while level > 0:
        parents, bins = history[level - 1]
        masks.append(int(bins[index]))
        index, level = int(parents[index]), level - 1
    masks.reverse()
    leftover = everyone
    for mask in masks:
        leftover ^= mask
    return [*masks, leftover] if leftover else masks


def _members(mask: int) -> list[int]:
    return [position for position in range(mask.bit_length()) if mask >> position & 1]


def _greedy_start(tables: _SubsetTables, num_samples: int, num_devices: int) -> tuple[float, list[int] | None]:
    """The fastest greedy layout at a uniform degree (each degree with at least three bins: the search's first
    level finds the best of two bins): samples slowest first, each to the bin it leaves fastest (the first
    on ties), timed from the tables; (inf, None) when none fits. The search's first bound: the closer to the
    optimum, the fewer pairs it looks at."""
    best, best_masks = math.inf, None
    singles = tables.times[:, [1 << sample for sample in range(num_samples)]]
    for degree in range(1, num_devices // 3 + 1):
        times = tables.times[degree - 1]
        masks = [0] * (num_devices // degree)
        for sample in np.argsort(-singles[degree - 1], kind="stable").tolist():
            options = [times.item(mask | 1 << sample) for mask in masks]
            fastest = min(options)
            if math.isinf(fastest):
                break
            masks[options.index(fastest)] |= 1 << sample
        else:
            masks = [mask for mask in masks if mask]
            makespan = float(times[masks].max())
            if makespan < best:
                best, best_masks = makespan, masks
    return best, best_masks
