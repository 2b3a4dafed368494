"""Rank placement: contiguous rank ranges for one round's groups, node boundaries respected."""

from __future__ import annotations

from dataclasses import dataclass


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
    order = sorted(range(len(degrees)), key=lambda index: (-degrees[index], index))
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
    free = []  # [start, end) per node, after the wide groups
    for node_start in range(0, num_devices, node_size):
        node_end = min(node_start + node_size, num_devices)
        start = max(node_start, cursor)
        if start < node_end:
            free.append([start, node_end])
    for index in order[len(wide) :]:
        degree = degrees[index]
        fitting = [segment for segment in free if segment[1] - segment[0] >= degree]
        if not fitting:
            largest = max((segment[1] - segment[0] for segment in free), default=0)
            return PlacementFailure(index, largest)
        segment = min(fitting, key=lambda seg: (seg[1] - seg[0], seg[0]))
        starts[index] = segment[0]
        segment[0] += degree
    return starts
