"""Longest-processing-time (LPT) assignment in waves: many items per numpy pass, the same result as one at a time.

Both LPT loops of the planner (:func:`~lightning_dhp.planner.rounds.balanced_assignment` and
:func:`~lightning_dhp.planner.packing.pack_round`) take items heaviest first, each to the bin of least load
(the lowest index on ties) among those with memory left for it. One item at a time costs about 1 us of
Python per item, 8-20 ms per call at 8192 samples on 1024 devices. With many bins, the next items mostly
go to distinct bins in the order of their loads, so a wave predicts that and checks it: the ``j``-th next
item goes to the ``j``-th least-loaded open bin (open: with room for the smallest item left; the others
can take no item any more), which is what one item at a time does when

- that bin has memory left for the item, and
- every bin that took an earlier item of the wave now has a load above that bin's (an equal load could
  win on a lower index: the check is conservative, and the wave stops there).

The wave keeps its longest checked prefix, in one pass of numpy over the bins. A wave that keeps few
items is not worth its pass (memory binds, or the loads are spread out): the callers then go on one item
at a time.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

WAVE_MIN_BINS = 128
"""Waves run only over at least this many bins (a wave costs about 30-60 us, one item at a time about 1 us:
with few bins a wave holds too few items to pay)."""
WAVE_MIN_ITEMS = 32
"""After a wave that keeps fewer items than this, the rest of the items go one at a time."""


@dataclass(frozen=True)
class Wave:
    """The next ``len(bins)`` items' predicted bins (distinct, least loaded first), their loads with the item,
    and whether each prediction is checked (before any cut at the first unchecked one)."""

    bins: np.ndarray
    loads_after: np.ndarray
    checked: np.ndarray

    def kept(self, checked: np.ndarray | None = None) -> int:
        """The number of items the wave keeps: those before the first unchecked one (``checked``: the
        caller's further checks, None: none)."""
        valid = self.checked if checked is None else self.checked & checked
        return len(valid) if valid.all() else int(np.argmin(valid))


def next_wave(
    load: np.ndarray,
    used: np.ndarray,
    held: np.ndarray | None,
    bins: np.ndarray,
    capacity: int,
    patch_capacity: int | None,
    work: np.ndarray,
    need: np.ndarray,
    patches: np.ndarray | None,
    smallest_need: int,
    fewest_patches: int,
) -> Wave:
    """The wave of the next items (``work``, ``need`` padded tokens and ``patches``, heaviest first, at most as
    many as there are open bins) over ``bins`` (ascending indices) of ``load``, ``used`` tokens and ``held``
    patches, each holding up to ``capacity`` tokens and ``patch_capacity`` patches (None: not checked).

    A bin is open when it holds ``smallest_need`` more tokens and ``fewest_patches`` more patches (the
    smallest of all the items left)."""
    vision = held is not None and patch_capacity is not None
    open_mask = capacity - used[bins] >= smallest_need
    if vision:
        open_mask &= patch_capacity - held[bins] >= fewest_patches
    open_bins = bins[open_mask]
    # a stable sort keeps the lower index first among equal loads, as LPT's ties do
    targets = open_bins[np.argsort(load[open_bins], kind="stable")][: len(work)]
    count = len(targets)
    before = load[targets]
    after = before + work[:count]
    checked = used[targets] + need[:count] <= capacity
    if vision:
        checked &= held[targets] + patches[:count] <= patch_capacity
    checked[1:] &= np.minimum.accumulate(after[:-1]) > before[1:]
    return Wave(targets, after, checked)
