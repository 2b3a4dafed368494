"""Planner CPU time of two versions of the code, interleaved: the regimes of ``planner_bench.py`` and the main job.

One long-lived worker process per version, with ``PYTHONPATH`` at that version's tree, plans one case at a
time when asked; the two are asked in turn, case by case and repeat by repeat (which one goes first rotates),
so that the versions alternate every few milliseconds and a shared machine's changes of speed hit both alike.
Per alternation, each version's time of a case is the fastest of its ``--repeats`` process-CPU times of
``plan_batch`` (the least disturbed by other load). Cases: the timing regimes of ``planner_bench.py``
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
import sys
import time
from pathlib import Path

from checkouts import Worker, alternation_order  # beside this script

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


def serve() -> None:
    """Plan the case named on each line of input once with the planner on ``sys.path``; reply with one JSON line
    of its process-CPU milliseconds, predicted step and digest."""
    from lightning_dhp.planner import plan_batch

    plan_batch([1, 2, 3], 2, 8)  # first-call imports out of the timings
    inputs = {name: (lengths if isinstance(lengths, list) else [lengths], devices, capacity)
              for name, lengths, devices, capacity in cases()}
    print(json.dumps(list(inputs)), flush=True)
    for line in sys.stdin:
        batches, devices, capacity = inputs[json.loads(line)]
        node_size = None if devices == SMALL_DEVICES else 8
        started = time.process_time()
        plans = [plan_batch(batch, devices, capacity, node_size=node_size) for batch in batches]
        print(json.dumps({"cpu_ms": (time.process_time() - started) * 1e3,
                          "step_s": sum(plan.predicted_time for plan in plans),
                          "digest": "".join(plan.digest() for plan in plans)}), flush=True)


def _alternation(workers: list[Worker], names: list[str], repeats: int, alternation: int) -> list[dict]:
    """Each version's fastest of ``repeats`` runs per case, the versions asked in turn, first one rotating."""
    fastest: list[dict] = [{}, {}]
    for name in names:
        for repeat in range(repeats):
            for version in alternation_order(alternation + repeat):
                result = workers[version].ask(name)
                if name not in fastest[version] or result["cpu_ms"] < fastest[version][name]["cpu_ms"]:
                    fastest[version][name] = result
    return fastest


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("trees", nargs="*", help="the BEFORE and AFTER repository roots")
    parser.add_argument("--alternations", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", help="write the per-alternation results to this path")
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        serve()
        return
    if len(args.trees) != 2:
        parser.error("give the BEFORE and AFTER repository roots")
    trees = [str(Path(tree).resolve()) for tree in args.trees]
    runs: list[list[dict]] = [[], []]
    with Worker(Path(trees[0]), __file__, "--serve") as before, Worker(Path(trees[1]), __file__, "--serve") as after:
        for alternation in range(args.alternations):
            for version, fastest in enumerate(_alternation([before, after], before.ready, args.repeats, alternation)):
                runs[version].append(fastest)
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
