"""Cost-model accuracy on this machine: fit a CostModel on measured groups, predict held-out groups.

A group is a pack of causal sequences running forward + backward through a small transformer stack
(pre-norm layers: fused QKV projection, ``cp_attention`` with the zigzag layout and the ring, output
projection, 4x GELU MLP; float32, one thread per rank) at CP degree 1-4 over spawned gloo ranks.
Every pack runs at every degree, all groups interleaved in each repeat; a group's time is its slowest
rank's, median over the repeats. Per degree, packs alternate between the fit set and the held-out
set; ``CostModel.fit`` sees only the fit set, and the report gives the absolute percentage error of
its predictions on the held-out groups (median, p90, max; the paper reports 4-8%).

The fit on every fit-set group is also what ``lightning_dhp.lightning.profiling.profile_cost_model``
builds when given ``run_group`` (whole groups of each degree). Its cheaper variant, ``ring_step``, is
scored on the same held-out groups: compute terms from the degree-1 fit-set groups only
(``CostModel.fit``, as ``calibrate`` does), ring terms from separately timed ring steps (each layer's
forward K/V and backward K/V/dK/dV exchange with the ring neighbours, at every degree > 1 and several
token counts; ``fit_ring_steps``).

Two clocks: process CPU time of each rank (the default; it is what a rank owning its core would
take, and gloo's send/recv costs show up as CPU time on loopback) and wall time (on a machine with
fewer cores than ranks it also counts waiting for a core).

Usage: python benchmarks/cost_model_accuracy.py [--quick] [--json PATH] [--save-model PATH]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from lightning_dhp.attention import ZigzagLayout, cp_attention
from lightning_dhp.lightning.profiling import fit_ring_steps, transformer_layers, transformer_weights
from lightning_dhp.planner import CostModel
from lightning_dhp.simulate.provenance import stamp
from lightning_dhp.testing import run_distributed

CLOCKS = ("cpu", "wall")
PACKS: tuple[tuple[int, ...], ...] = (
    (256,),
    (512,),
    (1024,),
    (1536,),
    (2048,),
    (3072,),
    (4096,),
    (256,) * 4,
    (128,) * 8,
    (1024, 1024),
    (512, 1536),
    (2048, 1024, 512),
    (3000, 700),
    (1500, 1500, 1000),
)
QUICK_PACKS: tuple[tuple[int, ...], ...] = ((256,), (512,), (1024,), (2048,), (128,) * 8, (1024, 512))


@dataclasses.dataclass(frozen=True)
class Workload:
    """The measured model and schedule."""

    hidden: int = 128
    heads: int = 2
    layers: int = 2
    degrees: tuple[int, ...] = (1, 2, 3, 4)
    packs: tuple[tuple[int, ...], ...] = PACKS
    warmup: int = 1
    repeats: int = 5
    ring_tokens: tuple[int, ...] = (128, 512, 2048)  # tokens per rank of the timed ring steps

    @property
    def kv_bytes_per_token(self) -> float:
        """Bytes a token sends per ring step of the whole model: K, V forward, K, V, dK, dV backward."""
        return float(6 * self.hidden * 4 * self.layers)  # float32


def group_step(
    layout: ZigzagLayout, group: dist.ProcessGroup | None, weights: list[tuple[torch.Tensor, ...]], heads: int
) -> Callable[[], None]:
    """One rank's forward + backward of its rows of ``layout`` through the transformer layers."""
    hidden = weights[0][0].shape[0]
    x = torch.randn(layout.num_local_tokens, hidden, generator=torch.Generator().manual_seed(layout.rank))
    x.requires_grad_()

    def step() -> None:
        out = transformer_layers(x, weights, heads, lambda q, k, v: cp_attention(q, k, v, layout, group))
        out.square().mean().backward()

    return step


def _degree_groups(degrees: Sequence[int], world_size: int) -> dict[int, Any]:
    """The process group of ranks ``0 .. degree - 1`` for every degree (None for degree 1)."""
    groups = {degree: dist.group.WORLD if degree == world_size else None for degree in degrees}
    for degree in degrees:
        if 1 < degree < world_size:  # every rank takes part in creating every subgroup
            groups[degree] = dist.new_group(list(range(degree)))
    return groups


def _time_interleaved(steps: dict[int, Callable[[], None]], count: int,
                      workload: Workload) -> dict[int, list[tuple[float, float]]]:
    """(wall, cpu) seconds of each of this rank's ``steps`` (by index among ``count``), per repeat after
    the warm-up, every index in turn with a barrier before each."""
    timings: dict[int, list[tuple[float, float]]] = {index: [] for index in steps}
    for repeat in range(workload.warmup + workload.repeats):
        for index in range(count):
            dist.barrier()
            if index in steps:
                wall, cpu = time.perf_counter(), time.process_time()
                steps[index]()
                elapsed = (time.perf_counter() - wall, time.process_time() - cpu)
                if repeat >= workload.warmup:
                    timings[index].append(elapsed)
    dist.barrier()
    return timings


def _measure_worker(rank: int, world_size: int, workload: Workload) -> dict[int, list[tuple[float, float]]]:
    """(wall, cpu) seconds of every group this rank is part of, per repeat, all groups interleaved."""
    groups = _degree_groups(workload.degrees, world_size)
    weights = transformer_weights(workload.hidden, workload.layers)
    specs = [(pack, degree) for degree in workload.degrees for pack in workload.packs]
    steps = {
        index: group_step(ZigzagLayout(pack, degree, rank), groups[degree], weights, workload.heads)
        for index, (pack, degree) in enumerate(specs)
        if rank < degree
    }
    return _time_interleaved(steps, len(specs), workload)


def ring_step(degree: int, rank: int, group: dist.ProcessGroup, tokens: int, workload: Workload) -> Callable[[], None]:
    """One ring step of the whole model: per layer, K and V (forward) and K, V, dK, dV (backward) of
    ``tokens`` tokens to the next rank, the same from the previous one."""
    forward, backward = torch.randn(2 * tokens * workload.hidden), torch.randn(4 * tokens * workload.hidden)
    received = [torch.empty_like(forward), torch.empty_like(backward)]
    after, before = (rank + 1) % degree, (rank - 1) % degree

    def step() -> None:
        for _ in range(workload.layers):
            for sent, into in zip((forward, backward), received, strict=True):
                ops = [dist.P2POp(dist.isend, sent, after, group), dist.P2POp(dist.irecv, into, before, group)]
                for request in dist.batch_isend_irecv(ops):
                    request.wait()

    return step


def _ring_worker(rank: int, world_size: int, workload: Workload) -> dict[int, list[tuple[float, float]]]:
    """(wall, cpu) seconds of every ring step this rank takes part in, per repeat, interleaved."""
    groups = _degree_groups(workload.degrees, world_size)
    specs = [(degree, tokens) for degree in workload.degrees if degree > 1 for tokens in workload.ring_tokens]
    steps = {index: ring_step(degree, rank, groups[degree], tokens, workload)
             for index, (degree, tokens) in enumerate(specs) if rank < degree}
    return _time_interleaved(steps, len(specs), workload)


def measure_ring(workload: Workload) -> list[dict[str, Any]]:
    """Every (degree, tokens per rank) ring step with its median slowest-rank time per clock."""
    per_rank = run_distributed(_ring_worker, max(workload.degrees), workload)
    specs = [(degree, tokens) for degree in workload.degrees if degree > 1 for tokens in workload.ring_tokens]
    steps = []
    for index, (degree, tokens) in enumerate(specs):
        repeats = list(zip(*(per_rank[rank][index] for rank in range(degree)), strict=True))
        step: dict[str, Any] = {"degree": degree, "tokens_per_rank": tokens}
        for clock_index, clock in enumerate(("wall", "cpu")):
            step[f"{clock}_s"] = statistics.median(max(times[clock_index] for times in repeat) for repeat in repeats)
        steps.append(step)
    return steps


def measure(workload: Workload) -> list[dict[str, Any]]:
    """Every (pack, degree) group with its median slowest-rank time per clock and its spread."""
    per_rank = run_distributed(_measure_worker, max(workload.degrees), workload)
    specs = [(pack, degree) for degree in workload.degrees for pack in workload.packs]
    groups = []
    for index, (pack, degree) in enumerate(specs):
        repeats = list(zip(*(per_rank[rank][index] for rank in range(degree)), strict=True))
        group: dict[str, Any] = {"lengths": list(pack), "degree": degree,
                                 "held_out": workload.packs.index(pack) % 2 == 1}
        for clock_index, clock in enumerate(("wall", "cpu")):
            slowest = [max(times[clock_index] for times in repeat) for repeat in repeats]
            group[f"{clock}_s"] = statistics.median(slowest)
            group[f"{clock}_spread"] = (max(slowest) - min(slowest)) / statistics.median(slowest)
        groups.append(group)
    return groups


def percent_errors(model: CostModel, groups: Sequence[dict[str, Any]], clock: str) -> list[float]:
    """Absolute percentage error of ``model`` on each group's measured ``clock`` time."""
    return [
        abs(model.group_time(group["lengths"], group["degree"]) - group[f"{clock}_s"]) / group[f"{clock}_s"] * 100
        for group in groups
    ]


def summarise(errors: Sequence[float]) -> dict[str, float]:
    return {
        "median": float(np.median(errors)),
        "p90": float(np.percentile(errors, 90)),
        "max": float(np.max(errors)),
        "count": float(len(errors)),
    }


def evaluate(groups: list[dict[str, Any]], degrees: Sequence[int]) -> dict[str, Any]:
    """Per clock: the model fitted on the fit set, its fit error, and its held-out error (all, per degree)."""
    fit_set = [group for group in groups if not group["held_out"]]
    held_out = [group for group in groups if group["held_out"]]
    results = {}
    for clock in CLOCKS:
        model, report = CostModel.fit([(group["lengths"], group["degree"], group[f"{clock}_s"]) for group in fit_set])
        errors = percent_errors(model, held_out, clock)
        for group, error in zip(held_out, errors, strict=True):
            group[f"{clock}_predicted_s"] = model.group_time(group["lengths"], group["degree"])
            group[f"{clock}_error_pct"] = error
        results[clock] = {
            "model": dataclasses.asdict(model),
            "fit_error_pct": dataclasses.asdict(report),
            "held_out_error_pct": summarise(errors),
            "held_out_error_pct_by_degree": {
                degree: summarise(percent_errors(model, [g for g in held_out if g["degree"] == degree], clock))
                for degree in degrees
            },
        }
    return results


def evaluate_profiled(
    groups: list[dict[str, Any]], ring_steps: list[dict[str, Any]], workload: Workload
) -> dict[str, Any]:
    """Per clock: the profiled model (degree-1 fit-set packs + ring steps) and its held-out error."""
    base = CostModel(kv_bytes_per_token=workload.kv_bytes_per_token, comm_overlap=0.0)
    packs = [group for group in groups if not group["held_out"] and group["degree"] == 1]
    held_out = [group for group in groups if group["held_out"]]
    results = {}
    for clock in CLOCKS:
        model, compute = CostModel.fit([(group["lengths"], 1, group[f"{clock}_s"]) for group in packs], base=base)
        model, ring = fit_ring_steps(model, [(step["degree"], step["tokens_per_rank"], step[f"{clock}_s"])
                                             for step in ring_steps])
        errors = percent_errors(model, held_out, clock)
        results[clock] = {
            "model": dataclasses.asdict(model),
            "compute_fit_error_pct": dataclasses.asdict(compute),
            "ring_fit_error_pct": dataclasses.asdict(ring),
            "held_out_error_pct": summarise(errors),
            "held_out_error_pct_by_degree": {
                degree: summarise(percent_errors(model, [g for g in held_out if g["degree"] == degree], clock))
                for degree in workload.degrees
            },
        }
    return results


def format_report(result: dict[str, Any]) -> str:
    """Markdown: headline errors per clock, then one row per held-out group."""
    workload = result["workload"]
    lines = [
        "# Cost-model accuracy",
        "",
        f"{result['date']} on {result['machine']}; torch {result['torch']}, one thread per rank. Workload: "
        f"{workload['layers']} pre-norm layers, hidden {workload['hidden']}, {workload['heads']} "
        f"heads, float32, forward + backward, ring cp_attention; median of {workload['repeats']} repeats after "
        f"{workload['warmup']} warm-up; {len(result['groups'])} groups, half held out.",
        "",
        "Fitted on every fit-set group (CostModel.fit; profile_cost_model with run_group):",
        "",
        "| clock | held-out median | held-out p90 | held-out max | fit-set median | per degree (median) |",
        "|---|---:|---:|---:|---:|---|",
    ]
    for clock in CLOCKS:
        errors = result["accuracy"][clock]
        by_degree = ", ".join(
            f"d={degree}: {summary['median']:.1f}%"
            for degree, summary in errors["held_out_error_pct_by_degree"].items()
        )
        held = errors["held_out_error_pct"]
        lines.append(
            f"| {clock} | **{held['median']:.1f}%** | {held['p90']:.1f}% | {held['max']:.1f}% | "
            f"{errors['fit_error_pct']['median_abs_pct_error']:.1f}% | {by_degree} |"
        )
    lines += [
        "",
        "Profiled from degree-1 packs and ring steps alone (profile_cost_model with ring_step):",
        "",
        "| clock | held-out median | held-out p90 | held-out max | compute fit median | ring fit median "
        "| per degree (median) |",
        "|---|---:|---:|---:|---:|---:|---|",
    ]
    for clock in CLOCKS:
        errors = result["profiled"][clock]
        by_degree = ", ".join(f"d={degree}: {summary['median']:.1f}%"
                              for degree, summary in errors["held_out_error_pct_by_degree"].items())
        held = errors["held_out_error_pct"]
        lines.append(
            f"| {clock} | **{held['median']:.1f}%** | {held['p90']:.1f}% | {held['max']:.1f}% | "
            f"{errors['compute_fit_error_pct']['median_abs_pct_error']:.1f}% | "
            f"{errors['ring_fit_error_pct']['median_abs_pct_error']:.1f}% | {by_degree} |"
        )
    lines += [
        "",
        "| held-out group (tokens) | degree | cpu measured s (spread) | cpu predicted s | error | wall measured s |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for group in result["groups"]:
        if group["held_out"]:
            lines.append(
                f"| {'+'.join(map(str, group['lengths']))} | {group['degree']} | {group['cpu_s']:.4f} "
                f"({group['cpu_spread']:.0%}) | {group['cpu_predicted_s']:.4f} | {group['cpu_error_pct']:.1f}% | "
                f"{group['wall_s']:.4f} |"
            )
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer, shorter packs and two repeats (smoke test)")
    parser.add_argument("--json", help="write the measurements, fitted models and errors to this path")
    parser.add_argument("--save-model", help="save the CPU-clock model fitted here (CostModel JSON)")
    args = parser.parse_args(argv)
    workload = Workload(packs=QUICK_PACKS, repeats=2) if args.quick else Workload()
    groups = measure(workload)
    ring_steps = measure_ring(workload)
    result = {
        **stamp(torch=True),
        "workload": dataclasses.asdict(workload),
        "accuracy": evaluate(groups, workload.degrees),
        "profiled": evaluate_profiled(groups, ring_steps, workload),
        "groups": groups,
        "ring_steps": ring_steps,
    }
    print(format_report(result), end="")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    if args.save_model:
        CostModel(**result["accuracy"]["cpu"]["model"]).save(args.save_model)
    return 0


if __name__ == "__main__":
    sys.exit(main())
