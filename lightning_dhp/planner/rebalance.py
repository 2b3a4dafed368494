"""Cross-round rebalancing: move or swap samples out of a round's slowest group into other rounds.

Rounds are assigned before they are planned, so a round whose makespan one long sample sets leaves
devices idle while a later round runs longer than it needs to. A change takes one sample from the
slowest group of a round and either moves it to a group of another round with the memory for it, or
swaps it with a sample of another round (the other sample comes back to the slowest group): when
memory binds, a swap is the only way to bring work into a round's idle time. The move that gains most
is taken, or when no move gains, the swap that does: the gain is what the donor round's makespan drops
minus what the receiving round's grows (nothing when the work fits the receiving round's idle time).
Every change shortens the summed makespans; group degrees and ranks stay as they are, and every group
keeps within its memory (padded tokens and, under a vision budget, vision patches).
"""

from __future__ import annotations

import itertools
import math

import numpy as np

from lightning_dhp.planner.assemble import PlannedGroup, build_plan
from lightning_dhp.planner.bins import Bins
from lightning_dhp.planner.cost_model import CostModel, padded_lengths
from lightning_dhp.planner.memory import vision_budget
from lightning_dhp.planner.options import DEFAULT_OPTIONS, PlannerOptions
from lightning_dhp.planner.plan import Plan


def rebalance_plan(
    plan: Plan,
    lengths: np.ndarray,
    cost: CostModel,
    *,
    budget_share: float = 1.0,
    patches: np.ndarray | None = None,
    options: PlannerOptions = DEFAULT_OPTIONS,
) -> Plan:
    """``plan`` after :func:`rebalance` (the same plan when it has one round or no change helps), with
    ``budget_share`` of the change budget its gap to the lower bound allows (in full from
    :attr:`~PlannerOptions.rebalance_full_budget_gap`; ``patches``: the vision patches the plan was timed
    with; the plan's vision budget holds them)."""
    if len(plan.rounds) < 2:
        return plan
    rounds = [[PlannedGroup(group.samples, group.degree, group.ranks[0]) for group in round_.groups]
              for round_ in plan.rounds]
    gap = plan.predicted_time / plan.lower_bound - 1 if plan.lower_bound > 0 else math.inf
    full_gap = options.rebalance_full_budget_gap
    share = budget_share * (min(1.0, gap / full_gap) if full_gap > 0 else 1.0)
    moved = rebalance(rounds, lengths, plan.tokens_per_device, cost, plan.node_size, budget_share=share,
                      patches=patches, vision_patches_per_device=plan.vision_patches_per_device, options=options)
    if moved == rounds:
        return plan
    return build_plan(moved, lengths, plan.num_devices, plan.tokens_per_device, cost, plan.node_size, plan.lower_bound,
                      patches, plan.vision_patches_per_device)


def rebalance(
    rounds: list[list[PlannedGroup]],
    lengths: np.ndarray,
    tokens_per_device: int,
    cost: CostModel,
    node_size: int | None,
    *,
    budget_share: float = 1.0,
    patches: np.ndarray | None = None,
    vision_patches_per_device: int | None = None,
    options: PlannerOptions = DEFAULT_OPTIONS,
) -> list[list[PlannedGroup]]:
    """``rounds`` with samples moved or swapped between rounds while that shortens the summed makespans,
    at most ``budget_share`` of :attr:`~PlannerOptions.rebalance_max_changes_per_sample` changes per sample
    (``patches``: each
    sample's vision patches, None: none; every group keeps within ``tokens_per_device`` and
    ``vision_patches_per_device`` per rank, None: no vision budget).

    Every sample of ``lengths`` must be in some group.
    """
    if len(rounds) < 2:
        return rounds
    state = _Groups(rounds, lengths, tokens_per_device, cost, node_size, patches, vision_patches_per_device, options)
    for _ in range(max(1, int(budget_share * options.rebalance_max_changes_per_sample * len(lengths)))):
        if not state.apply_best_change():
            break
    return state.rounds(rounds)


class _Groups:
    """Every group (:class:`~.bins.Bins`: members, padded token sums and vision patches, and the memory every
    change keeps to) with its sum of squared padded lengths and time, each sample's padded length at each
    degree the plan uses and in each group (a group's time is linear in its padded sum, sum of squares and
    patches), and the rounds the groups form."""

    def __init__(
        self,
        rounds: list[list[PlannedGroup]],
        lengths: np.ndarray,
        tokens_per_device: int,
        cost: CostModel,
        node_size: int | None,
        patches: np.ndarray | None,
        vision_patches_per_device: int | None,
        options: PlannerOptions,
    ) -> None:
        groups = [group for planned in rounds for group in planned]
        self.options = options
        self.num_rounds = len(rounds)
        # donor rounds whose last search found no change; searched again once a change touches them
        self.stuck = np.zeros(len(rounds), dtype=bool)
        sizes = [len(planned) for planned in rounds]
        self.round_of = np.repeat(np.arange(len(rounds)), sizes)
        self.round_start = [0, *itertools.accumulate(sizes)]  # groups of a round are contiguous
        degree = np.array([group.degree for group in groups], dtype=np.int64)
        first = np.array([group.first_rank for group in groups], dtype=np.int64)
        distinct = sorted({group.degree for group in groups})  # the degrees in use, and each group's column
        self.degrees = np.array(distinct, dtype=np.int64)
        degree_column = np.array([distinct.index(group.degree) for group in groups], dtype=np.int64)
        self.padded = padded_lengths(lengths[:, None], self.degrees[None, :]).astype(np.float64)
        self.padded_in_group = self.padded[:, degree_column]  # sample x group: its padded length there
        # token and patch sums in float64, as the times use them (vision patches: None without any)
        self.bins = Bins([list(group.samples) for group in groups], degree, self._padded_at, tokens_per_device,
                         None if patches is None else patches.astype(np.float64),
                         vision_budget(patches, vision_patches_per_device))
        # every group's time holding nothing, one padded token, one squared token, one vision patch (one call)
        unit = np.eye(4)[:, :, None]
        self.fixed, token, square, patch = cost.placed_times(unit[:, 1], unit[:, 2], degree, first, node_size,
                                                             sum_patches=unit[:, 3])
        self.per_token, self.per_square, self.per_patch = token - self.fixed, square - self.fixed, patch - self.fixed
        own = self.bins.own_padded
        self.sample_round = self.round_of[self.bins.owner]  # kept current by _transfer
        self.squares = np.bincount(self.bins.owner, weights=own * own, minlength=len(groups))
        self.time = self.times(self.bins.tokens, self.squares, np.arange(len(groups)), self.bins.held)
        # per round: the slowest group's time and the second largest (0 for a round of one group)
        self.makespan, self.second = np.zeros(self.num_rounds), np.zeros(self.num_rounds)
        for round_index in range(self.num_rounds):
            self._update_round(round_index)
        self.min_gain = options.rebalance_min_gain * float(self.makespan.sum())

    def _padded_at(self, samples: np.ndarray, degrees: np.ndarray) -> tuple[None, np.ndarray]:
        """For :class:`Bins`: no per-sample costs (groups are timed from their sums), the padded lengths."""
        return None, self.padded[samples, np.searchsorted(self.degrees, degrees)]

    def times(
        self, sums: np.ndarray, squares: np.ndarray, groups: np.ndarray | int | slice, patches: np.ndarray | None = None
    ) -> np.ndarray:
        time = self.fixed[groups] + self.per_square[groups] * squares + self.per_token[groups] * sums
        return time if patches is None else time + self.per_patch[groups] * patches

    def _update_round(self, round_index: int) -> None:
        times = sorted(self.time[self.round_start[round_index] : self.round_start[round_index + 1]].tolist())
        self.makespan[round_index], self.second[round_index] = times[-1], times[-2] if len(times) > 1 else 0.0

    def rounds(self, planned: list[list[PlannedGroup]]) -> list[list[PlannedGroup]]:
        """``planned`` with the current members."""
        result: list[list[PlannedGroup]] = [[] for _ in planned]
        flat = [group for groups in planned for group in groups]
        for index, group in enumerate(flat):
            result[self.round_of[index]].append(
                PlannedGroup(tuple(sorted(self.bins.members[index])), group.degree, group.first_rank)
            )
        return result

    def apply_best_change(self) -> bool:
        """Apply the first improving change, donor rounds by how much their slowest group stands out:
        for the samples of the donor's slowest group, the move that gains most, else the swap that gains
        most. False when none improves."""
        round_of, time, makespan, second, bins = self.round_of, self.time, self.makespan, self.second, self.bins
        sums, group_patches, every = bins.tokens, bins.held, slice(None)
        partner_round, partner_own = self.sample_round, bins.own_padded
        round_makespan = makespan[round_of]  # each group's round's
        for donor in np.argsort(-(makespan - second), kind="stable").tolist():
            if makespan[donor] - second[donor] <= self.min_gain:
                return False  # sorted: no later round can gain either
            if self.options.rebalance_skip_stuck and self.stuck[donor]:
                continue
            first = self.round_start[donor]
            slowest = first + int(np.argmax(time[first : self.round_start[donor + 1]]))
            samples = np.array(bins.members[slowest], dtype=np.int64)
            need = self.padded_in_group[samples]  # sample x group: what each would bring to each group
            own = need[:, slowest]
            vision = bins.patches is not None
            leaving = bins.patches[samples] if vision else np.zeros(0)  # the slowest group's samples' patches

            # moves: the sample leaves, nothing comes back (emptying the group would idle its ranks for nothing)
            move_gain, best_move = -np.inf, (0, 0)
            if len(samples) > 1:
                left = self.times(sums[slowest] - own, self.squares[slowest] - own * own, slowest,
                                  group_patches[slowest] - leaving if vision else None)
                arrived = group_patches + leaving[:, None] if vision else None
                need_sums = sums + need
                arrive = self.times(need_sums, self.squares + need * need, every, arrived)
                move_net = np.where(
                    (round_of != donor) & bins.fits(bins.degree, need_sums, arrived),
                    (makespan[donor] - np.maximum(left, second[donor]))[:, None]
                    - np.maximum(0.0, arrive - round_makespan),
                    -np.inf,
                )
                best_move = divmod(int(np.argmax(move_net)), move_net.shape[1])
                move_gain = float(move_net[best_move])
            swap_gain = -np.inf
            if self.options.rebalance_swaps and move_gain <= self.min_gain:
                # swaps: the sample goes to a partner's group, the partner comes back to the slowest group
                here = self.padded_in_group[:, slowest]
                back_sums = sums[slowest] - own[:, None] + here
                back_patches = group_patches[slowest] - leaving[:, None] + bins.patches if vision else None
                back_time = self.times(
                    back_sums, self.squares[slowest] - (own * own)[:, None] + here * here, slowest, back_patches
                )
                partner_group = bins.owner
                there = np.take(need, partner_group, axis=1)  # (whole rows gathered: need[:, ...] is slower)
                there_sums = sums[partner_group] - partner_own + there
                there_patches = group_patches[partner_group] - bins.patches + leaving[:, None] if vision else None
                there_time = self.times(
                    there_sums, self.squares[partner_group] - partner_own * partner_own + there * there, partner_group,
                    there_patches,
                )
                swap_net = np.where(
                    (partner_round != donor) & bins.fits(bins.degree[slowest], back_sums, back_patches)
                    & bins.fits(bins.degree[partner_group], there_sums, there_patches),
                    makespan[donor] - np.maximum(back_time, second[donor])
                    - np.maximum(0.0, there_time - makespan[partner_round]),
                    -np.inf,
                )
                best_swap = divmod(int(np.argmax(swap_net)), swap_net.shape[1])
                swap_gain = float(swap_net[best_swap])
            if max(move_gain, swap_gain) <= self.min_gain:
                self.stuck[donor] = True
                continue
            if move_gain >= swap_gain:  # a move on ties: it changes less
                row, target = int(best_move[0]), int(best_move[1])
                self._transfer(int(samples[row]), target)
            else:
                row, partner = int(best_swap[0]), int(best_swap[1])
                target = int(bins.owner[partner])
                self._transfer(int(samples[row]), target)
                self._transfer(partner, slowest)
            return True
        return False

    def _transfer(self, sample: int, target: int) -> None:
        """Move ``sample`` to group ``target``, updating sums, times and makespans."""
        bins = self.bins
        left_behind = bins.own_padded[sample]
        source = bins.move(sample, target)
        arrived = bins.own_padded[sample]
        touched = [int(self.round_of[source]), int(self.round_of[target])]
        self.stuck[touched] = False
        self.sample_round[sample] = touched[1]
        self.squares[source] -= left_behind * left_behind
        self.squares[target] += arrived * arrived
        for group in (source, target):
            group_patches = None if bins.held is None else bins.held[group]
            self.time[group] = self.times(bins.tokens[group], self.squares[group], group, group_patches)
        for round_index in set(touched):
            self._update_round(round_index)
