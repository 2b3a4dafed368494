"""Planner time and plan quality on the main job's small batches, one planner checkout against another.

The main job plans 32 ``video_digits`` samples on 4 devices (``tokens_per_device`` 448 or 384) with the
committed CPU cost model (``benchmarks/results/cpu_cost_model.json``) or ``CostModel.default()``: 4 cases.
Its batches are ``VideoDigits(32 * B, seed=0, sample_fps=0.125, max_frames=64, frame_sizes=[16, 24, 32])``
in order; the longer batches use the dataset's defaults (``sample_fps=0.25, max_frames=128``).

Time: ``--batches`` main-job batches per case, each planned ``--repeats`` times (the fastest process-CPU
time counts), mean over the batches; the two checkouts alternate ``--alternations`` times (base first,
then new first, ...), each checkout planning in one long-lived process whose ``PYTHONPATH`` is that checkout
(:class:`checkouts.Worker`: a fresh process per run put a swing of the machine's speed on one checkout only);
per case the median of the per-alternation ratios new / base, with its range. Quality:
``--quality-batches`` main-job and longer batches per case, planned once by each checkout: the predicted step
new / base per batch (its geometric mean, range, and how many are slower or faster) and how many plans changed
(digest).

Usage: python benchmarks/small_batches.py --base DIR [--new DIR] [--alternations 3] [--repeats 3]
[--batches 16] [--quality-batches 64] [--json PATH]
(``DIR``: a checkout's root, the one holding ``lightning_dhp``; ``--new`` defaults to this one.)
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import tempfile
import time
from pathlib import Path

from checkouts import Worker, alternation_order  # beside this script

ROOT = Path(__file__).resolve().parents[1]
CPU_MODEL = ROOT / "benchmarks" / "results" / "cpu_cost_model.json"
DEVICES, SAMPLES = 4, 32
CAPACITIES = (448, 384)
MODELS = ("cpu", "default")
MAIN_JOB = {"sample_fps": 0.125, "max_frames": 64, "frame_sizes": [16, 24, 32]}
LONGER: dict = {}  # the dataset's defaults


def _batches(data: dict, count: int) -> list[list[int]]:
    from lightning_dhp.data.video_digits import VideoDigits

    lengths = VideoDigits(SAMPLES * count, seed=0, **data).lengths
    return [lengths[SAMPLES * index:SAMPLES * (index + 1)].tolist() for index in range(count)]


def _cases(batches: list[list[int]], tag: str) -> list[dict]:
    return [{"name": f"{tag}, C {capacity}, {model} model", "capacity": capacity, "model": model, "batches": batches}
            for capacity in CAPACITIES for model in MODELS]


def serve() -> None:
    """Answer each line of input, ``{"path": ..., "repeats": ...}``, with one JSON line: every batch of the
    cases in ``path`` planned with the ``lightning_dhp`` on ``PYTHONPATH`` (:func:`_planned`)."""
    import lightning_dhp
    from lightning_dhp.planner import CostModel, plan_batch

    models = {"cpu": CostModel.load(CPU_MODEL), "default": CostModel.default()}
    plan_batch([1, 2, 3], 2, 8)  # first-call imports out of the timings
    print(json.dumps({"package": lightning_dhp.__file__}), flush=True)
    for line in sys.stdin:
        request = json.loads(line)
        print(json.dumps(_planned(json.loads(Path(request["path"]).read_text()), request["repeats"], models)),
              flush=True)


def _planned(cases: list[dict], repeats: int, models: dict) -> list[dict]:
    """Per case: the mean over its batches of the fastest of ``repeats`` process-CPU times, each batch's
    predicted step and digest."""
    from lightning_dhp.planner import plan_batch

    results = []
    for case in cases:
        fastest, predicted, digests = [], [], []
        for lengths in case["batches"]:
            best = math.inf
            for _ in range(repeats):
                start = time.process_time()
                plan = plan_batch(lengths, DEVICES, case["capacity"], models[case["model"]])
                best = min(best, time.process_time() - start)
            fastest.append(best)
            predicted.append(plan.predicted_time)
            digests.append(plan.digest())
        results.append({"name": case["name"], "ms": 1e3 * statistics.fmean(fastest), "predicted": predicted,
                        "digests": digests})
    return results


def _run(worker: Worker, path: str, repeats: int) -> dict:
    return {case["name"]: case for case in worker.ask({"path": path, "repeats": repeats})}


def _quality(base: dict, new: dict) -> dict:
    ratios = [after / before for before, after in zip(base["predicted"], new["predicted"], strict=True)]
    return {
        "mean_ms": [1e3 * statistics.fmean(base["predicted"]), 1e3 * statistics.fmean(new["predicted"])],
        "geomean": math.exp(statistics.fmean(math.log(ratio) for ratio in ratios)),
        "min": min(ratios), "max": max(ratios),
        "slower": sum(ratio > 1 + 1e-12 for ratio in ratios), "faster": sum(ratio < 1 - 1e-12 for ratio in ratios),
        "changed": sum(a != b for a, b in zip(base["digests"], new["digests"], strict=True)),
        "batches": len(ratios),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base", type=Path, help="the checkout to compare against")
    parser.add_argument("--new", type=Path, default=ROOT)
    parser.add_argument("--alternations", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batches", type=int, default=16)
    parser.add_argument("--quality-batches", type=int, default=64)
    parser.add_argument("--json", help="write the results to this path")
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        serve()
        return
    if args.base is None:
        parser.error("--base is required")
    checkouts = {"base": args.base.resolve(), "new": args.new.resolve()}
    sys.path.insert(0, str(checkouts["new"]))
    with tempfile.TemporaryDirectory() as directory:
        timing_path, quality_path = f"{directory}/timing.json", f"{directory}/quality.json"
        Path(timing_path).write_text(json.dumps(_cases(_batches(MAIN_JOB, args.batches), "main job's")))
        Path(quality_path).write_text(json.dumps(_cases(_batches(MAIN_JOB, args.quality_batches), "main job's")
                                                 + _cases(_batches(LONGER, args.quality_batches), "longer")))
        runs: dict[str, list[dict]] = {"base": [], "new": []}
        with Worker(checkouts["base"], __file__, "--serve") as base, \
                Worker(checkouts["new"], __file__, "--serve") as new:
            workers = {"base": base, "new": new}
            for which, worker in workers.items():
                assert worker.ready["package"].startswith(str(checkouts[which])), (worker.ready, checkouts[which])
            for worker in workers.values():  # one untimed pass each: the first plans of a process run cold
                _run(worker, timing_path, 1)
            for alternation in range(args.alternations):
                for which in (("base", "new")[index] for index in alternation_order(alternation)):
                    runs[which].append(_run(workers[which], timing_path, args.repeats))
            planned = {which: _run(worker, quality_path, 1) for which, worker in workers.items()}
    timing = {}
    print("| case | base ms | new ms | new / base [range] | new ms / 0.42 s |\n|---|---:|---:|---:|---:|")
    for name in runs["base"][0]:
        base_ms = [run[name]["ms"] for run in runs["base"]]
        new_ms = [run[name]["ms"] for run in runs["new"]]
        ratios = [after / before for before, after in zip(base_ms, new_ms, strict=True)]
        timing[name] = {"base_ms": base_ms, "new_ms": new_ms, "ratios": ratios}
        print(f"| {name} | {statistics.median(base_ms):.2f} | {statistics.median(new_ms):.2f} | "
              f"{statistics.median(ratios):.2f} [{min(ratios):.2f}, {max(ratios):.2f}] | "
              f"{statistics.median(new_ms) / 420:.2%} |")
    quality = {name: _quality(planned["base"][name], planned["new"][name]) for name in planned["base"]}
    print("\n| case | mean predicted ms base -> new | new / base geomean [min, max] | slower / faster | changed |"
          "\n|---|---|---|---|---|")
    for name, row in quality.items():
        print(f"| {name} | {row['mean_ms'][0]:.2f} -> {row['mean_ms'][1]:.2f} | {row['geomean']:.4f} "
              f"[{row['min']:.3f}, {row['max']:.3f}] | {row['slower']} / {row['faster']} of {row['batches']} | "
              f"{row['changed']} |")
    for tag in ("main job's", "longer"):
        logs = [math.log(ratio) for name in quality if name.startswith(tag)
                for ratio in (after / before for before, after in zip(planned["base"][name]["predicted"],
                                                                       planned["new"][name]["predicted"], strict=True))]
        print(f"{tag} batches: geometric mean new / base {math.exp(statistics.fmean(logs)):.4f}")
    if args.json:
        Path(args.json).write_text(json.dumps({"checkouts": {k: str(v) for k, v in checkouts.items()},
                                               "timing": timing, "quality": quality}, indent=1))


if __name__ == "__main__":
    main()
