"""Plan digests of a broad, fast set of planner inputs: the record that keeps "same plans" checked.

Every planner entry point the runtime uses (``plan_batch`` with and without nodes, memory-bound
multi-round batches, vision patches with and without a vision budget, ``static_plan`` as
``static_degree`` uses it) on lengths drawn from ../shared/data and synthetic ones, under the
default, preset and committed CPU cost models. ``tests/test_planner_digests.py`` recomputes them and
compares with ``tests/data/planner_digests.json``, recorded on the planner before it took
``PlannerOptions`` (commit b903618) and re-recorded when small rounds became exact (issue 23:
``PlannerOptions.exact_round_layouts``, 10 of the 152 plans changed) and again when rounds of up to 12 samples
were searched exactly (``PlannerOptions.exact_search_samples``: 1 plan changed, 0.02% faster); a change that
alters a plan fails it.

Usage: python benchmarks/planner_digests.py [--write] [--check]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np

from lightning_dhp.data import sample_token_lengths
from lightning_dhp.planner import CostModel, Plan, PlanError, plan_batch, static_plan

RECORD = Path(__file__).resolve().parents[1] / "tests" / "data" / "planner_digests.json"
CPU_MODEL = Path(__file__).resolve().parent / "results" / "cpu_cost_model.json"
DATA_PREFIX = "data:"  # cases whose lengths come from ../shared/data (skipped where it is absent)

Case = tuple[str, Callable[[], Plan]]


def _cost_models() -> dict[str, CostModel]:
    return {
        "default": CostModel.default(),
        "qwen2.5-vl-7b@H100": CostModel.for_transformer(_preset("qwen2.5-vl-7b"), device="H100"),
        "internvl3-2b@Ascend": CostModel.for_transformer(_preset("internvl3-2b"), device="Ascend 910B"),
        "cpu": CostModel.load(CPU_MODEL),
        "vision": dataclasses.replace(CostModel.default(), vision_s_per_patch=1e-5),
    }


def _preset(name: str):
    from lightning_dhp.planner.presets import MODEL_PRESETS

    return MODEL_PRESETS[name]


def _data_cases(costs: dict[str, CostModel]) -> Iterator[Case]:
    # distribution -> tokens_per_device (the planner benchmark's capacities)
    capacity = {"activitynet": 16384, "mooncake": 32768, "azure_conv": 4096, "epic_kitchens_segments": 8192,
                "coco": 4096, "azure_code": 4096, "epic_kitchens_videos": 32768}
    for name, tokens in capacity.items():
        for samples in (32, 128, 512):
            lengths = sample_token_lengths(name, samples, seed=900 + samples)
            for node_size in (8, None):
                yield (f"{DATA_PREFIX}{name}/{samples}/64/{tokens}/node{node_size}",
                       lambda lengths=lengths, tokens=tokens, node_size=node_size: plan_batch(
                           lengths, 64, tokens, node_size=node_size))
    # memory-bound long tails: 7-10 rounds (the extra-round candidate, rebalancing and polish)
    for name in ("epic_kitchens_videos", "mooncake"):
        for seed in (901, 902):
            lengths = sample_token_lengths(name, 512, seed=seed)
            yield (f"{DATA_PREFIX}memory-bound/{name}/{seed}",
                   lambda lengths=lengths: plan_batch(lengths, 64, 16384, node_size=8))
    # other cost models on one short-tail and one memory-bound batch
    short, long = sample_token_lengths("activitynet", 256, seed=903), sample_token_lengths("mooncake", 256, seed=904)
    for model, cost in costs.items():
        if model == "default":
            continue
        yield (f"{DATA_PREFIX}cost/{model}/activitynet",
               lambda cost=cost: plan_batch(short, 32, 16384, cost, node_size=8))
        yield (f"{DATA_PREFIX}cost/{model}/mooncake-memory-bound",
               lambda cost=cost: plan_batch(long, 32, 16384, cost, node_size=8))
    # past the cross-round limit (2048 samples): no extra-round candidate, rebalancing nor polish
    lengths = sample_token_lengths("azure_conv", 4096, seed=905)
    yield f"{DATA_PREFIX}large/azure_conv/4096/512", lambda: plan_batch(lengths, 512, 4096, node_size=8)
    huge = sample_token_lengths("activitynet", 8192, seed=907)
    yield f"{DATA_PREFIX}large/activitynet/8192/1024", lambda: plan_batch(huge, 1024, 16384, node_size=8)
    # static CP (the loader's static_degree) at every power of two that holds the batch
    lengths = sample_token_lengths("activitynet", 128, seed=906)
    for degree in (2, 4, 8, 16, 32, 64):
        yield (f"{DATA_PREFIX}static/activitynet/{degree}",
               lambda degree=degree: static_plan(lengths, 64, 16384, degree, node_size=8))


def _synthetic_cases(costs: dict[str, CostModel]) -> Iterator[Case]:
    rng = np.random.default_rng(2026)
    shapes = [(1, None), (2, None), (3, None), (4, 2), (6, 3), (8, 4), (12, 4), (16, 8), (24, 8), (32, 8)]
    for index in range(60):
        num_devices, node_size = shapes[index % len(shapes)]
        capacity = int(rng.choice([256, 1024, 4096]))
        samples = int(rng.integers(1, 8 * num_devices + 2))
        longest = capacity if num_devices == 1 else num_devices * capacity - 2 * num_devices
        kind = index % 3
        if kind == 0:
            lengths = rng.integers(1, capacity + 1, size=samples)
        elif kind == 1:
            lengths = (rng.pareto(1.1, size=samples) * capacity / 6 + 1).astype(np.int64)
        else:  # a few long samples among many short ones: several devices per group, often several rounds
            lengths = rng.integers(1, capacity // 4 + 2, size=samples)
            lengths[: max(1, samples // 8)] = rng.integers(capacity, 3 * capacity, size=max(1, samples // 8))
        lengths = np.minimum(lengths, longest)
        model = ("default", "qwen2.5-vl-7b@H100", "cpu")[index % 3]
        yield (f"synthetic/{index}/{num_devices}/{capacity}/node{node_size}/{model}",
               lambda lengths=lengths, num_devices=num_devices, capacity=capacity, node_size=node_size,
               cost=costs[model]: plan_batch(lengths, num_devices, capacity, cost, node_size=node_size))
    # vision: patches per sample, without and with a vision budget (which can add rounds and degrees)
    for index in range(24):
        num_devices, node_size = shapes[2 + index % (len(shapes) - 2)]
        capacity = int(rng.choice([1024, 4096]))
        samples = int(rng.integers(1, 6 * num_devices + 2))
        lengths = rng.integers(1, capacity + 1, size=samples)
        patches = np.where(rng.random(samples) < 0.5, rng.integers(0, 4 * capacity, size=samples), 0)
        budget = None if index % 2 == 0 else int(max(1, patches.max() // max(1, num_devices // 2), capacity // 2))
        yield (f"vision/{index}/{num_devices}/{capacity}/node{node_size}/budget{budget}",
               lambda lengths=lengths, num_devices=num_devices, capacity=capacity, node_size=node_size,
               patches=patches, budget=budget: plan_batch(
                   lengths, num_devices, capacity, costs["vision"], node_size=node_size, vision_patches=patches,
                   vision_patches_per_device=budget))
        if index % 4 == 1:
            degree = num_devices if node_size is None or num_devices <= node_size else node_size
            yield (f"vision-static/{index}/{degree}",
                   lambda lengths=lengths, num_devices=num_devices, capacity=capacity, node_size=node_size,
                   patches=patches, budget=budget, degree=degree: static_plan(
                       lengths, num_devices, capacity, degree, costs["vision"], node_size=node_size,
                       vision_patches=patches, vision_patches_per_device=budget))


def cases(with_data: bool = True) -> Iterator[Case]:
    """(case id, a call that plans it); ``with_data``: include the cases drawn from ../shared/data."""
    costs = _cost_models()
    if with_data:
        yield from _data_cases(costs)
    yield from _synthetic_cases(costs)


def outcome(plan: Callable[[], Plan]) -> str:
    """The plan's :meth:`Plan.digest`, or the PlanError it raises (refusals are behaviour too)."""
    try:
        return plan().digest()
    except PlanError as error:
        return f"PlanError: {error}"


def digests(with_data: bool = True) -> dict[str, str]:
    """Case id -> :func:`outcome` of its plan."""
    return {case_id: outcome(plan) for case_id, plan in cases(with_data)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--write", action="store_true", help=f"record the digests to {RECORD}")
    parser.add_argument("--check", action="store_true", help="compare with the record")
    args = parser.parse_args()
    started = time.perf_counter()
    current = digests()
    print(f"{len(current)} plans in {time.perf_counter() - started:.1f} s", file=sys.stderr)
    if args.write:
        RECORD.parent.mkdir(parents=True, exist_ok=True)
        RECORD.write_text(json.dumps(current, indent=1, sort_keys=True) + "\n")
    if args.check:
        recorded = json.loads(RECORD.read_text())
        changed = sorted(case for case in recorded if current.get(case) != recorded[case])
        print(f"{len(changed)} of {len(recorded)} plans changed: {changed[:20]}")
        sys.exit(1 if changed else 0)


if __name__ == "__main__":
    main()
