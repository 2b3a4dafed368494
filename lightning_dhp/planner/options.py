"""``PlannerOptions``: every tuning constant of :func:`~lightning_dhp.planner.plan_batch`, with its measured reason.

The figures quoted come from ``benchmarks/planner_ablation.py`` (``benchmarks/results/planner_ablation.md``:
short-tail batches of 128 and 512 samples and memory-bound batches of 512 on 64 devices), which varies
each option with :func:`dataclasses.replace`. The defaults are the planner's; any other value is an
experiment (plans differ).
"""

from __future__ import annotations

import dataclasses
import difflib
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from lightning_dhp.errors import PlanError


@dataclass(frozen=True)
class PlannerOptions:
    """Tuning constants of the DHP planner, passed down explicitly (no module globals are read while planning).

    Every option has its annotated type (numbers >= 0; ``extra_start_degrees``: degrees >= 1, given as any
    sequence); anything else is a :class:`PlanError` naming the option.
    """

    # -- candidates: round assignments and static CP's layouts --------------------------------------------------
    static_layouts: bool = True
    """Plan static CP's power-of-two layouts as candidates (and the first incumbent): without them plans are
    25% slower on memory-bound batches and 1% at 512 samples."""
    static_bound_margin: float = 1e-9
    """Relative: a static layout is skipped only when its lower bound is clearly slower than the best so far."""
    prune_margin: float = 0.02
    """A round assignment is abandoned once its planned rounds plus the lower bounds of the rest cannot come
    within this share of the best plan so far. Rebalancing can still reorder plans this close: 0 prunes the
    assignment that wins after rebalancing (1.7% on memory-bound batches); inf costs time for nothing."""
    static_rounds_extra: int = 1
    """When memory binds, static CP's joint assignment with this many more rounds is planned round by round
    too, so short samples can leave the wide groups (0: off; 0 loses 3.1% on memory-bound batches and 0.8% at
    512; 2 gains 0.3% for 1.3x the time)."""
    static_close: float = math.inf
    """... only when the best static layout comes within this share of per-round planning (inf: whenever
    static CP needs several rounds, memory binding). 0.02 changes nothing on the ablation's batches, but
    with exact small rounds (``exact_round_layouts``) it made 32-sample ``video_digits`` batches on 4 devices
    1.1% slower on average: a better fewest-rounds plan kept the extra-round plan, faster still, from being
    planned."""
    cross_round_max_samples: int = 2048
    """The extra-round candidate, cross-round rebalancing and polish run for batches of up to this many
    samples: at 8192 samples on 1024 devices they doubled the planner time past 100 ms."""

    # -- one round: exact enumeration, or starts --------------------------------------------------------------
    exact_round_layouts: int = 12000
    """Rounds with at most this many layouts (partitions of their samples into bins times degree vectors,
    :func:`~lightning_dhp.planner.exact_round.layout_count`: 6,331 for 8 samples on 4 devices, 11,334 for 6 on
    8) whose groups cannot cross a node are solved exactly, by enumeration, instead of from starts (0:
    never). The enumeration costs 0.3-1.6 ms there, the starts and refinement 2-9 ms: the main job's
    32-sample batches on 4 devices plan in 0.55-0.99x the time (their rounds of 9-16 samples then still used
    starts), longer ones (rounds of 4-8 samples) in 0.16-0.26x, and their plans are 0.3% and 0.8% faster on
    average (with ``static_close`` inf). At 9 samples on 4 devices (21,404) it costs about 5 ms, 2-3x the
    starts. The search (``exact_search_samples``) would take 8 samples on 4 devices in 0.4 ms instead of 1.1
    ms, but it breaks ties between equally fast layouts differently: at 2,500 one recorded plan of
    ``benchmarks/planner_digests.py`` came out 0.002% slower, so the enumeration keeps them."""

    exact_search_samples: int = 12
    """Rounds of more layouts but at most this many samples, on at most ``exact_search_devices`` devices in
    one node, are solved exactly by branch and bound over bins (:mod:`~lightning_dhp.planner.exact_search`;
    0: never). On the main job's rounds of 9-11 samples on 4 devices it takes a median 0.7-1.1 ms (12 samples:
    1.8 ms) where the starts took 3.3-3.9 ms (5.5) and were up to 2% slower; its tables grow as ``2^n``, and at
    16 samples it took 30-100 ms (the starts 3.5 ms)."""
    exact_search_devices: int = 8
    """... on at most this many devices (the search has at most this many levels of bins)."""
    exact_search_pairs: int = 1 << 16
    """... unless one level of the search needs more than this many (partial layout, bin) pairs: then the
    round is planned from starts (the main job's rounds need at most a few thousand: a guard against
    inputs whose bounds prune little, where the pairs grow towards ``3^n / 2``)."""

    # -- one round: starts ------------------------------------------------------------------------------------
    extra_start_samples: int = 32
    """Rounds of up to this many samples also try the merge start and the uniform-degree starts (they pay
    0.6% on memory-bound batches, in their few-sample rounds)."""
    extra_start_degrees: tuple[int, ...] = (1, 2, 3, 4, 6, 8)
    """The degrees of the uniform starts (and the rescue starts' first tries)."""
    merge_start: bool = True
    """Small rounds also start from merged single-sample bins (the merge start: two long samples sharing a
    group)."""
    tight_memory: float = 0.75
    """One-round batches filling more than this share of all device memory also try static CP's two
    smallest power-of-two layouts as starts: when bin packing binds, wide groups pack better than the
    time-sized ones (multi-round batches get static CP's layouts over the whole batch instead)."""
    close_enough: float = 0.03
    """A round within this share of its lower bound is not refined further, nor are other starts tried
    (1% gains 0.06% at 512 samples; the example's 32-sample batches plan in 0.7x the time of 1%)."""
    start_margin: float = 0.1
    """In rounds of more than ``extra_start_samples`` samples, a start whose first allocation is this much
    slower than the best refined one is not refined (inf and 0.02 change nothing measured)."""

    # -- one round: refinement --------------------------------------------------------------------------------
    refine_passes: int = 8
    """Alternations of exact allocation and refinement per start (never binds: the step budget ends first)."""
    refine_step_budget: int = 4096
    """Refinement steps per start: this over the batch's samples, within [4, 64] (1024 loses 1.1% at 128
    samples, up to 4.6%)."""
    refine_max_samples: int = 128
    """Batches of more samples are not refined: their rounds' many samples leave the starts within a few
    hundredths of a percent of what refinement reaches (memory-bound batches: 1.2% for 1.6x the time)."""
    refine_move: bool = True
    """Refinement moves a sample of the slowest bin to another bin (0.4% at 128 samples)."""
    refine_swap: bool = True
    """... swaps one with a sample of another bin (0.3% at 128 samples, 0.3% on memory-bound batches)."""
    refine_merge: bool = True
    """... merges the slowest bin with another (0.5% at 128 samples, 0.7% on memory-bound batches)."""
    refine_split: bool = True
    """... splits the slowest bin in two (pays on the exact ILP instances of ``tests/test_planner_quality.py``)."""
    refine_improvement: float = 1 - 1e-12
    """A move is taken when it brings both touched bins below this share of the slowest bin's time (rounding
    aside: strictly faster, so the search cannot cycle)."""
    swap_partner_bins: int = 16
    """Swaps look at the samples of this many fastest bins (4 loses 0.15% at 128 samples, 0.2% on
    memory-bound batches)."""

    # -- improving the best plans: cross-round rebalancing and polish -----------------------------------------
    rebalance: bool = True
    """The best plans move and swap samples between rounds (5% on memory-bound batches, 0.6% at 512)."""
    hard_gap: float = 0.03
    """A plan more than this share above its lower bound is hard: the rebalance margin and polish apply only
    then (0 gains 0.02% at 512 for 1.6x the time)."""
    rebalance_margin: float = 0.02
    """On hard batches, plans within this share of the best one are rebalanced too, since rebalancing can
    reorder them (0: 2.1% worse on memory-bound batches)."""
    skip_static_rebalance: bool = True
    """The static plan is not rebalanced when its extra-round re-plan is a candidate (1.6x the time on
    memory-bound batches otherwise, for no gain)."""
    rebalance_max_changes_per_sample: float = 0.25
    """At most this many rebalancing changes per sample of the batch (0.5 gains 0.3% on memory-bound batches
    at 1.1x the time, 0.125 loses 1.2%)."""
    rebalance_full_budget_gap: float = 0.05
    """... in full for plans at least this far above their lower bound, proportionally fewer for closer
    ones, which have little left to gain (0: full budget always, 0.1% at 512 for 1.2x the time)."""
    rebalance_min_gain: float = 1e-9
    """A change must shorten the plan by more than this share of its time (rounding aside, any gain: 1e-5
    lost 0.8% on memory-bound batches, whose gains come in many small steps)."""
    rebalance_swaps: bool = True
    """Besides moves, rebalancing swaps samples between rounds: when memory binds, a swap is the only way to
    bring work into a round's idle time (moves only: 1% worse on memory-bound batches, 0.2% at 512)."""
    rebalance_skip_stuck: bool = True
    """A donor round whose search found nothing is skipped until a change touches it (same plans, less time)."""
    polish_steps: int = 32
    """The chosen hard multi-round plan's worst rounds are refined again with this many moves each, then
    rebalanced again (0: off; 0 loses 1.2% on memory-bound batches, 16 loses 0.45%)."""
    polish_rounds: int = 4
    """... that many rounds, those furthest above their lower bounds (all: 0.2% more for 1.6x the time)."""
    polish_rebalance_share: float = 0.25
    """... and the rebalancing after polish gets this share of the change budget."""

    # -- sizing a round's groups (binary search over the makespan) --------------------------------------------
    sizing_tolerance: float = 1e-3
    """Relative width at which the makespan search stops."""
    sizing_points: int = 32
    """Makespans the search tries side by side per pass ..."""
    sizing_entries: int = 1 << 21
    """... fewer when points x degree-table entries would exceed this (bounds the search's memory)."""

    def __post_init__(self) -> None:
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if field.type == "tuple[int, ...]":
                if isinstance(value, str | bytes) or not isinstance(value, Sequence) or not all(
                        _is_whole(item) and item >= 1 for item in value):
                    raise PlanError(f"PlannerOptions.{field.name} must be a sequence of whole numbers >= 1, got "
                                    f"{value!r}")
                object.__setattr__(self, field.name, tuple(int(item) for item in value))
            elif field.type == "bool":
                if not isinstance(value, bool):
                    raise PlanError(f"PlannerOptions.{field.name} must be True or False, got {value!r}")
            elif field.type == "int":
                if not (_is_whole(value) and value >= 0):
                    raise PlanError(f"PlannerOptions.{field.name} must be a whole number >= 0, got {value!r}")
            elif isinstance(value, bool) or not isinstance(value, int | float) or not value >= 0:
                raise PlanError(f"PlannerOptions.{field.name} must be a number >= 0 (inf allowed), got {value!r}")

    def changed(self) -> dict[str, Any]:
        """The options that differ from the defaults (name -> value), in field order."""
        return {field.name: getattr(self, field.name) for field in dataclasses.fields(self)
                if getattr(self, field.name) != field.default}

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any]) -> PlannerOptions:
        """The defaults with ``values`` (option name -> value, e.g. from a YAML config) in place; an unknown
        name is a :class:`PlanError` that suggests the closest option."""
        names = [field.name for field in dataclasses.fields(cls)]
        for name in values:
            if name not in names:
                close = difflib.get_close_matches(str(name), names, n=3)
                hint = f"did you mean {' or '.join(close)}? " if close else ""
                raise PlanError(f"PlannerOptions has no option {name!r}; {hint}the options are {', '.join(names)}")
        return cls(**dict(values))


def _is_whole(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


DEFAULT_OPTIONS = PlannerOptions()
