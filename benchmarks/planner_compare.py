"""Planner CPU time of two versions of the code, interleaved: the regimes of ``planner_bench.py`` and the main job.

Each alternation runs one worker process per version (the order rotates between alternations), with
``PYTHONPATH`` at that version's tree; a worker plans every case ``--repeats`` times and reports, per
case, the fastest process-CPU time of ``plan_batch`` (the least disturbed by other load on a shared
machine), the plan's predicted step and its digest. Cases: the timing regimes of ``planner_bench.py``
(activitynet, mooncake and vlm_mix at 128 and 512 samples on 64 devices and 8192 on 1024, seed 0, nodes
of 8), its memory-bound batches (512 EPIC-KITCHENS videos or Mooncake conversations on 64 devices at
16384 tokens per device, seed 2000), and the main job's small batches (32 ``video_digits`` samples on 4
devices at 448 tokens per device, ``CostModel.default()``, ``VideoDigits(32 * 16, seed=0,
sample_fps=0.125, max_frames=64, frame_sizes=[16, 24, 32])``, the first 8 batches, timed together). The
table gives, per case, the median over alternations of each version's time, the median [min, max] over
alternations of after / before, the predicted step and CPU / step, and whether the plans' digests agree.

Usage: python benchmarks/planner_compare.py BEFORE_TREE AFTER_TREE [--alternations 3] [--repeats 3] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

from checkouts import alternation_order, run_worker  # beside this script

SMALL_BATCHES, SMALL_SAMPLES, SMALL_DEVICES, SMALL_CAPACITY = 8, 32, 4, 448


def cases() -> list[tuple[str, object, int, int]]:
    """(name, lengths, devices, tokens_per_device) of every case, from the tree on ``sys.path``."""
    from benchmarks.planner_bench import CAPACITY, MEMORY_BOUND, MEMORY_BOUND_CAPACITY, TIMING_DISTRIBUTIONS, draw
    from lightning_dhp.data import sample_token_lengths
    from lightning_dhp.data.video_digits import VideoDigits

    result = []
    for name in TIMING_DISTRIBUTIONS:
        for samples, devices in ((128, 64), (512, 64), (8192, 1024)):
            result.append((f"{name} {samples} / {devices}", draw(name, samples, 0), devices, CAPACITY[name]))
    for name in MEMORY_BOUND:
        result.append((f"memory-bound {name} 512 / 64", sample_token_lengths(name, 512, seed=2000), 64,
                       MEMORY_BOUND_CAPACITY))
    digits = VideoDigits(SMALL_SAMPLES * 16, seed=0, sample_fps=0.125, max_frames=64, frame_sizes=[16, 24, 32])
    small = [digits.lengths[index * SMALL_SAMPLES : (index + 1) * SMALL_SAMPLES] for index in range(SMALL_BATCHES)]
    result.append((f"{SMALL_BATCHES} x video_digits {SMALL_SAMPLES} / {SMALL_DEVICES}, C {SMALL_CAPACITY}", small,
                   SMALL_DEVICES, SMALL_CAPACITY))
    return result


def worker(repeats: int) -> None:
    """Plan every case ``repeats`` times with the planner on ``sys.path``; print one JSON object."""
    from lightning_dhp.planner import plan_batch

    plan_batch([1, 2, 3], 2, 8)  # first-call imports out of the timings
    report = {}
    for name, lengths, devices, capacity in cases():
        batches = lengths if isinstance(lengths, list) else [lengths]
        node_size = None if devices == SMALL_DEVICES else 8
        times = []
        for _ in range(repeats):
            started = time.process_time()
            plans = [plan_batch(batch, devices, capacity, node_size=node_size) for batch in batches]
            times.append(time.process_time() - started)
        report[name] = {"cpu_ms": min(times) * 1e3,
                        "step_s": sum(plan.predicted_time for plan in plans),
                        "digest": "".join(plan.digest() for plan in plans)}
    print(json.dumps(report))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("trees", nargs="*", help="the BEFORE and AFTER repository roots")
    parser.add_argument("--alternations", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", help="write the per-alternation results to this path")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.repeats)
        return
    if len(args.trees) != 2:
        parser.error("give the BEFORE and AFTER repository roots")
    trees = [str(Path(tree).resolve()) for tree in args.trees]
    runs: list[list[dict]] = [[], []]
    for alternation in range(args.alternations):
        for version in alternation_order(alternation):
            runs[version].append(run_worker(Path(trees[version]), __file__, "--worker", "--repeats", str(args.repeats)))
    load = os.getloadavg()[0]
    print(f"{args.alternations} alternations x {args.repeats} repeats, load average {load:.1f}")
    print("| case | before ms | after ms | after / before [min, max] | predicted step s | CPU / step | same plans |")
    print("|---|---:|---:|---:|---:|---:|---|")
    for name in runs[0][0]:
        before = [run[name]["cpu_ms"] for run in runs[0]]
        after = [run[name]["cpu_ms"] for run in runs[1]]
        ratios = [a / b for a, b in zip(after, before, strict=True)]
        step = runs[1][0][name]["step_s"]
        same = all(run[name]["digest"] == runs[0][0][name]["digest"] for run in runs[0] + runs[1])
        print(f"| {name} | {statistics.median(before):.1f} | {statistics.median(after):.1f} | "
              f"{statistics.median(ratios):.2f} [{min(ratios):.2f}, {max(ratios):.2f}] | {step:.3f} | "
              f"{statistics.median(after) / 1e3 / step:.2%} | {'yes' if same else 'NO'} |")
    if args.json:
        Path(args.json).write_text(json.dumps({"trees": trees, "load_average": load, "runs": runs}, indent=1))


if __name__ == "__main__":
    main()
