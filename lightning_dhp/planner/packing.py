"""Stage 1 of a round: size the groups, pack samples into bins, and refine bin membership.

Sizing: for a makespan ``T`` every sample that cannot run on one device within ``T`` (it needs
more memory than one device, or its degree-1 time exceeds ``T``) gets a group of its own at the
fewest devices reaching ``T``; the rest form a pool of degree-1 bins, ``max(ceil(tokens / C),
ceil(work / (T - overhead)))`` of them (and, under a vision budget ``V``, at least ``ceil(patches /
V)``; what the singles can hold of each comes off first). A binary search finds the smallest ``T``
that fits the devices. Packing: the singles open their groups, every remaining device becomes a
degree-1 bin, and the pool samples go longest first to the bin where they finish earliest among
those with memory left (memory-aware longest-processing-time / best-fit decreasing). Memory is
padded tokens and, under a vision budget, vision patches (:mod:`.memory`). Refinement
(:mod:`.refine`) then improves bin membership.
"""

from __future__ import annotations

import bisect
import heapq
import math
import operator
from dataclasses import dataclass

import numpy as np

from lightning_dhp.planner.allocation import table_from_flat
from lightning_dhp.planner.cost_model import take
from lightning_dhp.planner.lpt import WAVE_MIN_BINS, WAVE_MIN_ITEMS, next_wave
from lightning_dhp.planner.memory import fits_memory
from lightning_dhp.planner.problem import Problem
from lightning_dhp.planner.rounds import heaviest_first


def size_round(problem: Problem) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """(single positions, their degrees, pool positions) for the smallest feasible makespan.

    None when even minimum degrees and a memory-full pool need more devices than there are.
    """
    lengths, min_degree = problem.lengths, problem.min_degree
    capacity, overhead = problem.tokens_per_device, problem.cost.overhead_s
    alone_time = overhead + problem.sample_costs(slice(None), np.ones_like(lengths))
    multi = min_degree > 1
    candidates = np.flatnonzero(multi | (alone_time > problem.lower_bound))
    table = table_from_flat(
        lengths[candidates],
        np.ones(len(candidates), dtype=np.int64),
        min_degree[candidates],
        np.full(len(candidates), problem.num_devices, dtype=np.int64),
        problem.lower_bound,
        problem.cost,
        problem.node_size,
        take(problem.patches, candidates),
    )
    candidate_lengths = lengths[candidates]
    candidate_multi = multi[candidates]
    candidate_alone = alone_time[candidates]
    one_device = ~multi
    total_work = float((alone_time[one_device] - overhead).sum())
    total_tokens = int(lengths[one_device].sum())
    patch_budget = problem.patch_budget
    if patch_budget is not None:
        candidate_patches = problem.patches[candidates]
        total_patches = int(problem.patches[one_device].sum())

    def needed(makespans: np.ndarray) -> np.ndarray:
        """Devices the singles and the pool need at each of ``makespans`` (inf: unreachable)."""
        degrees, times = table.degrees_and_times_at(makespans)
        single = candidate_multi | (candidate_alone > makespans[:, None])
        leaving = single & ~candidate_multi
        devices = np.where(single, degrees, 0).sum(axis=1)
        work = total_work - np.where(leaving, candidate_alone - overhead, 0.0).sum(axis=1)
        tokens = total_tokens - np.where(leaving, candidate_lengths, 0).sum(axis=1)
        with np.errstate(divide="ignore", invalid="ignore"):
            # the pool first fills the time and memory the singles leave free; a single takes pool
            # work only while it has both, so it holds at most min(spare time, spare tokens x the
            # pool's work per token) (time-full singles hold no tokens, memory-full ones no work)
            density = work / np.maximum(tokens, 1)
            spare_time = np.where(single, np.maximum(0.0, makespans[:, None] - times) * degrees, 0.0)
            spare_tokens = np.where(single, degrees * capacity - problem.padded(candidate_lengths, degrees), 0)
            lendable = np.minimum(spare_time, spare_tokens * density[:, None])
            if patch_budget is not None:  # ... and at most its spare patches x the pool's work per patch
                patches = total_patches - np.where(leaving, candidate_patches, 0).sum(axis=1)
                patch_density = work / np.maximum(patches, 1)
                spare_patches = np.where(single, degrees * patch_budget - candidate_patches, 0)
                lendable = np.minimum(
                    lendable, np.where((patches > 0)[:, None], spare_patches * patch_density[:, None], np.inf)
                )
            usable = lendable.sum(axis=1)
            by_work = np.ceil(np.maximum(0.0, work - usable) / (makespans - overhead) - 1e-9)
            usable_tokens = np.where(density > 0, usable / density, spare_tokens.sum(axis=1))
            pool_bins = np.maximum(by_work, np.ceil(np.maximum(0.0, tokens - usable_tokens) / capacity - 1e-9))
            if patch_budget is not None:  # the pool's patches the singles cannot hold need bins too
                usable_patches = np.where(patch_density > 0, usable / patch_density, spare_patches.sum(axis=1))
                by_patches = np.ceil(np.maximum(0.0, patches - usable_patches) / patch_budget - 1e-9)
                pool_bins = np.maximum(pool_bins, by_patches)
        pooled = np.where(makespans > overhead, devices + pool_bins, np.inf)
        result = np.where(tokens == 0, devices, pooled)
        return np.where((np.isinf(times) & single).any(axis=1), np.inf, result)

    def narrow(tried: np.ndarray, low: float, high: float) -> tuple[float, float]:
        """The last of the ascending makespans ``tried`` that misses and the first that fits."""
        fits = needed(tried) <= problem.num_devices
        first = int(np.argmax(fits)) if fits.any() else len(tried)
        return (float(tried[first - 1]) if first else low), (float(tried[first]) if first < len(tried) else high)

    # the smallest makespan the devices suffice for, to a relative sizing_tolerance, trying several
    # makespans per pass: first a fine geometric grid up to twice the lower bound (where the answer
    # usually lies) with doublings beyond it and infinity, then even grids between a miss and a fit
    options = problem.options
    points = max(2, min(options.sizing_points, options.sizing_entries // max(1, table.size)))
    low = max(problem.lower_bound, table.floor_time() if len(candidates) else 0.0, 1e-9)
    first = np.concatenate([low * 2.0 ** (np.arange(points // 2) / (points // 2)), low * 2.0 ** np.arange(1, 31),
                            [math.inf]])
    low, high = narrow(first, low, math.inf)
    if high == math.inf and needed(np.array([math.inf]))[0] > problem.num_devices:
        return None
    while high == math.inf:
        low, high = narrow(low * 2.0 ** np.arange(1, points + 1), low, high)
    for _ in range(100):
        if high - low <= options.sizing_tolerance * high:
            break
        low, high = narrow(low + (high - low) * np.arange(1, points + 1) / (points + 1), low, high)
    makespan = high
    single_degrees = table.degrees_at(makespan) if len(candidates) else np.zeros(0, dtype=np.int64)
    is_single = multi[candidates] | (alone_time[candidates] > makespan)
    singles = candidates[is_single]
    in_pool = np.ones(len(lengths), dtype=bool)
    in_pool[singles] = False
    return singles, single_degrees[is_single], np.flatnonzero(in_pool)


def pack_round(
    problem: Problem, singles: np.ndarray, single_degrees: np.ndarray, pool: np.ndarray
) -> list[list[int]] | None:
    """Bins (lists of local positions): one per single, plus degree-1 bins for the pool.

    Pool samples go longest first to the bin that finishes earliest with them among those with
    memory left (tokens, and vision patches under a vision budget). None when some sample fits no bin.
    This LPT is not :func:`~lightning_dhp.planner.rounds.balanced_assignment`'s: its bins have several
    degrees, each with its own padding, time and memory per sample; one loop serving both (tried in issue
    23) made the many calls of ``balanced_assignment``, whose bins are identical, 1.3-2x slower. It shares
    the ways of going faster with the same result: the first samples go in waves (:func:`_pack_in_waves`),
    then one at a time, each class's bins in a heap by time. Where no class's need grows from one sample to
    the next (always without a vision budget, the samples going longest first), each class's first bin is kept
    one with room (:func:`_pack_by_descending_needs`); otherwise (a vision budget, or a cost model under which
    longer is not costlier) when a class's earliest bin is too full, one vectorised pass finds its earliest bin
    with room.
    """
    capacity, patch_budget = problem.tokens_per_device, problem.patch_budget
    pool_bins = min(problem.num_devices - int(single_degrees.sum()), len(pool))
    if len(pool) and pool_bins < 1 and len(singles) == 0:
        return None
    degrees = np.concatenate([single_degrees, np.ones(pool_bins, dtype=np.int64)]).astype(np.int64)
    members: list[list[int]] = [[int(position)] for position in singles.tolist()] + [[] for _ in range(pool_bins)]
    tokens = problem.padded(problem.lengths[singles], single_degrees).tolist() + [0] * pool_bins
    times = (
        problem.cost.times_from_sums(0.0, 0.0, degrees, node_size=problem.node_size)
        + np.concatenate([problem.sample_costs(singles, single_degrees), np.zeros(pool_bins)])
    ).tolist()
    classes = np.unique(degrees).tolist()
    pool_costs = problem.sample_costs(pool[:, None], np.array(classes)[None, :])
    pool_padded = problem.padded(problem.lengths[pool][:, None], np.array(classes)[None, :])
    order = heaviest_first(pool_costs[:, 0])  # the pool's positions ascend: ties go to the lower position
    smallest_lengths = np.minimum.accumulate(problem.lengths[pool][order][::-1])[::-1]
    times_array, tokens_array = np.array(times), np.array(tokens, dtype=np.int64)
    class_bins = [np.flatnonzero(degrees == degree) for degree in classes]
    vision = patch_budget is not None
    # a class's bins as a slice where they are contiguous (the pool's): it copies nothing
    class_views = [slice(bins[0], bins[-1] + 1) if bins[-1] - bins[0] + 1 == len(bins) else bins
                   for bins in class_bins]
    limits = [degree * capacity for degree in classes]
    patch_limits = [degree * patch_budget if vision else None for degree in classes]
    held_array = np.array(problem.patches[singles].tolist() + [0] * pool_bins, dtype=np.int64) if vision else None
    ordered_patches = problem.patches[pool][order] if vision else None
    fewest_patches = np.minimum.accumulate(ordered_patches[::-1])[::-1] if vision else None
    start = 0
    if max(map(len, class_bins)) >= WAVE_MIN_BINS:
        start = _pack_in_waves(
            _PackState(times_array, tokens_array, held_array, members, class_bins, limits, patch_limits),
            pool_costs[order], pool_padded[order], ordered_patches, pool[order], smallest_lengths, fewest_patches,
        )
    if start:  # the waves changed the arrays
        times, tokens = times_array.tolist(), tokens_array.tolist()
    rest = order[start:]  # the samples left to the loop, in packing order (lists read one item faster)
    rest_needs = pool_padded[rest]
    if not vision and _needs_descend(rest_needs):
        packed = _pack_by_descending_needs(times, (degrees * capacity - tokens_array).tolist(), members, class_bins,
                                           pool_costs[rest].tolist(), rest_needs.T.tolist(), pool[rest].tolist())
        return [bin_members for bin_members in members if bin_members] if packed else None
    class_heaps = []
    for bins in class_bins:
        heap = [(times[bin_index], bin_index) for bin_index in bins.tolist()]
        heapq.heapify(heap)
        class_heaps.append(heap)
    smallest_left = smallest_lengths.tolist()
    cost_rows, need_rows, rest_samples = pool_costs[rest].tolist(), rest_needs.tolist(), pool[rest].tolist()
    if vision:  # the same bookkeeping for the vision patches
        held = held_array.tolist()
        patch_rows = problem.patches[pool].tolist()
        fewest_patches_left = fewest_patches.tolist()
    class_rows = list(zip(range(len(classes)), class_heaps, limits, patch_limits, strict=True))
    for rank_in_order, item, item_costs, item_needs, sample in zip(
        range(start, len(order)), rest.tolist(), cost_rows, need_rows, rest_samples, strict=True
    ):
        smallest = smallest_left[rank_in_order]
        best_finish, best_class, best_bin = math.inf, -1, -1
        for class_position, heap, limit, patch_limit in class_rows:
            need = item_needs[class_position]
            # the heap's first time is at most that of any bin of the class with room: skip classes that cannot win
            cost = item_costs[class_position]
            if not heap or heap[0][0] + cost >= best_finish:
                continue
            while heap and (
                limit - tokens[heap[0][1]] < smallest  # full for good
                or heap[0][0] != times[heap[0][1]]  # stale: the bin has grown since this entry
                or (vision and patch_limit - held[heap[0][1]] < fewest_patches_left[rank_in_order])
            ):
                heapq.heappop(heap)
            if not heap:
                continue
            candidate = heap[0][1]
            if tokens[candidate] + need > limit or (
                vision and held[candidate] + patch_rows[item] > patch_limit
            ):  # earliest bin too full: earliest one with room
                view = class_views[class_position]
                room_mask = fits_memory(tokens_array[view], limit - need,
                                        held_array[view] + patch_rows[item] if vision else None, patch_limit)
                room_times = np.where(room_mask, times_array[view], np.inf)
                position = int(room_times.argmin())
                if room_times[position] == math.inf:  # no bin of the class has room
                    continue
                candidate = int(class_bins[class_position][position])
            finish = times[candidate] + cost
            if finish < best_finish:
                best_finish, best_class, best_bin = finish, class_position, candidate
        if best_bin < 0:
            return None
        times[best_bin] = best_finish
        tokens[best_bin] += item_needs[best_class]
        times_array[best_bin], tokens_array[best_bin] = best_finish, tokens[best_bin]  # for the search
        if vision:
            held[best_bin] += patch_rows[item]
            held_array[best_bin] = held[best_bin]
        members[best_bin].append(sample)
        heap = class_heaps[best_class]
        if heap[0][1] == best_bin:  # its entry is first: replace it in one step
            heapq.heapreplace(heap, (best_finish, best_bin))
        else:  # its old entry goes stale
            heapq.heappush(heap, (best_finish, best_bin))
    return [bin_members for bin_members in members if bin_members]


def _needs_descend(needs: np.ndarray) -> bool:
    """Whether no column of ``needs`` (samples by degree class) grows from one row to the next."""
    return bool((needs[1:] <= needs[:-1]).all())


def _pack_by_descending_needs(
    times: list[float],
    rooms: list[int],
    members: list[list[int]],
    class_bins: list[np.ndarray],
    cost_rows: list[list[float]],
    need_columns: list[list[int]],
    samples: list[int],
) -> bool:
    """:func:`pack_round`'s one-at-a-time loop where no class's need grows from one sample to the next, with the
    same choices for less work per sample: each class's first bin is kept one with room for the sample at hand
    (needs only shrink, so it stays one until it takes a sample), and a sample reads one time per class. A bin
    too full for the next sample leaves its class's heap until the first sample it has room for (a bisection of
    the class's needs), or for good.

    ``times`` and ``rooms`` (tokens left) per bin, ``members`` (filled in place), each class's bins; per sample
    in packing order its cost per class (``cost_rows``), each class's needs (``need_columns``) and its position
    (``samples``). False when some sample fits no bin.
    """
    count = len(samples)
    heaps = []
    for bins in class_bins:
        heap = [(times[bin_index], bin_index) for bin_index in bins.tolist()]
        heapq.heapify(heap)
        heaps.append(heap)
    for column in need_columns:
        column.append(0)  # after the last sample: every bin has room
    # per sample, the (class, time, bin) entries that return to their heaps before it
    returning: list[list[tuple[int, float, int]] | None] = [None] * count

    def keep_first_with_room(class_position: int, rank: int) -> None:
        """Take the class's first bins out of its heap until one has room for the sample of ``rank``."""
        heap, column = heaps[class_position], need_columns[class_position]
        while heap and rooms[heap[0][1]] < column[rank]:
            first_time, first_bin = heapq.heappop(heap)
            due = bisect.bisect_left(column, -rooms[first_bin], rank + 1, count, key=operator.neg)
            if due < count:  # the first later sample with a need it has room for
                returning[due] = (returning[due] or []) + [(class_position, first_time, first_bin)]

    for class_position in range(len(heaps)):
        keep_first_with_room(class_position, 0)
    numbered_heaps = list(enumerate(heaps))
    for rank, sample, item_costs, returned in zip(range(count), samples, cost_rows, returning, strict=True):
        if returned is not None:
            for class_position, first_time, bin_index in returned:
                heapq.heappush(heaps[class_position], (first_time, bin_index))
        best_finish, best_class = math.inf, -1
        for class_position, heap in numbered_heaps:  # the first class wins ties (the smaller degree)
            if heap:
                finish = heap[0][0] + item_costs[class_position]
                if finish < best_finish:
                    best_finish, best_class = finish, class_position
        if best_class < 0:
            return False
        heap, column = heaps[best_class], need_columns[best_class]
        bin_index = heap[0][1]
        rooms[bin_index] -= column[rank]
        members[bin_index].append(sample)
        heapq.heapreplace(heap, (best_finish, bin_index))
        if rooms[heap[0][1]] < column[rank + 1]:
            keep_first_with_room(best_class, rank + 1)
    return True


@dataclass(frozen=True)
class _PackState:
    """What :func:`pack_round` keeps per bin (times, padded tokens, vision patches or None, members) and per
    degree class (its bins, token and patch limits); the arrays and lists change in place."""

    times: np.ndarray
    tokens: np.ndarray
    held: np.ndarray | None
    members: list[list[int]]
    class_bins: list[np.ndarray]
    limits: list[int]
    patch_limits: list[int | None]


def _pack_in_waves(
    state: _PackState,
    costs: np.ndarray,
    needs: np.ndarray,
    patches: np.ndarray | None,
    samples: np.ndarray,
    smallest_lengths: np.ndarray,
    fewest_patches: np.ndarray | None,
) -> int:
    """Pack the first pool samples in waves (:mod:`.lpt`) into the degree class of the most bins (at least
    :data:`~.lpt.WAVE_MIN_BINS`), as :func:`pack_round`'s loop would; returns how many it packed (the loop
    takes the rest).

    ``costs`` and ``needs``: each sample's time and padded tokens per class, ``patches`` its vision patches
    (None: no vision budget), ``samples`` its local position, all in packing order; ``smallest_lengths`` and
    ``fewest_patches``: the least of each from a sample on. A wave's sample also has to finish no later in
    the wave's class than at the least-loaded open bin of any other class (strictly earlier than in a class
    of smaller degree, which wins ties)."""
    counts = [len(bins) for bins in state.class_bins]
    wave_class = counts.index(max(counts))
    start = 0
    while start < len(samples):
        ahead = slice(start, start + counts[wave_class])
        fewest = int(fewest_patches[start]) if patches is not None else 0
        wave = next_wave(state.times, state.tokens, state.held, state.class_bins[wave_class], state.limits[wave_class],
                         state.patch_limits[wave_class], costs[ahead, wave_class], needs[ahead, wave_class],
                         take(patches, ahead), int(smallest_lengths[start]), fewest)
        finishes = wave.loads_after
        ahead = slice(start, start + len(finishes))
        elsewhere = np.ones(len(finishes), dtype=bool)
        for class_position, bins in enumerate(state.class_bins):
            if class_position == wave_class:
                continue
            open_mask = state.limits[class_position] - state.tokens[bins] >= smallest_lengths[start]
            if patches is not None:
                open_mask &= state.patch_limits[class_position] - state.held[bins] >= fewest
            if not open_mask.any():
                continue
            other = state.times[bins[open_mask]].min() + costs[ahead, class_position]
            elsewhere &= other > finishes if class_position < wave_class else other >= finishes
        kept = wave.kept(elsewhere)
        targets, taken = wave.bins[:kept], slice(start, start + kept)
        state.times[targets] = finishes[:kept]
        state.tokens[targets] += needs[taken, wave_class]
        if patches is not None:
            state.held[targets] += patches[taken]
        for bin_index, sample in zip(targets.tolist(), samples[taken].tolist(), strict=True):
            state.members[bin_index].append(sample)
        start += kept
        if kept < WAVE_MIN_ITEMS:
            break
    return start
