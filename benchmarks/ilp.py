"""Exact optimum of a plan by integer programming (scipy HiGHS; one round, or a few rounds of a
reduced instance), and the small instances and cost models the planner's quality test and benchmark
share.

Slots: ``floor(N / d)`` candidate groups of every degree ``d``. Binary ``x[i, s]`` puts sample ``i``
in slot ``s``, binary ``y[s]`` opens slot ``s``; minimise the makespan ``T`` subject to: every
sample in one slot, only open slots hold samples, per-slot padded memory ``<= d * C``, per-slot
time ``fixed(d) y[s] + sum_i cost_i(d) x[i, s] <= T``, and ``sum_s d y[s] <= N``. Group times use the
same additive decomposition as the planner (a group larger than ``node_size`` pays inter-node
bandwidth; placement itself is not modelled), so the optimum is comparable with
``plan_batch(...).predicted_time`` for batches that fit in one round.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Sequence

import numpy as np

from lightning_dhp.planner.cost_model import CostModel, padded_lengths

_DEFAULT = CostModel.default()
ILP_COST_MODELS: dict[str, CostModel] = {
    "default": _DEFAULT,
    # ring traffic and latency 20x dearer: small groups win, the opposite regime of the default
    "comm_heavy": dataclasses.replace(_DEFAULT, ring_step_latency_s=0.02, comm_overlap=0.0, intra_node_bytes_per_s=5e9),
    "attention_heavy": dataclasses.replace(_DEFAULT, attention_s_per_token2=2e-7),
}


def small_instances(seed: int, count: int) -> Iterator[tuple[list[int], int, int]]:
    """``count`` random ``(lengths, num_devices, tokens_per_device)``: 2-8 samples (uniform or
    long-tailed) on 2-8 devices, small enough for the ILP to solve exactly in about a second."""
    rng = np.random.default_rng(seed)
    for _ in range(count):
        num_samples, num_devices = int(rng.integers(2, 9)), int(rng.integers(2, 9))
        capacity = int(rng.choice([2048, 8192]))
        if rng.random() < 0.5:
            lengths = rng.integers(50, 3 * capacity // 2, size=num_samples)
        else:
            lengths = (rng.pareto(1.0, size=num_samples) * 800 + 50).astype(int)
        lengths = np.minimum(lengths, capacity * num_devices - 2 * num_devices).tolist()
        yield lengths, num_devices, capacity


def ilp_optimum(
    lengths: Sequence[int],
    num_devices: int,
    tokens_per_device: int,
    cost_model: CostModel | None = None,
    *,
    node_size: int | None = None,
    num_rounds: int = 1,
    time_limit_s: float = 30.0,
) -> float | None:
    """Minimum summed makespan of ``num_rounds`` rounds in seconds (the one-round makespan by
    default), or None if no such plan exists (or the solver times out).

    With several rounds every round gets its own slots, device budget and makespan ``T_r``; the
    objective is ``sum_r T_r`` and ``T_r >= T_{r+1}`` breaks the symmetry between rounds. A round may
    stay empty (it then costs nothing), so the result is the optimum over at most ``num_rounds``.
    """
    from scipy.optimize import Bounds, LinearConstraint, milp
    from scipy.sparse import lil_matrix

    cost = cost_model or CostModel.default()
    lengths_array = np.asarray(lengths, dtype=np.int64)
    num_samples = len(lengths_array)
    round_degrees = [d for d in range(1, num_devices + 1) for _ in range(min(num_devices // d, num_samples))]
    slot_degrees = round_degrees * num_rounds
    slot_round = [r for r in range(num_rounds) for _ in round_degrees]
    num_slots = len(slot_degrees)
    num_x = num_samples * num_slots
    num_vars = num_x + num_slots + num_rounds  # x (sample-major), y, T per round

    def x_index(sample: int, slot: int) -> int:
        return sample * num_slots + slot

    def t_index(round_index: int) -> int:
        return num_x + num_slots + round_index

    rows: list[tuple[dict[int, float], float, float]] = []
    for sample in range(num_samples):
        rows.append(({x_index(sample, slot): 1.0 for slot in range(num_slots)}, 1.0, 1.0))
    zeros = np.zeros(1)
    for slot, degree in enumerate(slot_degrees):
        padded = padded_lengths(lengths_array, degree)
        fixed = float(cost.times_from_sums(zeros, zeros, np.array([degree]), node_size=node_size)[0])
        costs = cost.times_from_sums(
            padded.astype(np.float64), padded.astype(np.float64) ** 2, np.full(num_samples, degree), node_size=node_size
        ) - fixed
        y = num_x + slot
        memory = {x_index(sample, slot): float(padded[sample]) for sample in range(num_samples)}
        memory[y] = -float(degree * tokens_per_device)
        rows.append((memory, -np.inf, 0.0))
        timing = {x_index(sample, slot): float(costs[sample]) for sample in range(num_samples)}
        timing[y] = fixed
        timing[t_index(slot_round[slot])] = -1.0
        rows.append((timing, -np.inf, 0.0))
        for sample in range(num_samples):
            rows.append(({x_index(sample, slot): 1.0, y: -1.0}, -np.inf, 0.0))
        if slot + 1 < num_slots and slot_degrees[slot + 1] == degree and slot_round[slot + 1] == slot_round[slot]:
            rows.append(({y + 1: 1.0, y: -1.0}, -np.inf, 0.0))  # symmetry: open slots of a degree in order
    for round_index in range(num_rounds):
        budget = {num_x + slot: float(degree) for slot, degree in enumerate(slot_degrees)
                  if slot_round[slot] == round_index}
        rows.append((budget, -np.inf, float(num_devices)))
        if round_index + 1 < num_rounds:
            rows.append(({t_index(round_index + 1): 1.0, t_index(round_index): -1.0}, -np.inf, 0.0))
    matrix = lil_matrix((len(rows), num_vars))
    lower = np.empty(len(rows))
    upper = np.empty(len(rows))
    for row_index, (coefficients, row_lower, row_upper) in enumerate(rows):
        for column, value in coefficients.items():
            matrix[row_index, column] = value
        lower[row_index], upper[row_index] = row_lower, row_upper
    objective = np.zeros(num_vars)
    objective[num_x + num_slots :] = 1.0
    integrality = np.ones(num_vars)
    integrality[num_x + num_slots :] = 0
    var_upper = np.ones(num_vars)
    var_upper[num_x + num_slots :] = np.inf
    result = milp(
        objective,
        constraints=LinearConstraint(matrix.tocsr(), lower, upper),
        integrality=integrality,
        bounds=Bounds(np.zeros(num_vars), var_upper),
        options={"time_limit": time_limit_s, "mip_rel_gap": 1e-6},
    )
    if result.status != 0 or result.x is None:
        return None
    return float(result.x[num_x + num_slots :].sum())
