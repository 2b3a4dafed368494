"""``plan_batch``: the DHP planner for one global batch, as candidates -> improve -> pick.

Candidates (:func:`_candidates`): static CP's power-of-two layouts (cheap, and valid DHP plans: the first
incumbent; past :attr:`~PlannerOptions.cross_round_max_samples` laid out only once they could prune or
beat the next candidate, :class:`_PendingStatic`); the fewest rounds balancing device-seconds, planned
round by round (one more round at a time while a round cannot be packed); and, when memory binds, static
CP's joint assignment with more rounds of memory slack, planned round by round too. Per round
(:func:`_solve_round`): a round of few layouts is solved exactly by enumeration (:mod:`.exact_round`),
one of few samples on few devices by branch and bound (:mod:`.exact_search`); any other one: size and
pack bins (:mod:`.packing`), exact min-max degree allocation with leftover devices (:mod:`.allocation`),
node-aware placement (:mod:`.placement`), then alternate refinement (:mod:`.refine`) and re-allocation
while the round's makespan drops. A round assignment is abandoned as soon as its planned rounds plus the
lower bounds of the rest cannot come within :attr:`~PlannerOptions.prune_margin` of the best plan so far.
Improve (:func:`_improved`): the best candidates move and swap samples between rounds
(:mod:`.rebalance`). Pick (:func:`_picked`): the fastest, whose worst rounds are refined again when it is
still far from its lower bound (:func:`_polish`). Every tuning constant is a field of
:class:`~lightning_dhp.planner.options.PlannerOptions`. Everything is deterministic.
"""

from __future__ import annotations

import contextlib
import functools
import gc
import itertools
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np

from lightning_dhp.planner.allocation import allocate, bin_min_degrees, spend_leftover, table_from_flat
from lightning_dhp.planner.assemble import PlannedGroup
from lightning_dhp.planner.baselines import checked_static_slots, static_groups, static_slots, static_time
from lightning_dhp.planner.cost_model import CostModel, padded_lengths, take
from lightning_dhp.planner.exact_round import ExactLayout, exact_layout, layout_count
from lightning_dhp.planner.exact_search import search_layout
from lightning_dhp.planner.inputs import check_inputs
from lightning_dhp.planner.options import DEFAULT_OPTIONS, PlannerOptions
from lightning_dhp.planner.packing import pack_round, size_round
from lightning_dhp.planner.placement import PlacementFailure, place
from lightning_dhp.planner.plan import Plan, PlanError
from lightning_dhp.planner.problem import Problem, batch_problem
from lightning_dhp.planner.rebalance import rebalance_plan
from lightning_dhp.planner.refine import Refiner
from lightning_dhp.planner.rounds import balanced_assignment, minimum_rounds


def plan_batch(
    lengths: Sequence[int] | np.ndarray,
    num_devices: int,
    tokens_per_device: int,
    cost_model: CostModel | None = None,
    *,
    node_size: int | None = None,
    vision_patches: Sequence[int] | np.ndarray | None = None,
    vision_patches_per_device: int | None = None,
    options: PlannerOptions | None = None,
) -> Plan:
    """Plan one global batch: rounds of context-parallel groups of any degree.

    ``lengths`` are token counts per sample (the language model's, visual tokens included),
    ``tokens_per_device`` the per-device token capacity (padded tokens, see :func:`padded_length`),
    ``node_size`` the ranks per node when groups that fit in a node must not cross one,
    ``vision_patches`` each sample's vision-tower patches (timed with the cost model's
    ``vision_s_per_patch``; None or all zero: a text-only plan), ``vision_patches_per_device`` the
    per-device budget of vision-tower patches (a group of degree ``d`` holds at most ``d`` times it;
    None: the tower's memory is not budgeted), ``options`` the planner's tuning constants (None: the
    defaults; see :class:`~lightning_dhp.planner.options.PlannerOptions`). Raises :class:`PlanError` on
    bad input or a sample that fits no group.
    """
    checked = check_inputs(lengths, num_devices, tokens_per_device, node_size, vision_patches,
                           vision_patches_per_device)
    cost = cost_model or CostModel.default()
    if cost.attention_s_per_token2 <= 0 and cost.linear_s_per_token <= 0:
        raise PlanError("the cost model charges nothing per token (attention and linear terms are 0), so no plan "
                        "beats another; fit it on timings that grow with the tokens, or use CostModel.default()")
    lengths_array, num_devices, tokens_per_device, node_size, patches, vision_patches_per_device = checked
    with _cyclic_gc_paused():
        batch = batch_problem(lengths_array, num_devices, tokens_per_device, cost, node_size, patches,
                              vision_patches_per_device, options or DEFAULT_OPTIONS)
        return _picked(batch, _improved(batch, _candidates(batch)))


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


class _Pruned:
    """A round assignment abandoned because it cannot beat the best plan so far."""


_PRUNED = _Pruned()

# relative slack when lower bounds alone decide a pruning: a round's makespan and its bound come from different
# sums, so where they are equal they may differ in the last bits
_BOUND_SLACK = 1e-9


@dataclass(frozen=True)
class _StaticLayout:
    """Static CP's fastest layout: its degree, slots (:func:`~.baselines.static_slots`) and predicted time,
    made a :class:`Plan` (:meth:`plan`) only where it is rebalanced or picked (at 8192 samples it rarely
    wins, and its groups and plan cost as much as laying it out)."""

    degree: int
    slots: list[list[list[int]]]
    predicted_time: float

    def plan(self, batch: Problem) -> Plan:
        return batch.plan(static_groups(self.slots, self.degree))


def _as_plan(batch: Problem, candidate: Plan | _StaticLayout) -> Plan:
    """The candidate as a plan (the static layout built)."""
    return candidate.plan(batch) if isinstance(candidate, _StaticLayout) else candidate


@dataclass(frozen=True)
class _Candidates:
    """The plans the batch chooses from (per-round planning first, the static layout last), and which of
    them are the static layout and its extra-round re-plan."""

    plans: list[Plan | _StaticLayout]
    static: _StaticLayout | None
    extra_round: Plan | None


def _candidates(batch: Problem) -> _Candidates:
    """The best static layout, the fewest-rounds assignment planned round by round, and (when memory
    binds) static CP's joint assignment with more rounds, planned round by round."""
    options = batch.options
    if options.static_layouts and not _cross_round(batch):
        return _large_batch_candidates(batch)
    static = _best_static(batch, _static_bounds(batch)) if options.static_layouts else None
    limit = static.predicted_time * (1 + options.prune_margin) if static is not None else math.inf
    plans: list[Plan | _StaticLayout] = []
    fewest = _fewest_rounds_plan(batch, _over(limit))
    if fewest is not None:
        plans.append(fewest)
        limit = min(limit, fewest.predicted_time * (1 + options.prune_margin))
    extra_round = None
    if static is not None and _static_binds_memory(batch, static, plans):
        extra_round = _extra_round_plan(batch, static.degree, _over(limit))
        if extra_round is not None:
            plans.append(extra_round)
    if static is not None:
        plans.append(static)
    return _Candidates(plans, static, extra_round)


def _large_batch_candidates(batch: Problem) -> _Candidates:
    """:func:`_candidates` past :attr:`~PlannerOptions.cross_round_max_samples`, where static CP's layout is only
    a candidate (no extra round, rebalancing nor polish): the layouts are laid out only when they could matter
    (:class:`_PendingStatic`). The plan picked is the same as with the layouts first: the pruning is the same,
    and a layout whose bound is slower than the fewest-rounds plan cannot win (that plan comes first on ties)."""
    static = _PendingStatic(batch)
    fewest = _fewest_rounds_plan(batch, static.prunes)
    best = static.layout(fewest.predicted_time if fewest is not None else math.inf)
    return _Candidates([plan for plan in (fewest, best) if plan is not None], best, None)


class _PendingStatic:
    """Static CP's best layout, laid out when first needed: as the incumbent that prunes a round assignment,
    once the assignment's planned rounds and bounds are :attr:`~PlannerOptions.prune_margin` slower than the
    layouts' least bound (before that nothing can prune it), or after the assignment, with its plan's time to
    beat (at 8192 samples the plan usually beats every bound, and no layout is laid out)."""

    def __init__(self, batch: Problem) -> None:
        self.batch = batch
        self.bounds = _static_bounds(batch)
        self.least_bound = self.bounds[0][0] if self.bounds else math.inf
        self.laid_out = False
        self.best: _StaticLayout | None = None

    def layout(self, incumbent: float = math.inf) -> _StaticLayout | None:
        """The best layout (laid out once, skipping those whose bound is slower than ``incumbent``)."""
        if not self.laid_out:
            self.best, self.laid_out = _best_static(self.batch, self.bounds, incumbent), True
        return self.best

    def prunes(self, time: float) -> bool:
        """Whether a round assignment whose planned rounds and bounds take ``time`` is abandoned."""
        options = self.batch.options
        margin = 1 + options.prune_margin
        if time * (1 + options.static_bound_margin) <= self.least_bound * margin:  # no layout is that fast
            return False
        best = self.layout()
        return best is not None and time > best.predicted_time * margin


def _over(limit: float) -> Callable[[float], bool]:
    """Whether a round assignment is abandoned, against a known ``limit``."""
    return lambda time: time > limit


def _cross_round(batch: Problem) -> bool:
    """Whether the batch is small enough for the cross-round stages (extra-round candidate, rebalancing,
    polish)."""
    return len(batch.lengths) <= batch.options.cross_round_max_samples


def _is_hard(plan: Plan, options: PlannerOptions) -> bool:
    """Whether ``plan`` is more than :attr:`~PlannerOptions.hard_gap` above its lower bound."""
    return plan.predicted_time > plan.lower_bound * (1 + options.hard_gap)


def _fewest_rounds_plan(batch: Problem, prunes: Callable[[float], bool]) -> Plan | None:
    """The balanced assignment over the fewest rounds that packs, planned round by round; None when it
    is pruned (``prunes``: :func:`_plan_rounds`'s) or no round count packs."""
    fewest = minimum_rounds(batch.lengths, batch.num_devices, batch.tokens_per_device, batch.patches,
                            batch.vision_patches_per_device)
    for num_rounds in range(fewest, len(batch.lengths) + 1):
        assignment = balanced_assignment(batch.sample_work, batch.lengths, num_rounds, batch.num_devices,
                                         batch.tokens_per_device, batch.patches, batch.vision_patches_per_device)
        if assignment is None:
            continue
        planned = _plan_rounds(batch, assignment, prunes, tight_starts=num_rounds == 1)
        if planned is _PRUNED:
            return None
        if isinstance(planned, Plan):
            return planned
    return None


def _static_binds_memory(batch: Problem, static: _StaticLayout, plans: list[Plan | _StaticLayout]) -> bool:
    """Whether the static layout's extra-round re-plan is worth planning: static CP needs several rounds
    (memory binds) and comes within :attr:`~PlannerOptions.static_close` of every other candidate."""
    options = batch.options
    return (
        sum(1 for groups in static.slots if any(groups)) > 1
        and options.static_rounds_extra > 0
        and _cross_round(batch)
        and all(static.predicted_time <= plan.predicted_time * (1 + options.static_close) for plan in plans)
    )


def _extra_round_plan(batch: Problem, static_degree: int, prunes: Callable[[float], bool]) -> Plan | None:
    """Static CP's joint assignment over all rounds at ``static_degree`` with
    :attr:`~PlannerOptions.static_rounds_extra` more rounds, planned round by round: the memory slack
    lets short samples leave the wide groups. None when pruned or unpackable."""
    slots = static_slots(batch.lengths, batch.num_devices, batch.tokens_per_device, static_degree, batch.cost,
                         batch.options.static_rounds_extra, batch.patches, batch.vision_patches_per_device)
    planned = _plan_rounds(batch, [[sample for group in groups for sample in group] for groups in slots], prunes,
                           prune_unsolved=True)
    return planned if isinstance(planned, Plan) else None


def _improved(batch: Problem, candidates: _Candidates) -> list[Plan | _StaticLayout]:
    """The candidates, those close to the fastest rebalanced across rounds (only the fastest unless the
    batch is hard; not the static layout beside its extra-round re-plan)."""
    options = batch.options
    plans = candidates.plans
    if not (options.rebalance and _cross_round(batch)):
        return plans
    fastest = min(plan.predicted_time for plan in plans)
    margin = options.rebalance_margin if fastest > batch.lower_bound * (1 + options.hard_gap) else 0.0
    skipped = candidates.static if options.skip_static_rebalance and candidates.extra_round is not None else None
    return [
        _rebalanced(batch, _as_plan(batch, plan))
        if plan.predicted_time <= fastest * (1 + margin) and plan is not skipped
        else plan
        for plan in plans
    ]


def _rebalanced(batch: Problem, plan: Plan, budget_share: float = 1.0) -> Plan:
    return rebalance_plan(plan, batch.lengths, batch.cost, budget_share=budget_share, patches=batch.patches,
                          options=batch.options)


def _picked(batch: Problem, plans: list[Plan | _StaticLayout]) -> Plan:
    """The fastest plan (the first on ties), polished and rebalanced again when it is hard and has several
    rounds."""
    options = batch.options
    best = _as_plan(batch, min(plans, key=lambda plan: plan.predicted_time))
    if (
        options.polish_steps
        and options.rebalance
        and _cross_round(batch)
        and len(best.rounds) > 1
        and _is_hard(best, options)
    ):
        best = _rebalanced(batch, _polish(best, batch), options.polish_rebalance_share)
    return best


def _polish(plan: Plan, batch: Problem) -> Plan:
    """``plan`` with its :attr:`~PlannerOptions.polish_rounds` rounds furthest above their lower bounds
    refined again (:attr:`~PlannerOptions.polish_steps` moves, then exact allocation): rebalancing moved
    samples between rounds after they were planned, and refinement is skipped in the many-sample rounds of
    the candidates."""
    options = batch.options
    rounds = [[PlannedGroup(group.samples, group.degree, group.ranks[0]) for group in round_.groups]
              for round_ in plan.rounds]
    members = [np.array(sorted(sample for group in round_.groups for sample in group.samples), dtype=np.int64)
               for round_ in plan.rounds]
    bounds = batch.round_bounds(members)
    excess = [round_.predicted_time - bound for round_, bound in zip(plan.rounds, bounds, strict=True)]
    for index in sorted(range(len(rounds)), key=lambda position: -excess[position])[:options.polish_rounds]:
        samples, round_ = members[index], plan.rounds[index]
        if round_.predicted_time <= bounds[index] * (1 + options.close_enough):
            continue
        problem = batch.round(samples, bounds[index])
        position = {sample: local for local, sample in enumerate(samples.tolist())}
        layout = _improve(problem, [[position[sample] for sample in group.samples] for group in round_.groups],
                          steps=options.polish_steps)
        if layout is not None and layout.makespan < round_.predicted_time:
            rounds[index] = layout.groups(samples)
    return batch.plan(rounds)


def _static_bounds(batch: Problem) -> list[tuple[float, int]]:
    """(:func:`_static_bound`, degree) of static CP's power-of-two layouts that hold the longest sample,
    fastest bound first."""
    degrees = _power_of_two_degrees(int(batch.min_degree.max()), batch.num_devices)
    bounds = [_static_bound(batch.lengths, batch.num_devices, batch.tokens_per_device, degree, batch.cost,
                            batch.node_size, batch.patches, batch.vision_patches_per_device) for degree in degrees]
    return sorted(zip(bounds, degrees, strict=True))


def _best_static(
    batch: Problem, bounds: list[tuple[float, int]], incumbent: float = math.inf
) -> _StaticLayout | None:
    """The fastest of static CP's layouts (``bounds``: :func:`_static_bounds`), None when none suits the node
    size. Layouts are timed in the order of their bounds, and one whose bound is slower than the best so far,
    or than ``incumbent`` (a plan's time), is not laid out."""
    best: _StaticLayout | None = None
    for bound, degree in bounds:
        to_beat = incumbent if best is None else min(incumbent, best.predicted_time)
        if bound >= to_beat * (1 + batch.options.static_bound_margin):
            break  # it cannot win, nor can the ones after it
        with contextlib.suppress(PlanError):  # the degree does not suit the node size
            slots = checked_static_slots(batch, degree)
            time = static_time(batch, slots, degree)
            if best is None or time < best.predicted_time:
                best = _StaticLayout(degree, slots, time)
    return best


def _plan_rounds(
    batch: Problem, assignment: list[list[int]], prunes: Callable[[float], bool], *, tight_starts: bool = False,
    prune_unsolved: bool = False,
) -> Plan | _Pruned | None:
    """Plan every round of ``assignment`` (sample indices per round); :data:`_PRUNED` once ``prunes`` the
    planned rounds plus the lower bounds of the rest, None when some round cannot be packed.

    Rounds whose longest sample is slowest at its minimum degree go first: when memory binds, that
    is about their makespan, so a losing assignment is abandoned after few rounds. With ``prune_unsolved``
    (for a caller to whom an unpackable assignment is as good as a pruned one) it is abandoned before any
    round is solved when ``prunes`` the lower bounds alone: the first round solved would prune it
    (its makespan is at least its bound; :data:`_BOUND_SLACK` covers the rounding of the sums).
    """
    rounds = [np.array(sorted(members), dtype=np.int64) for members in assignment if len(members)]
    bounds = batch.round_bounds(rounds)
    spent, remaining = 0.0, math.fsum(bounds)
    if prune_unsolved and prunes(remaining / (1 + _BOUND_SLACK)):
        return _PRUNED
    longest = np.array([samples[np.argmax(batch.lengths[samples])] for samples in rounds])
    padded = padded_lengths(batch.lengths[longest], batch.min_degree[longest]).astype(np.float64)
    at_minimum = batch.cost.times_from_sums(padded, padded * padded, batch.min_degree[longest],
                                            node_size=batch.node_size, sum_patches=take(batch.patches, longest))
    planned: list[list[PlannedGroup]] = [[] for _ in rounds]
    for index in np.lexsort((np.arange(len(rounds)), -np.maximum(bounds, at_minimum))).tolist():
        remaining -= bounds[index]
        layout = _solve_round(rounds[index], batch, bounds[index], tight_starts=tight_starts)
        if layout is None:
            return None
        planned[index] = layout.groups(rounds[index])
        spent += layout.makespan
        if prunes(spent + remaining):
            return _PRUNED
    return batch.plan(planned)


def _static_bound(
    lengths: np.ndarray,
    num_devices: int,
    tokens_per_device: int,
    degree: int,
    cost: CostModel,
    node_size: int | None,
    patches: np.ndarray | None = None,
    vision_patches_per_device: int | None = None,
) -> float:
    """Lower bound on :func:`static_plan`'s time at ``degree``: every round pays a group's fixed
    time, and the work of all samples spreads at best evenly over ``num_devices / degree`` groups."""
    padded = padded_lengths(lengths, degree)
    rounds = minimum_rounds(padded, num_devices, tokens_per_device, patches, vision_patches_per_device)
    padded_f = padded.astype(np.float64)
    fixed = float(cost.times_from_sums(0.0, 0.0, degree, node_size=node_size))
    alone = float(cost.times_from_sums(padded_f.sum(), (padded_f * padded_f).sum(), degree, node_size=node_size,
                                       sum_patches=None if patches is None else float(patches.sum())))
    return rounds * fixed + (alone - fixed) * degree / num_devices


def _solve_round(samples: np.ndarray, batch: Problem, bound: float, *, tight_starts: bool = True) -> _Layout | None:
    """The best layout of one round's ``samples`` (``bound``: the round's lower bound), or None if the
    round cannot be packed.

    A round whose groups cannot cross a node is solved exactly when it has at most
    :attr:`~PlannerOptions.exact_round_layouts` layouts (enumerated) or at most
    :attr:`~PlannerOptions.exact_search_samples` samples on at most
    :attr:`~PlannerOptions.exact_search_devices` devices (searched, unless the search passes its pair
    budget). Otherwise the sized longest-first packing is the main start; small rounds also try the merge
    start
    (:func:`_merge_start`) and uniform-degree starts (the static layouts), memory-tight rounds try
    the two smallest power-of-two layouts that hold their longest sample, and a round whose main
    packing runs out of memory tries the uniform starts, small degrees first. The best refined
    start wins (the first on ties).
    """
    problem, options = batch.round(samples, bound), batch.options
    if _enumerable(problem):
        return _placed(exact_layout(problem), problem)
    if _searchable(problem):
        searched = search_layout(problem, options.exact_search_pairs)
        if searched is not None:
            return _placed(searched, problem)
    lengths, min_degree = problem.lengths, problem.min_degree
    num_devices, tokens_per_device = batch.num_devices, batch.tokens_per_device
    sized = size_round(problem)
    main = pack_round(problem, *sized) if sized is not None else None
    small = [d for d in options.extra_start_degrees if d <= num_devices]
    few_samples = len(samples) <= options.extra_start_samples
    rescue: list[int] = []  # tried only until one of them packs
    if main is not None:
        degrees = small if few_samples else []
        if tight_starts and lengths.sum() > options.tight_memory * num_devices * tokens_per_device:
            degrees = degrees + _tight_start_degrees(int(min_degree.max()), num_devices, exclude=degrees)
    else:
        degrees = small
        rescue = [d for d in range(1, num_devices + 1) if num_devices // d != num_devices // (d + 1) and d not in small]
    best = _improve(problem, main) if main is not None else None
    if few_samples and options.merge_start:
        merged = _merge_start(problem)
        result = _improve(problem, merged) if merged is not None else None
        if result is not None and (best is None or result.makespan < best.makespan):
            best = result
    for degree in degrees + rescue:
        if best is not None and (degree in rescue or best.makespan <= bound * (1 + options.close_enough)):
            break
        start = _uniform_start(problem, degree)
        # small rounds refine every start: it is cheap there, and keeps their gap to the optimum
        cutoff = best.makespan * (1 + options.start_margin) if best is not None and not few_samples else math.inf
        result = _improve(problem, start, cutoff) if start is not None else None
        if result is not None and (best is None or result.makespan < best.makespan):
            best = result
    return best


def _within_node(problem: Problem) -> bool:
    """Whether no group of the round can cross a node (any degrees summing to the devices place side by side)."""
    return problem.node_size is None or problem.num_devices <= problem.node_size


def _enumerable(problem: Problem) -> bool:
    """Whether the round is solved exactly by enumeration (:mod:`.exact_round`): it has at most
    :attr:`~PlannerOptions.exact_round_layouts` layouts, and no group can cross a node."""
    return _within_node(problem) and (
        layout_count(len(problem.lengths), problem.num_devices) <= problem.options.exact_round_layouts)


def _searchable(problem: Problem) -> bool:
    """Whether the round is solved exactly by search (:mod:`.exact_search`): at most
    :attr:`~PlannerOptions.exact_search_samples` samples on at most
    :attr:`~PlannerOptions.exact_search_devices` devices, and no group can cross a node."""
    options = problem.options
    return (_within_node(problem) and len(problem.lengths) <= options.exact_search_samples
            and problem.num_devices <= options.exact_search_devices)


def _placed(exact: ExactLayout | None, problem: Problem) -> _Layout | None:
    """An optimal layout (:mod:`.exact_round`, :mod:`.exact_search`) with its groups' first ranks, or None
    when no layout fits memory."""
    if exact is None:
        return None
    starts = place(exact.degrees, problem.num_devices, problem.node_size)
    # the degrees sum to at most the devices, all in one node (_within_node): they always fit, side by side
    assert not isinstance(starts, PlacementFailure), starts
    return _Layout(exact.makespan, exact.bins, exact.degrees, starts)


def _merge_start(problem: Problem) -> list[list[int]] | None:
    """Every sample alone at its minimum degree; while the bins need more devices than there are, merge
    the two bins whose union saves the most devices (the least work first among equals), or None.

    Sizing gives every sample that needs several devices a group of its own; when those groups
    need more devices than there are, two long samples have to share one (two samples of 1.1 and
    1.2 devices' memory need 4 devices alone, 3 together).
    """
    order = np.lexsort((np.arange(len(problem.lengths)), -problem.lengths)).tolist()
    bins = [[position] for position in order]
    degrees = problem.min_degree[order].astype(np.int64)
    work = problem.sample_costs(order, np.ones(len(order), dtype=np.int64))
    together = np.zeros((len(bins), len(bins)), dtype=np.int64)  # [a, b]: the degree of bins a and b merged
    alive = np.arange(len(bins))  # the bins not merged into another, in order
    changed = _pairs(len(bins))  # the pairs whose merged degree is not known yet
    while degrees[alive].sum() > problem.num_devices and len(alive) > 1:
        together[changed] = together[changed[::-1]] = _merged_degrees(problem, bins, *changed)
        first, second = (alive[index] for index in _pairs(len(alive)))
        saving = degrees[first] + degrees[second] - together[first, second]
        if saving.max() <= 0:
            return None
        best = int(np.lexsort((work[first] + work[second], -saving))[0])
        a, b = int(first[best]), int(second[best])
        bins[a] += bins[b]
        work[a] += work[b]
        degrees[a] = together[a, b]
        alive = alive[alive != b]
        others = alive[alive != a]  # every pair with the merged bin a changed
        changed = (np.full(len(others), a), others)
    return [bins[index] for index in alive.tolist()] if degrees[alive].sum() <= problem.num_devices else None


@functools.cache
def _pairs(count: int) -> tuple[np.ndarray, np.ndarray]:
    """The pairs ``a < b`` of ``count`` bins in row-major order (:func:`numpy.triu_indices`, remembered)."""
    first, second = np.triu_indices(count, k=1)
    first.flags.writeable = second.flags.writeable = False
    return first, second


def _merged_degrees(problem: Problem, bins: list[list[int]], first: np.ndarray, second: np.ndarray) -> np.ndarray:
    """The minimum degree of every union ``bins[first[i]] + bins[second[i]]`` (:func:`bin_min_degrees`)."""
    pairs = list(zip(first.tolist(), second.tolist(), strict=True))
    sizes = np.fromiter((len(bins[a]) + len(bins[b]) for a, b in pairs), dtype=np.int64, count=len(pairs))
    members = np.fromiter(itertools.chain.from_iterable(bins[a] + bins[b] for a, b in pairs), dtype=np.int64,
                          count=int(sizes.sum()))
    owner = np.repeat(np.arange(len(sizes)), sizes)
    return bin_min_degrees(problem.lengths[members], owner, problem.min_degree[members], len(sizes),
                           problem.tokens_per_device, problem.num_devices, take(problem.patches, members),
                           problem.vision_patches_per_device)


def _power_of_two_degrees(longest_min_degree: int, num_devices: int) -> list[int]:
    """Static CP's degrees: the powers of two up to ``num_devices`` that hold the longest sample, ascending."""
    return [2**k for k in range(num_devices.bit_length()) if longest_min_degree <= 2**k <= num_devices]


def _tight_start_degrees(longest_min_degree: int, num_devices: int, exclude: list[int]) -> list[int]:
    """The two smallest powers of two that hold the round's longest sample (static CP's layouts)."""
    return [degree for degree in _power_of_two_degrees(longest_min_degree, num_devices) if degree not in exclude][:2]


def _uniform_start(problem: Problem, degree: int) -> list[list[int]] | None:
    """Bins of one degree: ``num_devices // degree`` of them, filled heaviest sample first."""
    degrees = np.full(len(problem.lengths), degree, dtype=np.int64)
    return balanced_assignment(
        problem.sample_costs(slice(None), degrees),
        problem.padded(problem.lengths, degrees),
        problem.num_devices // degree,
        degree,
        problem.tokens_per_device,
        problem.patches,
        problem.vision_patches_per_device,
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
        global_index = samples.tolist()  # a list reads one item faster than an array (1000s of bins at scale)
        return [
            PlannedGroup(tuple(sorted(map(global_index.__getitem__, bin_members))), degree, start)
            for bin_members, degree, start in zip(self.members, self.degrees, self.starts, strict=True)
        ]


def _improve(
    problem: Problem, members: list[list[int]], cutoff: float = math.inf, *, steps: int | None = None
) -> _Layout | None:
    """Alternate exact allocation and refinement from one start; the best layout found.

    Refinement takes at most ``steps`` moves (default: :attr:`~PlannerOptions.refine_step_budget` over
    the batch's samples, within [4, 64], none past :attr:`~PlannerOptions.refine_max_samples`), stops once
    the makespan is within :attr:`~PlannerOptions.close_enough` of the round's lower bound, and does not
    start when the first allocation is slower than ``cutoff`` (another start won). Allocations are
    remembered only where refinement runs: without it each start is allocated once, on its own bins, which
    the start's key already tells apart (and the keys of a round's thousand bins cost as much as the start's).
    """
    options = problem.options
    # the set of bins, as sets: a frozenset keeps its hash, and needs no sorting (1000s of bins at scale)
    start = ("start", frozenset(frozenset(bin_members) for bin_members in members if bin_members))
    if start in problem.memo:
        return None  # another start reached the same bins: its result is known
    problem.memo[start] = True
    if steps is None:
        steps = max(4, min(64, options.refine_step_budget // problem.batch_size))
        if problem.batch_size > options.refine_max_samples:
            steps = 0
    best: _Layout | None = None
    steps_left = steps
    for _ in range(options.refine_passes):
        members = [bin_members for bin_members in members if bin_members]
        allocated = _allocate_and_place(problem, members, remember=steps > 0)
        if allocated is None:
            break
        degrees, starts, times = allocated
        makespan = float(times.max())
        if best is not None and makespan >= best.makespan:
            break
        best = _Layout(makespan, members, degrees.tolist(), starts)
        if makespan <= problem.lower_bound * (1 + options.close_enough) or makespan > cutoff or steps_left <= 0:
            break
        refiner = Refiner(problem, members, degrees, times)
        steps = refiner.run(steps_left)
        steps_left -= steps
        if steps == 0 or steps_left <= 0:
            break
        members = refiner.bins.members
    return best


def _allocate_and_place(
    problem: Problem, members: list[list[int]], *, remember: bool = True
) -> tuple[np.ndarray, list[int], np.ndarray] | None:
    """Exact degrees (plus leftover devices) and first ranks for fixed (disjoint, non-empty) bins, or None:
    :func:`_solve_allocation` on the bins in a canonical order (by their sorted members), remembered per
    set of bins unless ``remember`` is False."""
    if remember:
        keys = [tuple(sorted(bin_members)) for bin_members in members]
        order = sorted(range(len(keys)), key=keys.__getitem__)
        key = ("allocation", tuple(keys[index] for index in order))
        if key not in problem.memo:
            problem.memo[key] = _solve_allocation(problem, [members[index] for index in order])
        solved = problem.memo[key]
    else:  # disjoint bins: their least members (all different) order them as their sorted members do
        order = np.argsort(np.fromiter(map(min, members), dtype=np.int64, count=len(members))).tolist()
        solved = _solve_allocation(problem, [members[index] for index in order])
    if solved is None:
        return None
    degrees, starts, times = solved
    back = np.empty(len(order), dtype=np.int64)
    back[order] = np.arange(len(order))
    return degrees[back], [starts[index] for index in back.tolist()], times[back]


def _solve_allocation(
    problem: Problem, members: list[list[int]]
) -> tuple[np.ndarray, list[int], np.ndarray] | None:
    """Exact degrees (plus leftover devices) and first ranks for fixed bins, or None.

    When node-aware placement fails, the failing bin's degree is capped at the widest free range
    and the allocation is solved again.
    """
    num_devices = problem.num_devices
    sizes = np.fromiter(map(len, members), dtype=np.int64, count=len(members))
    flat_members = np.fromiter(itertools.chain.from_iterable(members), dtype=np.int64, count=int(sizes.sum()))
    flat_lengths = problem.lengths[flat_members]
    flat_patches = take(problem.patches, flat_members)
    owner = np.repeat(np.arange(len(members)), sizes)
    min_degree = bin_min_degrees(
        flat_lengths,
        owner,
        problem.min_degree[flat_members],
        len(members),
        problem.tokens_per_device,
        num_devices,
        flat_patches,
        problem.vision_patches_per_device,
    )
    if min_degree.sum() > num_devices:
        return None
    max_degree = num_devices - (int(min_degree.sum()) - min_degree)
    table = table_from_flat(
        flat_lengths, sizes, min_degree, max_degree, problem.lower_bound, problem.cost, problem.node_size, flat_patches
    )
    for _ in range(len(members) * num_devices + 1):
        allocation = allocate(table, num_devices)
        if allocation is None:
            return None
        degrees = spend_leftover(table, allocation[0], num_devices)
        starts = place(degrees.tolist(), num_devices, problem.node_size)
        if not isinstance(starts, PlacementFailure):
            return degrees, starts, table.times_at(degrees)
        if starts.largest_free >= min_degree[starts.bin_index]:
            table.cap(starts.bin_index, starts.largest_free)
            continue
        # the failing bin fits no free range even at its minimum: the ranks are fragmented, so take
        # one rank from the widest bin that can give one up, and solve again
        shrinkable = np.flatnonzero(degrees > min_degree)
        if shrinkable.size == 0:
            return None
        widest = int(shrinkable[np.argmax(degrees[shrinkable])])
        table.cap(widest, int(degrees[widest]) - 1)
    return None
