"""Refinement: local moves that shorten the slowest bin of a round, degrees held fixed.

Three moves, each evaluated for every candidate at once with numpy:
- move one sample of the slowest bin to another bin with memory left;
- swap one sample of the slowest bin with a sample of another bin;
- merge the slowest bin with another bin (degrees add up), which averages their per-device work
  (work inside a group divides evenly over its ranks, so this is how the slowest bin borrows the
  spare time of a fast one);
- split the slowest bin into two bins whose degrees add up to its own (longest sample first to
  the side that ends earlier), which saves ring traffic and fixes memory-forced merges.
The best move is taken when it makes both touched bins faster than the slowest bin was; this
strictly shrinks the largest touched time, so the search cannot cycle. Every move keeps each bin's
padded tokens and, under a vision budget, its vision patches within its degree x the per-device budget.
"""

from __future__ import annotations

import numpy as np

from lightning_dhp.planner.bins import Bins
from lightning_dhp.planner.problem import Problem

_NONE = (np.inf, None)  # a move kind switched off (PlannerOptions.refine_move and its siblings)


class _Columns:
    """Every sample's cost and padded length per degree of one round, each degree's column computed the first
    time it shows up (shared by the round's refiners through :attr:`Problem.memo`)."""

    def __init__(self, problem: Problem):
        self.problem = problem
        self.class_of = np.full(problem.num_devices + 1, -1, dtype=np.int64)
        self.costs = np.zeros((0, len(problem.lengths)))
        self.padded = np.zeros((0, len(problem.lengths)), dtype=np.int64)

    def at(self, samples: np.ndarray, degrees: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Cost and padded length of ``samples[i]`` at ``degrees[i]`` (any broadcastable shapes)."""
        classes = self._classes(degrees)
        return self.costs[classes, samples], self.padded[classes, samples]

    def _classes(self, degrees: np.ndarray) -> np.ndarray:
        """The rows of ``degrees``, computing those not seen yet."""
        classes = self.class_of[degrees]
        if (classes < 0).any():
            missing = np.unique(np.asarray(degrees)[classes < 0])
            self.class_of[missing] = len(self.costs) + np.arange(len(missing))
            self.costs = np.concatenate([self.costs, self.problem.sample_costs(slice(None), missing[:, None])])
            self.padded = np.concatenate([self.padded, self.problem.padded(self.problem.lengths, missing[:, None])])
            classes = self.class_of[degrees]
        return classes


class Refiner:
    """Mutable bins of one round (:class:`~.bins.Bins`: members, degrees, padded tokens and, under a vision
    budget, vision patches; every move keeps both within the bins' memory) with their times."""

    def __init__(self, problem: Problem, members: list[list[int]], degrees: np.ndarray, times: np.ndarray):
        self.problem = problem
        self._columns = problem.memo.setdefault("refine columns", _Columns(problem))
        budget = problem.patch_budget
        self.bins = Bins(members, degrees, self._columns.at, problem.tokens_per_device,
                         None if budget is None else problem.patches, budget)
        self.times = times.astype(np.float64).copy()

    def _at_degrees(self, samples: np.ndarray, degrees: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Cost and padded length of ``samples[i]`` at ``degrees[i]`` (any broadcastable shapes)."""
        return self._columns.at(samples, degrees)

    def run(self, max_steps: int) -> int:
        """Apply improving moves until none helps or ``max_steps``; returns how many were applied."""
        for step in range(max_steps):
            if not self._step():
                return step
        return max_steps

    def _step(self) -> bool:
        bins = self.bins
        alive = bins.degree > 0
        slowest = int(np.argmax(np.where(alive, self.times, -np.inf)))
        options = self.problem.options
        limit = self.times[slowest] * options.refine_improvement
        here = np.array(bins.members[slowest], dtype=np.int64)
        relieved = self.times[slowest] - bins.own_cost[here]
        candidates = [
            self._best_move(slowest, here, relieved, alive) if options.refine_move else _NONE,
            self._best_swap(slowest, here, relieved, alive) if options.refine_swap else _NONE,
            self._best_merge(slowest, here, alive) if options.refine_merge else _NONE,
        ]
        score, action = min(candidates, key=lambda candidate: candidate[0])
        if not score < limit and options.refine_split:  # splitting is the slowest to evaluate: only when
            score, action = self._best_split(slowest, here)  # nothing else helps
        if not score < limit:
            return False
        action()
        return True

    def _best_move(self, slowest: int, here: np.ndarray, relieved: np.ndarray, alive: np.ndarray):
        bins = self.bins
        costs, padded = self._at_degrees(here[:, None], np.maximum(bins.degree, 1)[None, :])
        arrive = self.times[None, :] + costs
        held = None if bins.held is None else bins.held[None, :] + bins.patches[here][:, None]
        room = bins.fits(bins.degree[None, :], bins.tokens[None, :] + padded, held) & alive
        room[:, slowest] = False
        score = np.where(room, np.maximum(relieved[:, None], arrive), np.inf)
        row, target = np.unravel_index(int(np.argmin(score)), score.shape)
        return float(score[row, target]), lambda: self._transfer(int(here[row]), int(target))

    def _best_swap(self, slowest: int, here: np.ndarray, relieved: np.ndarray, alive: np.ndarray):
        bins = self.bins
        partners = np.flatnonzero(alive)
        partners = partners[partners != slowest]
        partner_bins = self.problem.options.swap_partner_bins
        if len(partners) > partner_bins:
            fastest = np.argpartition(self.times[partners], partner_bins - 1)[:partner_bins]
            partners = partners[fastest]
        is_partner = np.zeros(len(bins.degree), dtype=bool)
        is_partner[partners] = True
        others = np.flatnonzero(is_partner[bins.owner])
        if not others.size:
            return np.inf, None
        other_bins = bins.owner[others]
        to_slow_cost, to_slow_padded = self._at_degrees(others, bins.degree[slowest])
        to_other_cost, to_other_padded = self._at_degrees(here[:, None], bins.degree[other_bins][None, :])
        slow_after = relieved[:, None] + to_slow_cost[None, :]
        other_after = (self.times[other_bins] - bins.own_cost[others])[None, :] + to_other_cost
        slow_tokens = bins.tokens[slowest] - bins.own_padded[here][:, None] + to_slow_padded[None, :]
        other_tokens = (bins.tokens[other_bins] - bins.own_padded[others])[None, :] + to_other_padded
        slow_held = other_held = None
        if bins.held is not None:
            exchanged = bins.patches[others][None, :] - bins.patches[here][:, None]  # what the slowest bin gains
            slow_held, other_held = bins.held[slowest] + exchanged, bins.held[other_bins][None, :] - exchanged
        fits = bins.fits(bins.degree[slowest], slow_tokens, slow_held) & bins.fits(
            bins.degree[other_bins][None, :], other_tokens, other_held
        )
        score = np.where(fits, np.maximum(slow_after, other_after), np.inf)
        row, column = np.unravel_index(int(np.argmin(score)), score.shape)

        def swap() -> None:
            partner = int(others[column])
            target = int(bins.owner[partner])
            self._transfer(int(here[row]), target)
            self._transfer(partner, slowest)

        return float(score[row, column]), swap

    def _best_merge(self, slowest: int, here: np.ndarray, alive: np.ndarray):
        problem, bins = self.problem, self.bins
        merged_degree = bins.degree[slowest] + bins.degree
        merged_degree[slowest] = bins.degree[slowest]  # not a candidate; keeps the degree in range
        others = np.flatnonzero(bins.owner != slowest)
        _, other_padded = self._at_degrees(others, merged_degree[bins.owner[others]])
        other_padded = other_padded.astype(np.float64)
        count = len(bins.degree)
        sum_padded = np.bincount(bins.owner[others], weights=other_padded, minlength=count).astype(np.float64)
        sum_squares = np.bincount(bins.owner[others], weights=other_padded**2, minlength=count).astype(np.float64)
        _, here_padded = self._at_degrees(here[:, None], merged_degree[None, :])
        here_padded = here_padded.astype(np.float64)
        sum_padded += here_padded.sum(axis=0)
        sum_squares += (here_padded**2).sum(axis=0)
        sum_patches = None
        if problem.patches is not None:  # the two bins' patches together: they do not depend on the degree
            sum_patches = np.bincount(bins.owner, weights=problem.patches, minlength=count)
            sum_patches += sum_patches[slowest]
        merged = problem.cost.times_from_sums(sum_padded, sum_squares, merged_degree, node_size=problem.node_size,
                                              sum_patches=sum_patches)
        held = None if bins.held is None else bins.held + bins.held[slowest]
        feasible = alive & bins.fits(merged_degree, sum_padded, held)
        feasible[slowest] = False
        score = np.where(feasible, merged, np.inf)
        partner = int(np.argmin(score))

        def merge() -> None:
            bins.merge(slowest, partner)  # looks up its members at the merged degree
            self.times[partner] = -np.inf
            self.times[slowest] = float(score[partner])

        return float(score[partner]), merge

    def _best_split(self, slowest: int, here: np.ndarray):
        """Best two-way split of the slowest bin, all first-part degrees evaluated side by side."""
        bins = self.bins
        degree = int(bins.degree[slowest])
        if degree < 2 or len(here) < 2:
            return np.inf, None
        problem = self.problem
        first = np.arange(1, degree, dtype=np.int64)
        second = degree - first
        cost_first, padded_first = self._at_degrees(here[:, None], first[None, :])
        cost_second, padded_second = self._at_degrees(here[:, None], second[None, :])
        load_first = problem.cost.times_from_sums(0.0, 0.0, first, node_size=problem.node_size)
        load_second = problem.cost.times_from_sums(0.0, 0.0, second, node_size=problem.node_size)
        tokens_first = np.zeros(len(first), dtype=np.int64)
        tokens_second = np.zeros(len(first), dtype=np.int64)
        vision = bins.held is not None
        held_first = np.zeros(len(first), dtype=np.int64) if vision else None
        held_second = np.zeros(len(first), dtype=np.int64) if vision else None
        feasible = np.ones(len(first), dtype=bool)
        to_first = np.zeros((len(here), len(first)), dtype=bool)
        for row in np.argsort(-problem.lengths[here], kind="stable").tolist():
            patches = bins.patches[here[row]] if vision else 0
            fits_first = bins.fits(first, tokens_first + padded_first[row], held_first + patches if vision else None)
            fits_second = bins.fits(second, tokens_second + padded_second[row],
                                    held_second + patches if vision else None)
            ends_first = np.maximum(load_first + cost_first[row], load_second)
            ends_second = np.maximum(load_first, load_second + cost_second[row])
            go_first = fits_first & (~fits_second | (ends_first <= ends_second))
            feasible &= fits_first | fits_second
            to_first[row] = go_first
            load_first = np.where(go_first, load_first + cost_first[row], load_first)
            tokens_first = np.where(go_first, tokens_first + padded_first[row], tokens_first)
            load_second = np.where(go_first, load_second, load_second + cost_second[row])
            tokens_second = np.where(go_first, tokens_second, tokens_second + padded_second[row])
            if vision:
                held_first = np.where(go_first, held_first + patches, held_first)
                held_second = np.where(go_first, held_second, held_second + patches)
        score = np.where(feasible, np.maximum(load_first, load_second), np.inf)
        best = int(np.argmin(score))

        def split() -> None:
            kept, leaving = here[to_first[:, best]].tolist(), here[~to_first[:, best]].tolist()
            bins.split(slowest, kept, leaving, int(first[best]), int(second[best]))  # looks up both parts
            self.times = np.append(self.times, load_second[best])
            self.times[slowest] = load_first[best]

        return float(score[best]), split

    def _transfer(self, sample: int, target: int) -> None:
        left_behind = self.bins.own_cost[sample]
        source = self.bins.move(sample, target)  # looks the sample up at the target's degree
        self.times[source] -= left_behind
        self.times[target] += self.bins.own_cost[sample]
