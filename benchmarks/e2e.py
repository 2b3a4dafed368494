"""End to end: the example's VLM fine-tuning under DHP, static ring CP and plain data parallelism on gloo CPU processes.

Every variant trains the example's model (tiny VLM, ``VLMTask``, random initialisation, same seed) on
the example's data (``VideoDigits``: synthetic video questions with real video durations, the same
global batches in the same order) for the same number of optimizer steps, on ``--devices`` CPU
processes launched by Lightning (one subprocess per training run, ``benchmarks/_e2e_run.py``):

- DHP: ``DHPStrategy(tokens_per_device=T)``, every global batch planned onto groups of any degree;
- static ring CP at every degree d that divides the device count and fits the longest sample of the
  dataset (Megatron-style: one degree for the whole run, DP = devices / d), same T;
- data parallel: degree 1 for every sample (``DHPStrategy(static_degree=1)``, the app's
  ``strategy=data_parallel``), with T raised to the longest sample; it ignores the memory budget that
  forces CP on the others, so it is a reference, not a candidate for "best static".

Runs are interleaved and the order rotates (repeat 1: variants 1..n, repeat 2: 2..n then 1, ...), so
no variant always runs first or on the same load. Throughput is the steady state: real (unpadded)
tokens over the measured step times of ``DHPPlanReport.history`` (batch start to batch end, every
step), leaving out the first ``--warmup-steps`` steps. The table gives the median over repeats and
the min-max; the ratio lines give DHP over the best static CP variant per repeat (median, min-max),
steady state and whole run (the wall time of ``trainer.fit``: setup, pool misses, warm-up and every
step). Beside them: the predicted step time, the wait for each batch (end of one step to the start of the
next, median and p90 over the timed steps; near zero when the loader workers keep up) and the planner's CPU time
in the workers, absolute and as a share of the predicted step (the target: under 1%).
Exactness: the float32 global loss of every step must agree across variants to float32 rounding, and
a separate float64 run of every variant (``--check-steps``) must agree to ~1e-9 relative in the
final parameters (they compute the same math; only the order of sums differs); its final loss agrees
to float32 rounding, since DHPStrategy logs ``dhp/loss`` in float32.

Usage: python benchmarks/e2e.py [--quick] [--json PATH] [--devices 4] [--steps N] [--repeats R]
       [--distribution activitynet] [--tokens-per-device T] [--check-steps K] [HYDRA_OVERRIDE ...]
(overrides of lightning_dhp/conf/vlm_finetune.yaml, e.g. data.sample_fps=0.25 data.global_batch_size=64)
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _e2e_run import compose_config  # a sibling helper: benchmarks/ is not a package

from lightning_dhp.app.main import build_datasets
from lightning_dhp.data import DISTRIBUTIONS
from lightning_dhp.data.video_digits import TEXT_TOKENS_PER_SAMPLE
from lightning_dhp.planner.baselines import divisors
from lightning_dhp.planner.inputs import min_degrees
from lightning_dhp.simulate.provenance import stamp
from lightning_dhp.testing import run_job

REPO = Path(__file__).resolve().parents[1]
WORKER = Path(__file__).resolve().parent / "_e2e_run.py"
# Distributions whose metadata has a per-video duration (what VideoDigits draws).
VIDEO_DISTRIBUTIONS = tuple(name for name, spec in DISTRIBUTIONS.items() if spec.columns[0] == "duration_s")
QUICK_OVERRIDES = ("data.num_train=256", "data.global_batch_size=8", "data.num_workers=0")
CHECK_OVERRIDES = ("data.num_workers=0",)
RUN_ENV = {"OMP_NUM_THREADS": "1", "TORCH_DEVICE_BACKEND_AUTOLOAD": "0"}


@dataclass(frozen=True)
class Variant:
    """One parallelisation of the same training: DHP (``static_degree=None``) or a fixed degree."""

    name: str
    tokens_per_device: int
    static_degree: int | None
    within_budget: bool  # respects the memory budget T shared by DHP and static CP


def variants(lengths: np.ndarray, devices: int, tokens_per_device: int) -> list[Variant]:
    """DHP, static ring CP at each degree dividing ``devices`` that fits the longest sample, data parallel."""
    longest = int(lengths.max())
    fewest = int(min_degrees(np.array([longest]), tokens_per_device)[0])
    degrees = [degree for degree in divisors(devices) if degree >= fewest]
    if not degrees:
        raise SystemExit(f"the longest sample ({longest} tokens) needs degree {fewest} at tokens_per_device="
                         f"{tokens_per_device}, more than the {devices} devices; raise --tokens-per-device")
    found = [Variant("DHP", tokens_per_device, None, True)]
    found += [Variant(f"static CP d={d}", tokens_per_device, d, True) for d in degrees]
    if fewest > 1:
        found.append(Variant(f"data parallel (d=1, T={longest})", longest, 1, False))
    return found


class RunFailed(Exception):
    """A training run that failed or did not finish in time (its processes are killed)."""


def train(variant: Variant, base: dict[str, Any], folder: Path, tag: str, timeout_s: float) -> dict[str, Any]:
    """One training run of ``variant`` in a fresh set of processes; rank 0's result, or :class:`RunFailed`.

    The run has a session of its own, so a hung run is killed with every rank Lightning launched."""
    spec = {**base, "tokens_per_device": variant.tokens_per_device, "static_degree": variant.static_degree,
            "report_dir": str(folder / f"{tag}.report")}
    spec_path, result_path = folder / f"{tag}.spec.json", folder / f"{tag}.result.json"
    if base.get("save_params"):
        spec["params_path"] = str(folder / f"{tag}.params.pt")
    spec_path.write_text(json.dumps(spec))
    exit_code, stderr = run_job([sys.executable, str(WORKER), str(spec_path), str(result_path)], timeout_s,
                                cwd=REPO, env=RUN_ENV)
    if exit_code is None:
        raise RunFailed(f"training run {tag} ({variant.name}) did not finish within {timeout_s:.0f} s and was "
                        f"killed:\n{stderr[-4000:]}")
    if exit_code or not result_path.exists():
        raise RunFailed(f"training run {tag} ({variant.name}) failed with exit code {exit_code}:\n{stderr[-4000:]}")
    result = json.loads(result_path.read_text())
    if "params_path" in spec:
        result["params"] = torch.load(spec["params_path"])
    return result


def train_with_retries(variant: Variant, base: dict[str, Any], folder: Path, tag: str, timeout_s: float,
                       retries: int, failures: list[dict[str, Any]]) -> dict[str, Any] | None:
    """:func:`train`, tried again up to ``retries`` times; every failure is recorded in ``failures``, and
    ``None`` comes back when no attempt succeeded (the benchmark goes on without that run)."""
    for attempt in range(1 + retries):
        try:
            return train(variant, base, folder, f"{tag}a{attempt}", timeout_s)
        except RunFailed as failure:
            failures.append({"run": tag, "variant": variant.name, "attempt": attempt, "reason": str(failure)})
            print(f"  {tag} {variant.name}: attempt {attempt + 1} failed: {str(failure).splitlines()[0]}", flush=True)
    return None


def spread(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "n": len(values)}


def relative_difference(values: list[float]) -> float:
    """Largest pairwise difference of ``values`` relative to their largest magnitude."""
    return (max(values) - min(values)) / max(abs(value) for value in values)


def rotated_order(count: int, repeat: int) -> list[int]:
    """Variant indices of one repeat: repeat r starts at variant r (mod count) and wraps around."""
    return [(repeat + offset) % count for offset in range(count)]


def measure(found: list[Variant], base: dict[str, Any], repeats: int, folder: Path, timeout_s: float,
            retries: int, failures: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    """Every variant once per repeat, interleaved in rotating order; the runs of each variant (in repeat
    order, each with its repeat and its position in it). A run that fails every attempt is left out."""
    runs: dict[str, list[dict[str, Any]]] = {variant.name: [] for variant in found}
    for repeat in range(repeats):
        for position, index in enumerate(rotated_order(len(found), repeat)):
            variant = found[index]
            result = train_with_retries(variant, base, folder, f"r{repeat}v{index}", timeout_s, retries, failures)
            if result is None:
                continue
            runs[variant.name].append({**result, "repeat": repeat, "position_in_repeat": position})
            print(f"  repeat {repeat + 1}/{repeats} {variant.name:<22} {result['steady']['tokens_per_s']:9.0f} "
                  f"tokens/s  final loss {result['losses'][-1]:.6f}", flush=True)
    return runs


def summarise(found: list[Variant], runs: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    """Per variant: throughput spread and plan statistics; DHP over the best static CP variant."""
    rows = {}
    for variant in found:
        results = runs[variant.name]
        if not results:
            raise SystemExit(f"every run of {variant.name} failed; see the failures above")
        rows[variant.name] = {
            **asdict(variant),
            "tokens_per_s": spread([result["steady"]["tokens_per_s"] for result in results]),
            "step_s_median": statistics.median(result["steady"]["step_s_median"] for result in results),
            **{key: statistics.median(result["steady"][key] for result in results)
               for key in ("predicted_step_s_median", "batch_wait_ms_median", "batch_wait_ms_p90",
                           "planner_cpu_ms_median", "planner_share_of_predicted_step_median")},
            "rounds_per_step": results[0]["steady"]["rounds_per_step"],
            "groups_by_degree": results[0]["steady"]["groups_by_degree"],
            "final_loss": results[0]["losses"][-1],
            "fit_s": spread([result["fit_s"] for result in results]),
        }
    static = [variant.name for variant in found if variant.static_degree is not None and variant.within_budget]
    best = max(static, key=lambda name: rows[name]["tokens_per_s"]["median"])
    best_by_repeat = {run["repeat"]: run for run in runs[best]}
    pairs = [(dhp, best_by_repeat[dhp["repeat"]]) for dhp in runs["DHP"] if dhp["repeat"] in best_by_repeat]
    steady = [dhp["steady"]["tokens_per_s"] / other["steady"]["tokens_per_s"] for dhp, other in pairs]
    whole_run = [other["fit_s"] / dhp["fit_s"] for dhp, other in pairs]  # same steps: time ratio = speedup
    losses = [run["losses"] for results in runs.values() for run in results]
    step_agreement = max(relative_difference([run[step] for run in losses]) for step in range(len(losses[0])))
    return {"variants": rows, "best_static": best, "dhp_over_best_static": spread(steady),
            "dhp_over_best_static_whole_run": spread(whole_run),
            "dhp_over_best_static_of_medians": rows["DHP"]["tokens_per_s"]["median"] / rows[best]["tokens_per_s"][
                "median"], "float32_loss_max_relative_difference": step_agreement}


def exactness_check(found: list[Variant], base: dict[str, Any], folder: Path, timeout_s: float, retries: int,
                    failures: list[dict[str, Any]]) -> dict[str, Any]:
    """Every variant once in float64: final parameters agree to ~1e-9 relative, the logged loss to float32."""
    attempted = [(variant, train_with_retries(variant, base, folder, f"check{index}", timeout_s, retries, failures))
                 for index, variant in enumerate(found)]
    done = [(variant, result) for variant, result in attempted if result is not None]
    if len(done) < 2:
        return {"steps": base["steps"], "failed": "fewer than two float64 runs finished"}
    reference = done[0][1]["params"]
    scale = float(reference.abs().max())
    return {
        "steps": base["steps"],
        "final_losses": {variant.name: result["losses"][-1] for variant, result in done},
        "loss_max_relative_difference": relative_difference([result["losses"][-1] for _, result in done]),
        "params_max_relative_difference": max(float((result["params"] - reference).abs().max()) / scale
                                              for _, result in done),
    }


def length_rule(cfg: Any, distribution: str) -> str:
    """The rule that turns a video duration into a sample's token count, with this run's constants."""
    data, patch = cfg.data, cfg.model.config.patch_size
    return (f"{distribution} durations ({DISTRIBUTIONS[distribution].file}); frames = min({data.max_frames}, "
            f"max(1, floor(duration_s x {data.sample_fps}))); tokens = frames x (H/{patch}) x (W/{patch}) + "
            f"{TEXT_TOKENS_PER_SAMPLE} text tokens, H and W drawn from {list(data.frame_sizes)} px")


def format_report(result: dict[str, Any]) -> str:
    """Markdown: the setting, one row per variant, the ratio line and the exactness lines."""
    setting, summary = result["setting"], result["summary"]
    stats = setting["lengths"]
    lines = [
        f"End to end: {setting['devices']} gloo CPU processes, {setting['steps']} steps ({setting['warmup_steps']} "
        f"warm-up steps not timed), {setting['repeats']} repeat(s) interleaved in rotating order, global batch "
        f"{setting['global_batch_size']}, tokens_per_device T={setting['tokens_per_device']}, cost model "
        f"{setting['cost_model']}",
        f"{result['date']} on {result['machine']}; load average at the end {result['load_average_after']:.1f}",
        f"Lengths: {setting['length_rule']}; dataset of {stats['samples']}: p10 {stats['p10']:.0f}, p50 "
        f"{stats['p50']:.0f}, p90 {stats['p90']:.0f}, p99 {stats['p99']:.0f}, max {stats['max']} tokens",
        "",
        "| strategy | tokens/s median | min-max | step s (median) | rounds/step | groups by degree | fit s median "
        "| final loss | predicted step s | batch wait ms median / p90 | planner CPU ms (% of predicted step) |",
        "|---|---:|---:|---:|---:|---|---:|---:|---:|---:|---:|",
    ]
    for name, row in summary["variants"].items():
        rate = row["tokens_per_s"]
        degrees = " ".join(f"{degree}:{count}" for degree, count in row["groups_by_degree"].items())
        lines.append(f"| {name} | {rate['median']:.0f} | {rate['min']:.0f}-{rate['max']:.0f} | "
                     f"{row['step_s_median']:.3f} | {row['rounds_per_step']:.2f} | {degrees} | "
                     f"{row['fit_s']['median']:.1f} | {row['final_loss']:.6f} | "
                     f"{row['predicted_step_s_median']:.3f} | {row['batch_wait_ms_median']:.1f} / "
                     f"{row['batch_wait_ms_p90']:.1f} | {row['planner_cpu_ms_median']:.1f} "
                     f"({row['planner_share_of_predicted_step_median']:.1%}) |")
    ratio, whole = summary["dhp_over_best_static"], summary["dhp_over_best_static_whole_run"]
    lines += [
        "",
        f"DHP over best static ({summary['best_static']}): steady state {ratio['median']:.3f}x median per repeat "
        f"(min-max {ratio['min']:.3f}-{ratio['max']:.3f}; ratio of medians "
        f"{summary['dhp_over_best_static_of_medians']:.3f}x); whole run (fit wall time) {whole['median']:.3f}x "
        f"(min-max {whole['min']:.3f}-{whole['max']:.3f})",
        f"Loss agreement (float32, every step, every run): max relative difference "
        f"{summary['float32_loss_max_relative_difference']:.1e}",
    ]
    check = result.get("float64_check")
    if check and "failed" in check:
        lines.append(f"Exactness (float64): not checked, {check['failed']}")
    elif check:
        lines.append(f"Exactness (float64, {check['steps']} steps, every variant): final parameters max relative "
                     f"difference {check['params_max_relative_difference']:.1e}; final loss "
                     f"{check['loss_max_relative_difference']:.1e} (dhp/loss is logged in float32)")
    if result["failures"]:
        failed = ", ".join(f"{failure['run']} ({failure['variant']})" for failure in result["failures"])
        lines.append(f"Failed attempts (each retried up to {setting['retries']} times; a run whose attempts all "
                     f"failed is left out): {failed}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="2 processes, 2 steps, 1 repeat, no float64 check")
    parser.add_argument("--json", help="write the results to this path")
    parser.add_argument("--devices", type=int, help="gloo processes (default 4; quick 2)")
    parser.add_argument("--steps", type=int, help="optimizer steps per run (default 30; quick 2)")
    parser.add_argument("--warmup-steps", type=int, help="first steps left out of the throughput (default 5; quick 0)")
    parser.add_argument("--repeats", type=int, help="interleaved repeats (default 3; quick 1)")
    parser.add_argument("--distribution", choices=VIDEO_DISTRIBUTIONS, default="activitynet",
                        help="video durations the lengths come from")
    parser.add_argument("--tokens-per-device", type=int, help="memory budget T (default: the example's)")
    parser.add_argument("--cost-model", help="CostModel JSON for every variant (default: CostModel.default(); "
                                                 "the example profiles its own, see lightning_dhp/app)")
    parser.add_argument("--check-steps", type=int, help="steps of the float64 exactness runs (default 3; 0 or "
                                                        "quick: none)")
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds one training run may take")
    parser.add_argument("--retries", type=int, default=1, help="attempts after a failed or hung run")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides of lightning_dhp/conf/vlm_finetune.yaml")
    args = parser.parse_args()
    quick = args.quick
    devices = args.devices or (2 if quick else 4)
    steps = args.steps or (2 if quick else 30)
    warmup = args.warmup_steps if args.warmup_steps is not None else (0 if quick else 5)
    repeats = args.repeats or (1 if quick else 3)
    check_steps = args.check_steps if args.check_steps is not None else (0 if quick else 3)
    if steps <= warmup:
        raise SystemExit(f"--steps {steps} leaves no timed step after {warmup} warm-up steps; raise --steps or "
                         "lower --warmup-steps")
    overrides = [f"data.metadata_file={DISTRIBUTIONS[args.distribution].file}",
                 *(QUICK_OVERRIDES if quick else ()), *args.overrides]
    cfg = compose_config(overrides)
    tokens_per_device = args.tokens_per_device or int(cfg.strategy.tokens_per_device)
    lengths = build_datasets(cfg)[0].lengths
    found = variants(lengths, devices, tokens_per_device)
    command = " ".join(["python", "benchmarks/e2e.py", *sys.argv[1:]])
    setting = {
        "command": command, "devices": devices, "steps": steps, "warmup_steps": warmup, "repeats": repeats,
        "retries": args.retries,
        "distribution": args.distribution, "overrides": overrides, "tokens_per_device": tokens_per_device,
        "cost_model": args.cost_model or "default",
        "global_batch_size": int(cfg.data.global_batch_size), "length_rule": length_rule(cfg, args.distribution),
        "lengths": {"samples": len(lengths), "max": int(lengths.max()),
                    **{f"p{q}": float(np.percentile(lengths, q)) for q in (10, 50, 90, 99)}},
    }
    print(f"{command}\n{len(found)} variants: {', '.join(variant.name for variant in found)}", flush=True)
    base = {"overrides": overrides, "devices": devices, "steps": steps, "warmup_steps": warmup,
            "precision": "32-true", "cost_model": args.cost_model and str(Path(args.cost_model).resolve())}
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="dhp_e2e_") as folder:
        result: dict[str, Any] = {**stamp(), "setting": setting, "failures": []}
        runs = measure(found, base, repeats, Path(folder), args.timeout, args.retries, result["failures"])
        result["summary"] = summarise(found, runs)
        if check_steps:
            check_base = {**base, "overrides": [*overrides, *CHECK_OVERRIDES], "steps": check_steps,
                          "warmup_steps": 0, "precision": "64-true", "save_params": True}
            result["float64_check"] = exactness_check(found, check_base, Path(folder), args.timeout, args.retries,
                                                      result["failures"])
    result["runs"] = runs
    result["load_average_after"] = os.getloadavg()[0]
    result["wall_s"] = time.perf_counter() - started
    print("\n" + format_report(result), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
