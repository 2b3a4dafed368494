"""Cross-round rebalancing: move samples out of a round's slowest group into idle room of other rounds.

Rounds are assigned before they are planned, so a round whose makespan one long sample sets leaves
devices idle while a later round runs longer than it needs to. A move takes one sample from the
slowest group of a round and puts it in a group of another round with the memory for it, where it
gains most: what the donor round's makespan drops minus what the receiving round's grows (nothing
when the sample fits the receiving round's idle time). Every move shortens the summed makespans;
group degrees and ranks stay as they are.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from lightning_dhp.planner.assemble import PlannedGroup, build_plan
from lightning_dhp.planner.cost_model import CostModel, padded_lengths
from lightning_dhp.planner.plan import Plan

# at most this many moves per sample of the batch: on memory-bound 512-sample batches 0.25 reaches all
# but 0.1% of what unlimited moves give (4.3% against 4.4% over static CP), 0.1 only 3.7%
MAX_MOVES_PER_SAMPLE = 0.25
MIN_GAIN = 1e-9  # relative: a move must shorten its donor round by more than this


def rebalance_plan(plan: Plan, lengths: np.ndarray, cost: CostModel) -> Plan:
    """``plan`` after :func:`rebalance` (the same plan when it has one round or no move helps)."""
    if len(plan.rounds) < 2:
        return plan
    rounds = [[PlannedGroup(group.samples, group.degree, group.ranks[0]) for group in round_.groups]
              for round_ in plan.rounds]
    moved = rebalance(rounds, lengths, plan.tokens_per_device, cost, plan.node_size)
    if moved == rounds:
        return plan
    return build_plan(moved, lengths, plan.num_devices, plan.tokens_per_device, cost, plan.node_size, plan.lower_bound)


def rebalance(
    rounds: list[list[PlannedGroup]],
    lengths: np.ndarray,
    tokens_per_device: int,
    cost: CostModel,
    node_size: int | None,
) -> list[list[PlannedGroup]]:
    """``rounds`` with samples moved between rounds while that shortens the summed makespans."""
    groups = [group for planned in rounds for group in planned]
    if len(rounds) < 2:
        return rounds
    round_of = np.repeat(np.arange(len(rounds)), [len(planned) for planned in rounds])
    degree = np.array([group.degree for group in groups], dtype=np.int64)
    first = np.array([group.first_rank for group in groups], dtype=np.int64)
    crosses = np.zeros(len(groups), dtype=bool) if node_size is None else first // node_size != (
        first + degree - 1
    ) // node_size
    members = [list(group.samples) for group in groups]
    padded = [padded_lengths(lengths[list(samples)], d).astype(np.float64)
              for samples, d in zip(members, degree, strict=True)]
    sum_p = np.array([values.sum() for values in padded])
    sum_p2 = np.array([(values * values).sum() for values in padded])
    capacity = degree * tokens_per_device

    # a group's time is linear in its padded sum and sum of squares: fixed + per_square * squares +
    # per_token * sums, with coefficients fixed by its degree and whether it crosses a node (node_size=0
    # makes a group pay the inter-node bandwidth, as in build_plan)
    zero, one = np.zeros(len(groups)), np.ones(len(groups))

    def at_degrees(sums: np.ndarray, squares: np.ndarray) -> np.ndarray:
        inside = cost.times_from_sums(sums, squares, degree)
        return np.where(crosses, cost.times_from_sums(sums, squares, degree, node_size=0), inside)

    fixed = at_degrees(zero, zero)
    per_token, per_square = at_degrees(one, zero) - fixed, at_degrees(zero, one) - fixed

    def times(sums: np.ndarray, squares: np.ndarray, which: np.ndarray) -> np.ndarray:
        return fixed[which] + per_square[which] * squares + per_token[which] * sums

    every = np.arange(len(groups))
    time = times(sum_p, sum_p2, every)
    for _ in range(max(1, int(MAX_MOVES_PER_SAMPLE * len(lengths)))):
        move = _best_move(members, lengths, degree, round_of, time, sum_p, sum_p2, capacity, len(rounds), times)
        if move is None:
            break
        sample, donor_group, target, own, need, left, arrive = move
        members[donor_group].remove(sample)
        members[target].append(sample)
        sum_p[donor_group] -= own
        sum_p2[donor_group] -= own * own
        sum_p[target] += need
        sum_p2[target] += need * need
        time[donor_group], time[target] = left, arrive
    result: list[list[PlannedGroup]] = [[] for _ in rounds]
    for index, group in enumerate(groups):
        result[round_of[index]].append(PlannedGroup(tuple(sorted(members[index])), group.degree, group.first_rank))
    return result


def _best_move(
    members: list[list[int]],
    lengths: np.ndarray,
    degree: np.ndarray,
    round_of: np.ndarray,
    time: np.ndarray,
    sum_p: np.ndarray,
    sum_p2: np.ndarray,
    capacity: np.ndarray,
    num_rounds: int,
    times: Callable[[np.ndarray, np.ndarray, np.ndarray], np.ndarray],
) -> tuple[int, int, int, float, float, float, float] | None:
    """The first improving move, donor rounds by how much their slowest group stands out: the sample of
    the donor's slowest group and the group of another round (with memory for it) that gain most, as
    (sample, donor group, target group, its padded length there and at the target, the donor group's
    and the target's new times). None when no move improves."""
    every = np.arange(len(time))
    makespan = np.zeros(num_rounds)
    np.maximum.at(makespan, round_of, time)
    second = _second_largest(time, round_of, num_rounds)
    target_makespan = makespan[round_of]
    for donor in np.argsort(-(makespan - second), kind="stable").tolist():
        if makespan[donor] - second[donor] <= MIN_GAIN * makespan[donor]:
            break  # sorted: no later round can gain either
        in_round = every[round_of == donor]
        slowest = int(in_round[np.argmax(time[in_round])])
        if len(members[slowest]) < 2:
            continue  # emptying the group would leave its ranks idle for nothing
        samples = np.array(members[slowest], dtype=np.int64)
        own = padded_lengths(lengths[samples], degree[slowest]).astype(np.float64)
        left = times(sum_p[slowest] - own, sum_p2[slowest] - own * own, np.full(len(samples), slowest))
        gain = makespan[donor] - np.maximum(left, second[donor])
        need = padded_lengths(lengths[samples][:, None], degree[None, :]).astype(np.float64)
        arrive = times(sum_p[None, :] + need, sum_p2[None, :] + need * need, np.broadcast_to(every, need.shape))
        growth = np.maximum(0.0, arrive - target_makespan[None, :])  # how much the receiving round slows
        net = np.where((round_of[None, :] != donor) & (sum_p[None, :] + need <= capacity[None, :]),
                       gain[:, None] - growth, -np.inf)
        best = np.unravel_index(int(np.argmax(net)), net.shape)
        if net[best] <= MIN_GAIN * makespan[donor]:
            continue
        row, target = int(best[0]), int(best[1])
        return (int(samples[row]), slowest, target, float(own[row]), float(need[row, target]), float(left[row]),
                float(arrive[row, target]))
    return None


def _second_largest(time: np.ndarray, round_of: np.ndarray, num_rounds: int) -> np.ndarray:
    """Per round, the second-largest group time (0 for a round of one group)."""
    order = np.lexsort((-time, round_of))  # by round, slowest group first
    first_of_round = np.concatenate([[True], round_of[order][1:] != round_of[order][:-1]])
    rest = order[~first_of_round]
    second = np.zeros(num_rounds)
    np.maximum.at(second, round_of[rest], time[rest])
    return second
