"""Splitting a batch into rounds, the balanced assignment it uses, and the makespan lower bound."""

from __future__ import annotations

import heapq
import math

import numpy as np

from lightning_dhp.planner.cost_model import CostModel, padded_lengths, take
from lightning_dhp.planner.lpt import WAVE_MIN_BINS, WAVE_MIN_ITEMS, next_wave
from lightning_dhp.planner.memory import fits_memory, vision_budget

SCAN_MAX_BINS = 4
"""Over at most this many bins, :func:`balanced_assignment` scans them all for each item instead of keeping a
heap (half the time of splitting 8,192 samples into their 2-4 rounds)."""


SORT_KEYS_MIN_ITEMS = 1024
"""From this many items on, :func:`heaviest_first` sorts integer keys instead of calling ``np.lexsort`` (below
it, the keys' set-up costs more than they save)."""


def minimum_rounds(
    lengths: np.ndarray,
    num_devices: int,
    tokens_per_device: int,
    patches: np.ndarray | None = None,
    vision_patches_per_device: int | None = None,
) -> int:
    """Rounds needed by memory alone: every token occupies at least one slot of one device, and so does
    every vision patch under a vision budget (``patches`` and ``vision_patches_per_device``, None: none)."""
    rounds = max(1, -(-int(lengths.sum()) // (num_devices * tokens_per_device)))
    budget = vision_budget(patches, vision_patches_per_device)
    if budget is None:
        return rounds
    return max(rounds, -(-int(patches.sum()) // (num_devices * budget)))


def balanced_assignment(
    work: np.ndarray,
    size: np.ndarray,
    num_bins: int,
    bin_degree: int,
    tokens_per_device: int,
    patches: np.ndarray | None = None,
    vision_patches_per_device: int | None = None,
) -> list[list[int]] | None:
    """Items heaviest first to the least-loaded bin with room (LPT); None if one fits nowhere.

    A bin spans ``bin_degree`` devices: it holds ``size`` (padded tokens) up to ``bin_degree x
    tokens_per_device`` and, under a vision budget (``patches``: each item's vision patches, and
    ``vision_patches_per_device``, None: none), patches up to ``bin_degree x vision_patches_per_device``.
    Ties break on the lower item and bin index, so the result is deterministic. Over many bins the items
    go in waves first (:mod:`.lpt`: the same result, many items per numpy pass), then one at a time: the
    heap holds (load, bin) entries, stale ones (the bin has grown since) and bins too full for any item
    left are dropped lazily; when the least-loaded bin lacks room for an item, one vectorised pass finds
    the least-loaded bin that has it (or that none has: memory-bound layouts often try too few rounds).
    Over at most :data:`SCAN_MAX_BINS` bins, a scan of them all replaces the heap (:func:`_scan_assignment`).
    """
    capacity = bin_degree * tokens_per_device
    order = heaviest_first(work)
    ordered_size = np.asarray(size)[order]
    ordered_work = np.asarray(work, dtype=np.float64)[order]
    smallest_sizes = np.minimum.accumulate(ordered_size[::-1])[::-1]
    load_array, used_array = np.zeros(num_bins), np.zeros(num_bins, dtype=np.int64)
    members: list[list[int]] = [[] for _ in range(num_bins)]
    budget = vision_budget(patches, vision_patches_per_device)
    vision = budget is not None
    patch_capacity = None if budget is None else bin_degree * budget
    ordered_patches = np.asarray(patches)[order] if vision else None
    if num_bins <= SCAN_MAX_BINS:
        return _scan_assignment(order.tolist(), ordered_size.tolist(), ordered_work.tolist(),
                                ordered_patches.tolist() if vision else None, num_bins, capacity, patch_capacity)
    held_array = np.zeros(num_bins, dtype=np.int64) if vision else None
    fewest_patches = np.minimum.accumulate(ordered_patches[::-1])[::-1] if vision else None
    start, every_bin = 0, np.arange(num_bins)
    while num_bins >= WAVE_MIN_BINS and start < len(order):
        wave = next_wave(load_array, used_array, held_array, every_bin, capacity, patch_capacity,
                         ordered_work[start : start + num_bins], ordered_size[start : start + num_bins],
                         take(ordered_patches, slice(start, start + num_bins)), int(smallest_sizes[start]),
                         int(fewest_patches[start]) if vision else 0)
        kept = wave.kept()
        targets, taken = wave.bins[:kept], slice(start, start + kept)
        load_array[targets] = wave.loads_after[:kept]
        used_array[targets] += ordered_size[taken]
        if vision:
            held_array[targets] += ordered_patches[taken]
        for bin_index, item in zip(targets.tolist(), order[taken].tolist(), strict=True):
            members[bin_index].append(item)
        start += kept
        if kept < WAVE_MIN_ITEMS:
            break
    item_sizes, item_work = ordered_size.tolist(), ordered_work.tolist()
    smallest_left = smallest_sizes.tolist()
    heap = [(load, bin_index) for bin_index, load in enumerate(load_array.tolist())]
    heapq.heapify(heap)
    load, used = load_array.tolist(), used_array.tolist()
    if vision:  # the same bookkeeping for the vision patches
        item_patches = ordered_patches.tolist()
        fewest_patches_left = fewest_patches.tolist()
        held = held_array.tolist()
    for position, item in enumerate(order.tolist()[start:], start):
        need = item_sizes[position]
        while heap and (
            heap[0][0] != load[heap[0][1]]  # stale: the bin has grown since this entry
            or capacity - used[heap[0][1]] < smallest_left[position]  # full for good
            or (vision and patch_capacity - held[heap[0][1]] < fewest_patches_left[position])
        ):
            heapq.heappop(heap)
        if not heap:
            return None
        bin_index = heap[0][1]
        if used[bin_index] + need > capacity or (vision and held[bin_index] + item_patches[position] > patch_capacity):
            # rare here (unlike in pack_round): the bins' arrays are made for the search, not kept in step
            room = fits_memory(np.array(used) + need, capacity,
                               np.array(held) + item_patches[position] if vision else None, patch_capacity)
            if not room.any():
                return None
            bin_index = int(np.argmin(np.where(room, load, np.inf)))
        load[bin_index] += item_work[position]
        used[bin_index] += need
        if vision:
            held[bin_index] += item_patches[position]
        members[bin_index].append(item)
        if heap[0][1] == bin_index:  # its entry is first: replace it in one step
            heapq.heapreplace(heap, (load[bin_index], bin_index))
        else:  # its old entry goes stale
            heapq.heappush(heap, (load[bin_index], bin_index))
    return members


def heaviest_first(work: np.ndarray) -> np.ndarray:
    """Item indices by descending (finite) ``work``, the lower index first on ties: ``np.lexsort((arange,
    -work))``. From :data:`SORT_KEYS_MIN_ITEMS` items on, one sort of integer keys (each item's rank among the
    distinct works, then its index) gives the same order in half the time."""
    count = len(work)
    if count < SORT_KEYS_MIN_ITEMS:
        return np.lexsort((np.arange(count), -work))
    distinct, rank = np.unique(work, return_inverse=True)
    return np.sort((len(distinct) - 1 - rank) * count + np.arange(count)) % count


def _scan_assignment(
    items: list[int],
    sizes: list[int],
    work: list[float],
    patches: list[int] | None,
    num_bins: int,
    capacity: int,
    patch_capacity: int | None,
) -> list[list[int]] | None:
    """:func:`balanced_assignment` over few bins: each item (in the order given) to the bin of least load, the
    lowest index on ties, among those with room for it (what the heap and its search choose), or None."""
    load, room = [0.0] * num_bins, [capacity] * num_bins
    patch_room = [patch_capacity] * num_bins if patches is not None else None
    members: list[list[int]] = [[] for _ in range(num_bins)]
    bins = range(num_bins)
    every_patches = patches if patches is not None else [0] * len(items)
    for item, need, item_work, item_patches in zip(items, sizes, work, every_patches, strict=True):
        chosen, least = -1, math.inf
        for bin_index in bins:  # the load first: over two bins it rules one out half the time
            if load[bin_index] < least and need <= room[bin_index] and (
                patch_room is None or item_patches <= patch_room[bin_index]
            ):
                chosen, least = bin_index, load[bin_index]
        if chosen < 0:
            return None
        load[chosen] = least + item_work
        room[chosen] -= need
        if patch_room is not None:
            patch_room[chosen] -= item_patches
        members[chosen].append(item)
    return members


def device_seconds(
    lengths: np.ndarray, min_degree: np.ndarray, cost: CostModel, patches: np.ndarray | None = None
) -> np.ndarray:
    """Lower bound on the device-seconds each sample costs at any degree it can run at.

    ``d * sample_cost(L, V, d) = a P^2 + (b + ring(d)) P + vision V`` with ``P >= L`` and
    ``ring(d) = (d - 1) (1 - overlap) kv_bytes / bandwidth``, which is smallest at ``min_degree``
    with the faster of the two bandwidths; ``V`` the sample's vision ``patches`` (None: none).
    """
    lengths_f = lengths.astype(np.float64)
    bandwidth = max(cost.intra_node_bytes_per_s, cost.inter_node_bytes_per_s)
    ring = (min_degree - 1) * (1.0 - cost.comm_overlap) * cost.kv_bytes_per_token / bandwidth
    work = cost.attention_s_per_token2 * lengths_f * lengths_f + (cost.linear_s_per_token + ring) * lengths_f
    return work if patches is None else work + cost.vision_s_per_patch * patches


def lower_bound(
    lengths: np.ndarray,
    min_degree: np.ndarray,
    num_devices: int,
    num_rounds: int,
    cost: CostModel,
    node_size: int | None,
    patches: np.ndarray | None = None,
) -> float:
    """Lower bound on the summed round makespans of any plan with at least ``num_rounds`` rounds
    (``patches``: each sample's vision patches, None: none): :func:`bound_from_parts` of the samples'
    :func:`device_seconds` and the longest sample's :func:`fastest_alone`."""
    work = device_seconds(lengths, min_degree, cost, patches)
    index = int(np.argmax(lengths))
    longest = slice(index, index + 1)
    fastest = fastest_alone(lengths[longest], min_degree[longest], num_devices, cost, node_size, take(patches, longest))
    return bound_from_parts(float(work.sum()), float(fastest[0]), num_devices, num_rounds, cost)


def bound_from_parts(work: float, longest_alone: float, num_devices: int, num_rounds: int, cost: CostModel) -> float:
    """``max(rounds * overhead + total device-seconds / devices, best time of the longest sample
    + (rounds - 1) * overhead)``: every round pays the overhead, the work (``work``, in device-seconds) has
    to be spread over at most ``num_devices``, and the longest sample runs somewhere at its fastest degree
    (``longest_alone``) at best."""
    spread = num_rounds * cost.overhead_s + work / num_devices
    return max(spread, longest_alone + (num_rounds - 1) * cost.overhead_s)


def fastest_alone(
    lengths: np.ndarray,
    min_degree: np.ndarray,
    num_devices: int,
    cost: CostModel,
    node_size: int | None,
    patches: np.ndarray | None = None,
) -> np.ndarray:
    """Each sample's fastest time alone in a group of any degree from its minimum up to ``num_devices``
    (``patches``: each sample's vision patches, None: none)."""
    degrees = np.arange(1, num_devices + 1)
    padded = padded_lengths(lengths[:, None], degrees).astype(np.float64)
    sum_patches = None if patches is None else patches.astype(np.float64)[:, None]
    times = cost.times_from_sums(padded, padded * padded, degrees, node_size=node_size, sum_patches=sum_patches)
    return np.where(degrees >= min_degree[:, None], times, np.inf).min(axis=1)
