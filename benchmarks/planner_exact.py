"""Exact optimum of reduced memory-bound instances: how loose the lower bound is where DHP sits far
above it, and how far DHP, static CP and the DHP paper's algorithm are from the optimum.

Each instance: 10 Mooncake conversation lengths scaled so the batch fills 2.2 rounds of memory, on
8 devices of 4096 tokens in nodes of 4 (the long samples need 3-8 devices, so wide groups pay the
inter-node ring as at full scale), ``CostModel.default()``. The optimum is ``benchmarks.ilp``'s
multi-round ILP (HiGHS) over the fewest rounds memory allows; a round may stay empty. About a minute
of solver time per instance on the 2-core VM.

Usage: python benchmarks/planner_exact.py [--instances 3] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root: benchmarks.* tooling
from benchmarks.ilp import ilp_optimum
from lightning_dhp.data import sample_token_lengths
from lightning_dhp.planner import CostModel, PlanError, plan_batch, static_plan
from lightning_dhp.planner.rounds import minimum_rounds
from lightning_dhp.simulate.peers import paper_plan

NUM_DEVICES, CAPACITY, NODE_SIZE, SAMPLES, FILL = 8, 4096, 4, 10, 2.2


def instance(seed: int) -> np.ndarray:
    base = sample_token_lengths("mooncake", SAMPLES, seed=seed)
    lengths = np.maximum(1, base * (NUM_DEVICES * CAPACITY * FILL / base.sum())).astype(np.int64)
    return np.minimum(lengths, NUM_DEVICES * CAPACITY - 2 * NUM_DEVICES)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--instances", type=int, default=3)
    parser.add_argument("--json", help="write the results to this path")
    args = parser.parse_args()
    cost = CostModel.default()
    rows = []
    print("| lengths | rounds | optimum s | DHP / opt | best static / opt | dhp-paper / opt | bound / opt | ILP s |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for seed in range(300, 300 + args.instances):
        lengths = instance(seed)
        dhp = plan_batch(lengths, NUM_DEVICES, CAPACITY, cost, node_size=NODE_SIZE)
        statics = []
        for degree in (1, 2, 4, 8):
            try:
                static = static_plan(lengths, NUM_DEVICES, CAPACITY, degree, cost, node_size=NODE_SIZE)
                statics.append(static.predicted_time)
            except PlanError:
                continue  # a sample does not fit that degree
        paper = paper_plan(lengths, NUM_DEVICES, CAPACITY, cost, node_size=NODE_SIZE).predicted_time
        rounds = minimum_rounds(lengths, NUM_DEVICES, CAPACITY)
        started = time.perf_counter()
        optimum = ilp_optimum(lengths.tolist(), NUM_DEVICES, CAPACITY, cost, node_size=NODE_SIZE, num_rounds=rounds,
                              time_limit_s=600)
        seconds = time.perf_counter() - started
        row = {
            "lengths": sorted(lengths.tolist(), reverse=True), "rounds": rounds, "optimum_s": optimum,
            "dhp_s": dhp.predicted_time, "dhp_rounds": len(dhp.rounds), "best_static_s": min(statics),
            "paper_s": paper, "lower_bound_s": dhp.lower_bound, "ilp_seconds": seconds,
        }
        rows.append(row)
        shown = "/".join(str(length) for length in row["lengths"])
        if optimum is None:
            print(f"| {shown} | {rounds} | solver gave up | | | | | {seconds:.0f} |")
            continue
        ratios = [dhp.predicted_time, min(statics), paper, dhp.lower_bound]
        print(f"| {shown} | {rounds} | {optimum:.3f} | " + " | ".join(f"{value / optimum:.3f}" for value in ratios)
              + f" | {seconds:.0f} |", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps({"setting": {"devices": NUM_DEVICES, "tokens_per_device": CAPACITY,
                                                           "node_size": NODE_SIZE, "samples": SAMPLES, "fill": FILL},
                                               "instances": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
