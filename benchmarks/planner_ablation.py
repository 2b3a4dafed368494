"""Planner ablation: every stage and tuning constant of ``plan_batch`` switched off (or moved) in turn.

Each variant is ``dataclasses.replace(PlannerOptions(), ...)`` passed to ``plan_batch(options=...)``.

Batch sets on 64 devices (nodes of 8), ``CostModel.default()``, seeds held out from the
other benchmarks (500+):
- short tails: the length distributions of ../shared/data at the planner benchmark's capacities,
  128 and 512 samples;
- memory-bound: 512 EPIC-KITCHENS videos or Mooncake conversations at 16384 tokens per device (7-10 rounds);
and the main job's batches: 32 ``video_digits`` samples on 4 devices at 384 tokens per device, planned with the
job's own model of this machine (``results/e2e/tiny_vlm_cpu_cost_model.json``), 8 per ``--batches``.

Per variant and set: the predicted time over the baseline's (geometric mean over batches; > 1 means
the variant plans worse), the gap to the lower bound, and the median process-CPU time per plan.
Variants run interleaved per batch, in a rotating order.

Usage: python benchmarks/planner_ablation.py [--batches 2] [--sets NAME ...] [--json PATH]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root: benchmarks.* tooling
from benchmarks.planner_bench import CAPACITY, draw
from lightning_dhp.data import sample_token_lengths
from lightning_dhp.data.video_digits import VideoDigits
from lightning_dhp.planner import CostModel, PlannerOptions, plan_batch

SHORT_TAILS = ("activitynet", "mooncake", "vlm_mix", "azure_conv", "epic_kitchens_segments")
SIZES = (128, 512)  # samples per batch of the short tails
MEMORY_BOUND = ("epic_kitchens_videos", "mooncake")
MEMORY_BOUND_CAPACITY = 16384
MAIN_JOB_MODEL = Path(__file__).resolve().parent / "results" / "e2e" / "tiny_vlm_cpu_cost_model.json"
MAIN_JOB_BATCHES_PER_BATCH = 8  # main-job batches per --batches: they plan in milliseconds


NO_REFINEMENT = {"refine_move": False, "refine_swap": False, "refine_merge": False, "refine_split": False}
# variant -> the PlannerOptions fields it changes (dataclasses.replace of the defaults)
VARIANTS: dict[str, dict[str, Any]] = {
    "baseline": {},
    "no refinement": NO_REFINEMENT,
    "refine: no move": {"refine_move": False},
    "refine: no swap": {"refine_swap": False},
    "refine: no merge": {"refine_merge": False},
    "refine: no split": {"refine_split": False},
    "refine_passes 8 -> 2": {"refine_passes": 2},
    "refine_step_budget 4096 -> 1024": {"refine_step_budget": 1024},
    "swap_partner_bins 16 -> 4": {"swap_partner_bins": 4},
    "no uniform or merge starts (extra_start_samples 0)": {"extra_start_samples": 0},
    "no merge start": {"merge_start": False},
    "no tight-memory starts/fallback (tight_memory inf)": {"tight_memory": math.inf},
    "no static layouts (nor their extra-round re-plan)": {"static_layouts": False},
    "no cross-round rebalancing": {"rebalance": False},
    "rebalancing: moves only, no swaps": {"rebalance_swaps": False},
    "rebalancing: stuck donors searched again every step": {"rebalance_skip_stuck": False},
    "rebalancing: full budget at any gap (rebalance_full_budget_gap 0)": {"rebalance_full_budget_gap": 0.0},
    "rebalance_max_changes_per_sample 0.25 -> 0.125": {"rebalance_max_changes_per_sample": 0.125},
    "rebalance_max_changes_per_sample 0.25 -> 0.5": {"rebalance_max_changes_per_sample": 0.5},
    "rebalance only the best plan (rebalance_margin 0)": {"rebalance_margin": 0.0},
    "rebalance the static plan too": {"skip_static_rebalance": False},
    "no pruning of round assignments (prune_margin inf)": {"prune_margin": math.inf},
    "prune_margin 0.02 -> 0": {"prune_margin": 0.0},
    "extra-round re-plan only when static comes within 2% (static_close inf -> 0.02)": {"static_close": 0.02},
    "no polish (polish_steps 0)": {"polish_steps": 0},
    "polish every round (polish_rounds inf)": {"polish_rounds": 10**9},
    "rebalance margin and polish at any gap (hard_gap 0)": {"hard_gap": 0.0},
    "polish_steps 32 -> 16": {"polish_steps": 16},
    "no static assignment with one more round (static_rounds_extra 0)": {"static_rounds_extra": 0},
    "neither (no rebalancing, no extra-round candidate)": {"rebalance": False, "static_rounds_extra": 0},
    "static_rounds_extra 1 -> 2": {"static_rounds_extra": 2},
    "close_enough 0.03 -> 0": {"close_enough": 0.0},
    "close_enough 0.03 -> 0.01": {"close_enough": 0.01},
    "start_margin 0.1 -> inf (refine every start)": {"start_margin": math.inf},
    "start_margin 0.1 -> 0.02": {"start_margin": 0.02},
    "refine_max_samples 128 -> inf (refine every batch)": {"refine_max_samples": 10**9},
    "refine_max_samples 128 -> 64": {"refine_max_samples": 64},
}
OPTIONS = {variant: dataclasses.replace(PlannerOptions(), **changes) for variant, changes in VARIANTS.items()}


class Case(NamedTuple):
    """One batch of a set: where its lengths come from, and the machine it is planned for."""

    distribution: str
    lengths: np.ndarray
    capacity: int  # tokens per device
    devices: int = 64
    node_size: int | None = 8
    cost: CostModel | None = None  # None: CostModel.default()


def batch_sets(batches: int) -> dict[str, list[Case]]:
    main_job = VideoDigits(32 * MAIN_JOB_BATCHES_PER_BATCH * batches, seed=500, sample_fps=0.125, max_frames=64,
                           frame_sizes=[16, 24, 32]).lengths
    main_job_model = CostModel.load(MAIN_JOB_MODEL)
    return {
        **{f"short tails, {size} samples": [Case(name, draw(name, size, 500 + b), CAPACITY[name])
                                             for name in SHORT_TAILS for b in range(batches)] for size in SIZES},
        "memory-bound": [Case(name, sample_token_lengths(name, 512, seed=500 + b), MEMORY_BOUND_CAPACITY)
                         for name in MEMORY_BOUND for b in range(batches)],
        "main job": [Case("video_digits", main_job[32 * b:32 * (b + 1)], 384, devices=4, node_size=None,
                          cost=main_job_model) for b in range(len(main_job) // 32)],
    }


def run(sets: dict[str, list[Case]], batches: int, progress: Callable[[str], None]) -> dict[str, Any]:
    """Every variant on every batch of ``sets`` (:func:`batch_sets` of ``batches``, or some of them)."""
    plan_batch([1, 2, 3], 2, 8)  # first-call imports out of the timings
    names = list(VARIANTS)
    results: dict[str, dict[str, dict[str, list[float]]]] = {
        set_name: {variant: {"time": [], "gap": [], "cpu_ms": []} for variant in names} for set_name in sets
    }
    for set_name, cases in sets.items():
        for index, case in enumerate(cases):
            progress(f"{set_name}: {case.distribution} batch {index}")
            rotation = names[index % len(names):] + names[: index % len(names)]
            for variant in rotation:
                started = time.process_time()
                plan = plan_batch(case.lengths, case.devices, case.capacity, case.cost, node_size=case.node_size,
                                  options=OPTIONS[variant])
                cpu = time.process_time() - started
                plan.validate()
                row = results[set_name][variant]
                row["time"].append(plan.predicted_time)
                row["gap"].append(plan.predicted_time / plan.lower_bound - 1)
                row["cpu_ms"].append(cpu * 1e3)
    summary = {}
    for set_name, variants in results.items():
        base = np.array(variants["baseline"]["time"])
        summary[set_name] = {
            variant: {
                "time_over_baseline": float(np.exp(np.mean(np.log(np.array(row["time"]) / base)))),
                "worst_time_over_baseline": float(np.max(np.array(row["time"]) / base)),
                "gap_mean": float(np.mean(row["gap"])),
                "cpu_ms_median": statistics.median(row["cpu_ms"]),
            }
            for variant, row in variants.items()
        }
    return {"batches_per_distribution": batches,
            "sets": {name: {"distributions": [case.distribution for case in cases], "devices": cases[0].devices}
                     for name, cases in sets.items()},
            "summary": summary}


def report(result: dict[str, Any]) -> str:
    lines = []
    for set_name, variants in result["summary"].items():
        cases = result["sets"][set_name]
        lines += [f"\n{set_name} ({len(cases['distributions'])} batches on {cases['devices']} devices):", "",
                  "| variant | time / baseline (geomean) | worst | gap to bound | CPU ms median |",
                  "|---|---:|---:|---:|---:|"]
        for variant, row in variants.items():
            lines.append(f"| {variant} | {row['time_over_baseline']:.4f} | {row['worst_time_over_baseline']:.4f} | "
                         f"{row['gap_mean']:.2%} | {row['cpu_ms_median']:.1f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batches", type=int, default=2, help="batches per distribution (default %(default)s)")
    parser.add_argument("--sets", nargs="+", metavar="NAME", help="the batch sets to run (default: all)")
    parser.add_argument("--json", help="write the results to this path")
    args = parser.parse_args()
    sets = batch_sets(args.batches)
    if unknown := sorted(set(args.sets or ()) - sets.keys()):
        parser.error(f"unknown batch sets {unknown}; the sets are {list(sets)}")
    chosen = {name: cases for name, cases in sets.items() if args.sets is None or name in args.sets}
    result = run(chosen, args.batches, progress=lambda message: print(message, file=sys.stderr, flush=True))
    print(report(result), end="")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
