"""Rank placement: contiguous rank ranges for one round's groups, node boundaries respected."""

from __future__ import annotations

import heapq
from dataclasses import dataclass

import numpy as np


def crosses_node(first_rank: np.ndarray | int, degree: np.ndarray | int, node_size: int | None) -> np.ndarray:
    """Whether groups of ``degree`` contiguous ranks from ``first_rank`` span two nodes of ``node_size`` ranks
    (broadcasting; never without nodes).

    The one statement of the node rule: such a group pays the inter-node bandwidth
    (:meth:`~lightning_dhp.planner.CostModel.placed_times`), and one that fits a node must not cross one
    (:func:`needlessly_crosses_node`); :func:`place` keeps every group that fits a node inside one, so
    before placement a group crosses exactly when it is wider than a node (``times_from_sums``'s
    ``node_size``).
    """
    first = np.asarray(first_rank)
    last = first + np.asarray(degree) - 1
    if node_size is None:
        return np.zeros(np.broadcast(first, last).shape, dtype=bool)
    return first // node_size != last // node_size


def needlessly_crosses_node(
    first_rank: np.ndarray | int, degree: np.ndarray | int, node_size: int | None
) -> np.ndarray:
    """Whether groups that fit in one node (``degree <= node_size``) cross one anyway: what a node-aware plan
    must never do."""
    return crosses_node(first_rank, degree, node_size) & (np.asarray(degree) <= (node_size or 0))


@dataclass(frozen=True)
class PlacementFailure:
    """``bin_index`` found no free range; ``largest_free`` is the widest one left at that point."""

    bin_index: int
    largest_free: int


def place(degrees: list[int], num_devices: int, node_size: int | None) -> list[int] | PlacementFailure:
    """First rank of every group (input order), or the group that could not be placed.

    Without nodes, groups are laid out widest first from rank 0. With ``node_size``, groups wider
    than a node (they cross nodes anyway) are laid out first from rank 0, then the others go best
    fit decreasing into the free range of each node, so none of them crosses a node boundary.
    """
    order = sorted(range(len(degrees)), key=degrees.__getitem__, reverse=True)  # stable: ties by index
    starts = [0] * len(degrees)
    cursor = 0
    wide = [index for index in order if node_size is None or degrees[index] > node_size]
    for index in wide:
        starts[index] = cursor
        cursor += degrees[index]
    if cursor > num_devices:
        return PlacementFailure(wide[-1], 0)
    if node_size is None:
        return starts
    # free ranges inside nodes, bucketed by width: a heap of their first ranks per width
    free: list[list[int]] = [[] for _ in range(node_size + 1)]
    for node_start in range(0, num_devices, node_size):
        start, node_end = max(node_start, cursor), min(node_start + node_size, num_devices)
        if start < node_end:
            free[node_end - start].append(start)
    singles_from = len(order) - degrees.count(1)  # groups of one rank come last (widest first)
    for index in order[len(wide) : singles_from]:
        degree = degrees[index]
        # best fit: the narrowest range that holds the group, the lowest one among equals
        for width in range(degree, node_size + 1):
            if free[width]:
                break
        else:
            largest = max((width for width in range(node_size + 1) if free[width]), default=0)
            return PlacementFailure(index, largest)
        starts[index] = heapq.heappop(free[width])
        if width > degree:
            heapq.heappush(free[width - degree], starts[index] + degree)
    # best fit one group of one rank at a time takes the narrowest free range's first rank, and what is left of
    # it is then the narrowest range: the ranges go whole, narrowest first (lowest first among equals)
    free_ranks = (start + offset for width in range(1, node_size + 1) for start in sorted(free[width])
                  for offset in range(width))
    for index in order[singles_from:]:
        rank = next(free_ranks, None)
        if rank is None:
            return PlacementFailure(index, 0)
        starts[index] = rank
    return starts
