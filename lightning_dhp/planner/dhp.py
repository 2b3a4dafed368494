"""``plan_batch``: the DHP planner for one global batch.

Pipeline per batch: check inputs and minimum degrees; split into the fewest rounds (memory lower
bound, then one more round at a time if a round cannot be packed), balancing device-seconds; per
round: size and pack bins (:mod:`.packing`), exact min-max degree allocation with leftover devices
(:mod:`.allocation`), node-aware placement (:mod:`.placement`), then alternate refinement and
re-allocation while the round's makespan drops; multi-round batches also try static CP's layouts
over the whole batch, and the best plan then moves samples between rounds (:mod:`.rebalance`).
Everything is deterministic.
"""

from __future__ import annotations

import contextlib
import gc
import itertools
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np

from lightning_dhp.planner.allocation import allocate, bin_min_degrees, spend_leftover, table_from_flat
from lightning_dhp.planner.assemble import PlannedGroup, build_plan
from lightning_dhp.planner.baselines import static_plan, static_slots
from lightning_dhp.planner.cost_model import CostModel, padded_lengths
from lightning_dhp.planner.inputs import check_every_sample_fits, check_inputs, min_degrees
from lightning_dhp.planner.packing import RoundProblem, pack_round, size_round
from lightning_dhp.planner.placement import PlacementFailure, place
from lightning_dhp.planner.plan import Plan, PlanError
from lightning_dhp.planner.rebalance import rebalance_plan
from lightning_dhp.planner.refine import Refiner
from lightning_dhp.planner.rounds import balanced_assignment, device_seconds, lower_bound, minimum_rounds

REFINE_PASSES = 8
EXTRA_START_SAMPLES = 32  # rounds up to this many samples also try the uniform-degree starts
EXTRA_START_DEGREES = (1, 2, 3, 4, 6, 8)
# rounds filling more than this share of all device memory also try static CP's layouts: when bin
# packing binds, wide groups pack better than the time-sized ones
TIGHT_MEMORY = 0.75
STATIC_BOUND_MARGIN = 1e-9  # relative: a static layout is only skipped when its bound is clearly slower
# a round within this share of its lower bound is not refined further, nor are other starts tried
CLOSE_ENOUGH = 0.01
# in rounds of more than EXTRA_START_SAMPLES, a start whose first allocation is this much slower
# than the best refined one is not refined
START_MARGIN = 0.1
REFINE_STEP_BUDGET = 4096  # refinement steps per start: this over the batch's samples, within [4, 64]
# batches of more samples than this are not refined: their rounds' many samples leave the starts
# within a few hundredths of a percent of what refinement reaches (memory-bound batches: not at
# all, the static fallback wins), at 1.4-2x the time
REFINE_MAX_SAMPLES = 128
# the power-of-two starts of memory-tight rounds are tried in one-round batches only: with several
# rounds, static CP's layouts are tried over the whole batch instead (the static fallback)
TIGHT_STARTS_MULTI_ROUND = False
MERGE_START = True  # small rounds also start from merged single-sample bins (see _merge_start)
REBALANCE = True  # multi-round plans move samples between rounds (see rebalance.py)
# when the best static layout comes within STATIC_CLOSE of per-round planning (memory binds), its
# round assignment with STATIC_ROUNDS_EXTRA more rounds is planned round by round too (0: off)
STATIC_ROUNDS_EXTRA = 1
STATIC_CLOSE = 0.02
# the extra-round candidate and cross-round rebalancing are for batches of up to this many samples:
# at 8192 samples on 1024 devices they doubled the planner time past 100 ms
CROSS_ROUND_MAX_SAMPLES = 2048


def plan_batch(
    lengths: Sequence[int] | np.ndarray,
    num_devices: int,
    tokens_per_device: int,
    cost_model: CostModel | None = None,
    *,
    node_size: int | None = None,
) -> Plan:
    """Plan one global batch: rounds of context-parallel groups of any degree.

    ``lengths`` are token counts per sample, ``tokens_per_device`` the per-device token capacity
    (padded tokens, see :func:`padded_length`), ``node_size`` the ranks per node when groups that
    fit in a node must not cross one. Raises :class:`PlanError` on bad input.
    """
    lengths_array, num_devices, tokens_per_device, node_size = check_inputs(
        lengths, num_devices, tokens_per_device, node_size
    )
    with _cyclic_gc_paused():
        return _plan(lengths_array, num_devices, tokens_per_device, cost_model, node_size)


@contextlib.contextmanager
def _cyclic_gc_paused() -> Iterator[None]:
    """Pause Python's cyclic garbage collector, restoring its state after.

    Planning makes no reference cycles, but its many short-lived containers would trigger full
    collections of the whole heap (torch's objects included), which took about a quarter of the
    planner's time at 8192 samples.
    """
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def _plan(
    lengths_array: np.ndarray,
    num_devices: int,
    tokens_per_device: int,
    cost_model: CostModel | None,
    node_size: int | None,
) -> Plan:
    """:func:`plan_batch` on checked inputs."""
    cost = cost_model or CostModel.default()
    if cost.attention_s_per_token2 <= 0 and cost.linear_s_per_token <= 0:
        raise PlanError("the cost model charges nothing per token (attention and linear terms are 0), so no plan "
                        "beats another; fit it on timings that grow with the tokens, or use CostModel.default()")
    min_degree = min_degrees(lengths_array, tokens_per_device)
    check_every_sample_fits(lengths_array, min_degree, num_devices, tokens_per_device)
    work = device_seconds(lengths_array, min_degree, cost)
    fewest = minimum_rounds(lengths_array, num_devices, tokens_per_device)
    for num_rounds in range(fewest, len(lengths_array) + 1):
        assignment = balanced_assignment(work, lengths_array, num_rounds, num_devices * tokens_per_device)
        if assignment is None:
            continue
        assignment = [members for members in assignment if len(members)]  # free work can leave a round empty
        planned = [
            _solve_round(
                np.array(sorted(members), dtype=np.int64),
                lengths_array,
                min_degree,
                num_devices,
                tokens_per_device,
                cost,
                node_size,
                tight_starts=num_rounds == 1 or TIGHT_STARTS_MULTI_ROUND,
            )
            for members in assignment
        ]
        if all(groups is not None for groups in planned):
            break
    bound = lower_bound(lengths_array, min_degree, num_devices, fewest, cost, node_size)
    plan = build_plan(planned, lengths_array, num_devices, tokens_per_device, cost, node_size, bound)
    candidates: list[Plan] = []  # besides the best plan so far
    if len(plan.rounds) > 1 or lengths_array.sum() > TIGHT_MEMORY * num_devices * tokens_per_device:
        # memory binds: static CP's joint packing over all rounds can beat per-round planning, and
        # a static layout is a valid DHP plan, so take it when it is faster
        per_round_time, best_static = plan.predicted_time, None
        for degree in _tight_start_degrees(int(min_degree.max()), num_devices, exclude=[]):
            if _static_bound(lengths_array, num_devices, tokens_per_device, degree, cost, node_size) >= (
                plan.predicted_time * (1 + STATIC_BOUND_MARGIN)
            ):
                continue  # it cannot win
            try:
                static = static_plan(lengths_array, num_devices, tokens_per_device, degree, cost, node_size=node_size)
            except PlanError:
                continue  # the degree does not suit the node size
            if best_static is None or static.predicted_time < best_static[1]:
                best_static = (degree, static.predicted_time)
            if static.predicted_time < plan.predicted_time:
                plan = static
        if (
            best_static is not None
            and STATIC_ROUNDS_EXTRA
            and len(lengths_array) <= CROSS_ROUND_MAX_SAMPLES
            and best_static[1] <= per_round_time * (1 + STATIC_CLOSE)
        ):
            # static CP's joint round assignment (nearly) matches planning rounds one by one: plan its
            # rounds with one more round of memory slack too, so short samples can leave the wide groups
            rounds = [
                _solve_round(np.array(sorted(sample for group in slots for sample in group), dtype=np.int64),
                             lengths_array, min_degree, num_devices, tokens_per_device, cost, node_size,
                             tight_starts=False)
                for slots in static_slots(lengths_array, num_devices, tokens_per_device, best_static[0], cost,
                                          STATIC_ROUNDS_EXTRA)
                if any(slots)
            ]
            if all(groups is not None for groups in rounds):
                candidates.append(
                    build_plan(rounds, lengths_array, num_devices, tokens_per_device, cost, node_size, bound)
                )
    candidates.insert(0, plan)
    if REBALANCE and len(lengths_array) <= CROSS_ROUND_MAX_SAMPLES:
        candidates = [rebalance_plan(candidate, lengths_array, cost) for candidate in candidates]
    return min(candidates, key=lambda candidate: candidate.predicted_time)  # the first on ties


def _static_bound(
    lengths: np.ndarray, num_devices: int, tokens_per_device: int, degree: int, cost: CostModel, node_size: int | None
) -> float:
    """Lower bound on :func:`static_plan`'s time at ``degree``: every round pays a group's fixed
    time, and the work of all samples spreads at best evenly over ``num_devices / degree`` groups."""
    padded = padded_lengths(lengths, degree)
    rounds = minimum_rounds(padded, num_devices, tokens_per_device)
    padded_f = padded.astype(np.float64)
    fixed = float(cost.times_from_sums(0.0, 0.0, degree, node_size=node_size))
    alone = float(cost.times_from_sums(padded_f.sum(), (padded_f * padded_f).sum(), degree, node_size=node_size))
    return rounds * fixed + (alone - fixed) * degree / num_devices


def _solve_round(
    samples: np.ndarray,
    all_lengths: np.ndarray,
    all_min_degree: np.ndarray,
    num_devices: int,
    tokens_per_device: int,
    cost: CostModel,
    node_size: int | None,
    *,
    tight_starts: bool = True,
) -> list[PlannedGroup] | None:
    """Groups of one round (global sample indices), or None if the round cannot be packed.

    The sized longest-first packing is the main start; small rounds also try the merge start
    (:func:`_merge_start`) and uniform-degree starts (the static layouts), memory-tight rounds try
    the two smallest power-of-two layouts that hold their longest sample, and a round whose main
    packing runs out of memory tries the uniform starts, small degrees first. The best refined
    start wins (the first on ties).
    """
    lengths, min_degree = all_lengths[samples], all_min_degree[samples]
    bound = lower_bound(lengths, min_degree, num_devices, 1, cost, node_size)
    problem = RoundProblem(
        lengths, min_degree, num_devices, tokens_per_device, cost, node_size, bound, len(all_lengths)
    )
    sized = size_round(problem)
    main = pack_round(problem, *sized) if sized is not None else None
    small = [d for d in EXTRA_START_DEGREES if d <= num_devices]
    few_samples = len(samples) <= EXTRA_START_SAMPLES
    rescue: list[int] = []  # tried only until one of them packs
    if main is not None:
        degrees = small if few_samples else []
        if tight_starts and lengths.sum() > TIGHT_MEMORY * num_devices * tokens_per_device:
            degrees = degrees + _tight_start_degrees(int(min_degree.max()), num_devices, exclude=degrees)
    else:
        degrees = small
        rescue = [d for d in range(1, num_devices + 1) if num_devices // d != num_devices // (d + 1) and d not in small]
    best = _improve(problem, main) if main is not None else None
    if few_samples and MERGE_START:
        merged = _merge_start(problem)
        result = _improve(problem, merged) if merged is not None else None
        if result is not None and (best is None or result.makespan < best.makespan):
            best = result
    for degree in degrees + rescue:
        if best is not None and (degree in rescue or best.makespan <= bound * (1 + CLOSE_ENOUGH)):
            break
        start = _uniform_start(problem, degree)
        # small rounds refine every start: it is cheap there, and keeps their gap to the optimum
        cutoff = best.makespan * (1 + START_MARGIN) if best is not None and not few_samples else math.inf
        result = _improve(problem, start, cutoff) if start is not None else None
        if result is not None and (best is None or result.makespan < best.makespan):
            best = result
    return best.groups(samples) if best is not None else None


def _merge_start(problem: RoundProblem) -> list[list[int]] | None:
    """Every sample alone at its minimum degree; while the bins need more devices than there are, merge
    the two bins whose union saves the most devices (the least work first among equals), or None.

    Sizing gives every sample that needs several devices a group of its own; when those groups
    need more devices than there are, two long samples have to share one (two samples of 1.1 and
    1.2 devices' memory need 4 devices alone, 3 together).
    """
    order = np.lexsort((np.arange(len(problem.lengths)), -problem.lengths)).tolist()
    bins = [[position] for position in order]
    degrees = problem.min_degree[order].astype(np.int64)
    work = problem.sample_costs(problem.lengths[order], np.ones(len(order), dtype=np.int64))
    while degrees.sum() > problem.num_devices and len(bins) > 1:
        first, second = np.triu_indices(len(bins), k=1)
        sizes = np.array([len(bins[a]) + len(bins[b]) for a, b in zip(first.tolist(), second.tolist(), strict=True)])
        members = np.fromiter(
            (sample for a, b in zip(first.tolist(), second.tolist(), strict=True) for sample in bins[a] + bins[b]),
            dtype=np.int64, count=int(sizes.sum()),
        )
        owner = np.repeat(np.arange(len(sizes)), sizes)
        merged = bin_min_degrees(problem.lengths[members], owner, problem.min_degree[members], len(sizes),
                                 problem.tokens_per_device, problem.num_devices)
        saving = degrees[first] + degrees[second] - merged
        if saving.max() <= 0:
            return None
        best = int(np.lexsort((work[first] + work[second], -saving))[0])
        a, b = int(first[best]), int(second[best])
        bins[a] += bins.pop(b)
        work[a] += work[b]
        degrees[a] = merged[best]
        work, degrees = np.delete(work, b), np.delete(degrees, b)
    return bins if degrees.sum() <= problem.num_devices else None


def _tight_start_degrees(longest_min_degree: int, num_devices: int, exclude: list[int]) -> list[int]:
    """The two smallest powers of two that hold the round's longest sample (static CP's layouts)."""
    powers = [2**k for k in range(num_devices.bit_length()) if longest_min_degree <= 2**k <= num_devices]
    return [degree for degree in powers if degree not in exclude][:2]


def _uniform_start(problem: RoundProblem, degree: int) -> list[list[int]] | None:
    """Bins of one degree: ``num_devices // degree`` of them, filled heaviest sample first."""
    degrees = np.full(len(problem.lengths), degree, dtype=np.int64)
    return balanced_assignment(
        problem.sample_costs(problem.lengths, degrees),
        problem.padded(problem.lengths, degrees),
        problem.num_devices // degree,
        degree * problem.tokens_per_device,
    )


@dataclass(frozen=True)
class _Layout:
    """One round's bins (local positions) with their degrees, first ranks and makespan."""

    makespan: float
    members: list[list[int]]
    degrees: list[int]
    starts: list[int]

    def groups(self, samples: np.ndarray) -> list[PlannedGroup]:
        """The bins as planned groups of global sample indices."""
        return [
            PlannedGroup(tuple(sorted(samples[bin_members].tolist())), degree, start)
            for bin_members, degree, start in zip(self.members, self.degrees, self.starts, strict=True)
        ]


def _improve(problem: RoundProblem, members: list[list[int]], cutoff: float = math.inf) -> _Layout | None:
    """Alternate exact allocation and refinement from one start; the best layout found.

    Refinement stops once the makespan is within :data:`CLOSE_ENOUGH` of the round's lower bound,
    and does not start when the first allocation is slower than ``cutoff`` (another start won).
    """
    best: _Layout | None = None
    steps_left = max(4, min(64, REFINE_STEP_BUDGET // problem.batch_size))
    if problem.batch_size > REFINE_MAX_SAMPLES:
        steps_left = 0
    for _ in range(REFINE_PASSES):
        members = [bin_members for bin_members in members if bin_members]
        allocated = _allocate_and_place(problem, members)
        if allocated is None:
            break
        degrees, starts, times = allocated
        makespan = float(times.max())
        if best is not None and makespan >= best.makespan:
            break
        best = _Layout(makespan, members, degrees.tolist(), starts)
        if makespan <= problem.lower_bound * (1 + CLOSE_ENOUGH) or makespan > cutoff or steps_left <= 0:
            break
        refiner = Refiner(problem, members, degrees, times)
        steps = refiner.run(steps_left)
        steps_left -= steps
        if steps == 0 or steps_left <= 0:
            break
        members = refiner.members
    return best


def _allocate_and_place(
    problem: RoundProblem, members: list[list[int]]
) -> tuple[np.ndarray, list[int], np.ndarray] | None:
    """Exact degrees (plus leftover devices) and first ranks for fixed bins, or None.

    When node-aware placement fails, the failing bin's degree is capped at the widest free range
    and the allocation is solved again.
    """
    num_devices = problem.num_devices
    sizes = np.fromiter(map(len, members), dtype=np.int64, count=len(members))
    flat_members = np.fromiter(itertools.chain.from_iterable(members), dtype=np.int64, count=int(sizes.sum()))
    flat_lengths = problem.lengths[flat_members]
    owner = np.repeat(np.arange(len(members)), sizes)
    min_degree = bin_min_degrees(
        flat_lengths,
        owner,
        problem.min_degree[flat_members],
        len(members),
        problem.tokens_per_device,
        num_devices,
    )
    if min_degree.sum() > num_devices:
        return None
    max_degree = num_devices - (int(min_degree.sum()) - min_degree)
    for _ in range(len(members) * num_devices + 1):
        table = table_from_flat(
            flat_lengths, sizes, min_degree, max_degree, problem.lower_bound, problem.cost, problem.node_size
        )
        allocation = allocate(table, num_devices)
        if allocation is None:
            return None
        degrees = spend_leftover(table, allocation[0], num_devices)
        starts = place(degrees.tolist(), num_devices, problem.node_size)
        if not isinstance(starts, PlacementFailure):
            return degrees, starts, table.times_at(degrees)
        if starts.largest_free >= min_degree[starts.bin_index]:
            max_degree[starts.bin_index] = min(int(max_degree[starts.bin_index]), starts.largest_free)
            continue
        # the failing bin fits no free range even at its minimum: the ranks are fragmented, so take
        # one rank from the widest bin that can give one up, and solve again
        shrinkable = np.flatnonzero(degrees > min_degree)
        if shrinkable.size == 0:
            return None
        widest = int(shrinkable[np.argmax(degrees[shrinkable])])
        max_degree[widest] = int(degrees[widest]) - 1
    return None
