"""Planner ablation: every stage and tuning constant of ``plan_batch`` switched off (or moved) in turn.

Batch sets on 64 devices (nodes of 8), ``CostModel.default()``, seeds held out from the
other benchmarks (500+):
- short tails: the length distributions of ../shared/data at the planner benchmark's capacities,
  128 and 512 samples;
- memory-bound: 512 EPIC-KITCHENS videos or Mooncake conversations at 16384 tokens per device (7-10 rounds).

Per variant and set: the predicted time over the baseline's (geometric mean over batches; > 1 means
the variant plans worse), the gap to the lower bound, and the median process-CPU time per plan.
Variants run interleaved per batch, in a rotating order.

Usage: python benchmarks/planner_ablation.py [--batches 2] [--json PATH]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root: benchmarks.* tooling
from benchmarks.planner_bench import CAPACITY, draw
from lightning_dhp.data import sample_token_lengths
from lightning_dhp.planner import PlanError, dhp, plan_batch, rebalance, refine

SHORT_TAILS = ("activitynet", "mooncake", "vlm_mix", "azure_conv", "epic_kitchens_segments")
SIZES = (128, 512)  # samples per batch of the short tails
MEMORY_BOUND = ("epic_kitchens_videos", "mooncake")
MEMORY_BOUND_CAPACITY = 16384


def _no_move(*_: object) -> tuple[float, None]:
    return math.inf, None


def _no_static(*_: object, **__: object) -> None:
    raise PlanError("static fallback switched off")


# variant -> [(object, attribute, value)]: what it changes
VARIANTS: dict[str, list[tuple[Any, str, Any]]] = {
    "baseline": [],
    "no refinement": [(refine.Refiner, "run", lambda self, max_steps: 0)],
    "refine: no move": [(refine.Refiner, "_best_move", _no_move)],
    "refine: no swap": [(refine.Refiner, "_best_swap", _no_move)],
    "refine: no merge": [(refine.Refiner, "_best_merge", _no_move)],
    "refine: no split": [(refine.Refiner, "_best_split", lambda self, slowest, here: (math.inf, None))],
    "REFINE_PASSES 8 -> 2": [(dhp, "REFINE_PASSES", 2)],
    "REFINE_STEP_BUDGET 4096 -> 1024": [(dhp, "REFINE_STEP_BUDGET", 1024)],
    "SWAP_PARTNER_BINS 16 -> 4": [(refine, "SWAP_PARTNER_BINS", 4)],
    "no uniform or merge starts (EXTRA_START_SAMPLES 0)": [(dhp, "EXTRA_START_SAMPLES", 0)],
    "no merge start": [(dhp, "MERGE_START", False)],
    "no tight-memory starts/fallback (TIGHT_MEMORY inf)": [(dhp, "TIGHT_MEMORY", math.inf)],
    "no static layouts (nor their extra-round re-plan)": [(dhp, "static_plan", _no_static)],
    "no cross-round rebalancing": [(dhp, "REBALANCE", False)],
    "rebalancing: moves only, no swaps": [(rebalance, "SWAPS", False)],
    "rebalancing: stuck donors searched again every step": [(rebalance, "SKIP_STUCK", False)],
    "rebalancing: full budget at any gap (FULL_BUDGET_GAP 0)": [(rebalance, "FULL_BUDGET_GAP", 0.0)],
    "MAX_CHANGES_PER_SAMPLE 0.25 -> 0.125": [(rebalance, "MAX_CHANGES_PER_SAMPLE", 0.125)],
    "MAX_CHANGES_PER_SAMPLE 0.25 -> 0.5": [(rebalance, "MAX_CHANGES_PER_SAMPLE", 0.5)],
    "rebalance only the best plan (REBALANCE_MARGIN 0)": [(dhp, "REBALANCE_MARGIN", 0.0)],
    "rebalance the static plan too": [(dhp, "SKIP_STATIC_REBALANCE", False)],
    "no pruning of round assignments (PRUNE_MARGIN inf)": [(dhp, "PRUNE_MARGIN", math.inf)],
    "PRUNE_MARGIN 0.02 -> 0": [(dhp, "PRUNE_MARGIN", 0.0)],
    "extra-round re-plan whenever static has rounds (STATIC_CLOSE inf)": [(dhp, "STATIC_CLOSE", math.inf)],
    "no polish (POLISH_STEPS 0)": [(dhp, "POLISH_STEPS", 0)],
    "polish every round (POLISH_ROUNDS inf)": [(dhp, "POLISH_ROUNDS", 10**9)],
    "rebalance margin and polish at any gap (HARD_GAP 0)": [(dhp, "HARD_GAP", 0.0)],
    "POLISH_STEPS 32 -> 16": [(dhp, "POLISH_STEPS", 16)],
    "no static assignment with one more round (STATIC_ROUNDS_EXTRA 0)": [(dhp, "STATIC_ROUNDS_EXTRA", 0)],
    "neither (no rebalancing, no extra-round candidate)": [(dhp, "REBALANCE", False), (dhp, "STATIC_ROUNDS_EXTRA", 0)],
    "STATIC_ROUNDS_EXTRA 1 -> 2": [(dhp, "STATIC_ROUNDS_EXTRA", 2)],
    "CLOSE_ENOUGH 0.03 -> 0": [(dhp, "CLOSE_ENOUGH", 0.0)],
    "CLOSE_ENOUGH 0.03 -> 0.01": [(dhp, "CLOSE_ENOUGH", 0.01)],
    "START_MARGIN 0.1 -> inf (refine every start)": [(dhp, "START_MARGIN", math.inf)],
    "START_MARGIN 0.1 -> 0.02": [(dhp, "START_MARGIN", 0.02)],
    "REFINE_MAX_SAMPLES 128 -> inf (refine every batch)": [(dhp, "REFINE_MAX_SAMPLES", math.inf)],
    "REFINE_MAX_SAMPLES 128 -> 64": [(dhp, "REFINE_MAX_SAMPLES", 64)],
    "TIGHT_STARTS_MULTI_ROUND False -> True": [(dhp, "TIGHT_STARTS_MULTI_ROUND", True)],
}


@contextlib.contextmanager
def patched(changes: list[tuple[Any, str, Any]]) -> Iterator[None]:
    saved = [(owner, name, getattr(owner, name)) for owner, name, _ in changes]
    for owner, name, value in changes:
        setattr(owner, name, value)
    try:
        yield
    finally:
        for owner, name, value in saved:
            setattr(owner, name, value)


def batch_sets(batches: int) -> dict[str, list[tuple[str, np.ndarray, int]]]:
    return {
        **{f"short tails, {size} samples": [(name, draw(name, size, 500 + b), CAPACITY[name])
                                             for name in SHORT_TAILS for b in range(batches)] for size in SIZES},
        "memory-bound": [(name, sample_token_lengths(name, 512, seed=500 + b), MEMORY_BOUND_CAPACITY)
                         for name in MEMORY_BOUND for b in range(batches)],
    }


def run(batches: int, progress: Callable[[str], None]) -> dict[str, Any]:
    sets = batch_sets(batches)
    plan_batch([1, 2, 3], 2, 8)  # first-call imports out of the timings
    names = list(VARIANTS)
    results: dict[str, dict[str, dict[str, list[float]]]] = {
        set_name: {variant: {"time": [], "gap": [], "cpu_ms": []} for variant in names} for set_name in sets
    }
    for set_name, cases in sets.items():
        for index, (distribution, lengths, capacity) in enumerate(cases):
            progress(f"{set_name}: {distribution} batch {index}")
            rotation = names[index % len(names):] + names[: index % len(names)]
            for variant in rotation:
                with patched(VARIANTS[variant]):
                    started = time.process_time()
                    plan = plan_batch(lengths, 64, capacity, node_size=8)
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
    return {"batches_per_distribution": batches, "sets": {k: [c[0] for c in v] for k, v in sets.items()},
            "summary": summary}


def report(result: dict[str, Any]) -> str:
    lines = []
    for set_name, variants in result["summary"].items():
        lines += [f"\n{set_name} ({len(result['sets'][set_name])} batches on 64 devices):", "",
                  "| variant | time / baseline (geomean) | worst | gap to bound | CPU ms median |",
                  "|---|---:|---:|---:|---:|"]
        for variant, row in variants.items():
            lines.append(f"| {variant} | {row['time_over_baseline']:.4f} | {row['worst_time_over_baseline']:.4f} | "
                         f"{row['gap_mean']:.2%} | {row['cpu_ms_median']:.1f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batches", type=int, default=2, help="batches per distribution (default %(default)s)")
    parser.add_argument("--json", help="write the results to this path")
    args = parser.parse_args()
    result = run(args.batches, progress=lambda message: print(message, file=sys.stderr, flush=True))
    print(report(result), end="")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
