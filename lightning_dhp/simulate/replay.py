"""The simulation loop: every policy on the same global batches at every device count."""

from __future__ import annotations

import dataclasses
import statistics
import time
from collections.abc import Callable, Sequence

import numpy as np

from lightning_dhp.planner import CostModel, plan_batch, static_plan
from lightning_dhp.planner.cost_model import take
from lightning_dhp.planner.inputs import min_degrees
from lightning_dhp.planner.memory import vision_min_degrees
from lightning_dhp.simulate.config import SimulationConfig, SimulationError
from lightning_dhp.simulate.policies import (
    PEERS,
    VISION_BLIND,
    dynamic_policies,
    fitting_static_degrees,
    retimed,
    ring_group_time,
    ulysses_group_time,
)
from lightning_dhp.simulate.provenance import machine_description, utc_date
from lightning_dhp.simulate.results import (
    DeviceCountResult,
    DistributionResult,
    PlannerTime,
    PoolReplay,
    Scaling,
    SimulationResult,
    Spread,
)
from lightning_dhp.simulate.sources import LengthSource, batch_stream


def simulate(
    sources: Sequence[LengthSource],
    config: SimulationConfig,
    cost: CostModel,
    *,
    progress: Callable[[str], None] | None = None,
) -> SimulationResult:
    """Simulate every source at every device count."""
    for source in sources:
        check_fits_everywhere(source, config)
    distributions = []
    for source in sources:
        rows = []
        for num_devices in config.devices:
            if progress:
                progress(f"{source.name}: {num_devices} devices")
            rows.append(simulate_device_count(source, num_devices, config, cost))
        distributions.append(DistributionResult(source.name, source.rule, source.stats(), _with_scaling(rows)))
    return SimulationResult(config, cost, machine_description(), utc_date(), distributions)


def simulate_device_count(
    source: LengthSource, num_devices: int, config: SimulationConfig, cost: CostModel
) -> DeviceCountResult:
    """Every policy on the same ``config.steps`` global batches of ``num_devices x samples_per_device``
    (with their vision patches, when the source has some)."""
    node_size, capacity, vision_budget = config.node_size, config.tokens_per_device, config.vision_patches_per_device
    ring, ulysses = ring_group_time(cost), ulysses_group_time(cost, config.ulysses_volume_ratio)
    dynamic = dynamic_policies(cost)
    static_degrees = fitting_static_degrees(int(source.lengths.max()), num_devices, capacity,
                                            source.most_patches(), vision_budget)
    statics = [f"ring-{degree}" for degree in static_degrees] + [
        f"ulysses-{degree}" for degree in static_degrees if config.ulysses_heads % degree == 0
    ]
    vision = source.vision_patches is not None
    totals = dict.fromkeys([*dynamic, *statics, *([VISION_BLIND] if vision else [])], 0.0)
    lower_bound = tokens = useful = rounds = 0.0
    planner_ms: dict[str, list[float]] = {policy: [] for policy in dynamic}
    blind_over_aware: list[float] = []
    rank_sets_per_step: list[list[tuple[int, ...]]] = []
    batches = batch_stream(np.arange(len(source.lengths)), config.samples_per_device * num_devices, config.seed)
    for _, picked in zip(range(config.steps), batches, strict=False):
        batch, patches = source.lengths[picked], take(source.vision_patches, picked)
        for name, policy in dynamic.items():
            started = time.perf_counter()
            plan = policy.planner(batch, num_devices, capacity, cost, node_size=node_size, vision_patches=patches,
                                  vision_patches_per_device=vision_budget)
            planner_ms[name].append((time.perf_counter() - started) * 1e3)
            totals[name] += policy.step_time(plan, node_size)
            if name == "dhp":
                lower_bound += plan.lower_bound
                rounds += len(plan.rounds)
                rank_sets_per_step.append([group.ranks for round_ in plan.rounds for group in round_.groups])
                if vision:
                    blind = plan_batch(batch, num_devices, capacity, cost, node_size=node_size)
                    blind_time = retimed(blind, ring, node_size, vision_patches=patches)
                    totals[VISION_BLIND] += blind_time
                    blind_over_aware.append(blind_time / plan.predicted_time)
        for degree in static_degrees:
            static = static_plan(batch, num_devices, capacity, degree, cost, vision_patches=patches,
                                 vision_patches_per_device=vision_budget)
            totals[f"ring-{degree}"] += retimed(static, ring, node_size)
            if f"ulysses-{degree}" in totals:
                totals[f"ulysses-{degree}"] += retimed(static, ulysses, node_size)
        batch_f = batch.astype(np.float64)
        tokens += float(batch_f.sum())
        useful += float((cost.attention_s_per_token2 * batch_f * batch_f + cost.linear_s_per_token * batch_f).sum())
        if vision:
            useful += cost.vision_s_per_patch * float(patches.sum())
    best_static = min(statics, key=totals.__getitem__)
    megatron = f"ring-{static_degrees[0]}"
    return DeviceCountResult(
        devices=num_devices,
        global_batch=config.samples_per_device * num_devices,
        steps=config.steps,
        epochs=config.steps * config.samples_per_device * num_devices / len(source.lengths),
        step_time_s={policy: total / config.steps for policy, total in totals.items()},
        lower_bound_s=lower_bound / config.steps,
        dhp_rounds=rounds / config.steps,
        best_static=best_static,
        megatron=megatron,
        speedup_over_best_static=totals[best_static] / totals["dhp"],
        speedup_over_megatron=totals[megatron] / totals["dhp"],
        speedup_over={peer: totals[peer] / totals["dhp"] for peer in PEERS},
        utilisation={policy: useful / (num_devices * totals[policy]) for policy in ("dhp", best_static)},
        tokens_per_device_s={policy: tokens / (num_devices * totals[policy]) for policy in ("dhp", best_static)},
        planner_ms=PlannerTime(statistics.median(planner_ms["dhp"]), float(np.percentile(planner_ms["dhp"], 90))),
        peer_planner_ms_median={peer: statistics.median(planner_ms[peer]) for peer in PEERS},
        pool=_pool_replay(rank_sets_per_step, config.pool_size),
        vision_blind_over_aware=Spread.of(blind_over_aware) if vision else None,
    )


def _pool_replay(rank_sets_per_step: list[list[tuple[int, ...]]], capacity: int) -> PoolReplay:
    """Replay the strategy's group pool (capped LRU keyed by rank tuple) over the simulated steps."""
    from lightning_dhp.distributed.pool import GroupPool  # imports torch: only when a simulation runs

    pool = GroupPool(capacity, create=tuple, destroy=lambda group: None)
    for rank_sets in rank_sets_per_step:
        pool.acquire_plan(rank_sets)
    distinct = {ranks for rank_sets in rank_sets_per_step for ranks in rank_sets if len(ranks) > 1}
    lookups = pool.stats.hits + pool.stats.misses
    return PoolReplay(
        capacity=float(capacity),
        created=float(pool.stats.misses),
        evicted=float(pool.stats.evictions),
        distinct_rank_sets=float(len(distinct)),
        hit_rate=pool.stats.hit_rate,
        hit_rate_uncapped=1.0 - len(distinct) / lookups if lookups else 1.0,
    )


def _with_scaling(rows: list[DeviceCountResult]) -> list[DeviceCountResult]:
    """``rows`` with their per-device throughput over that at the smallest device count (DHP; best static)."""
    base = rows[0]
    base_dhp, base_static = base.tokens_per_device_s["dhp"], base.tokens_per_device_s[base.best_static]
    return [
        dataclasses.replace(row, scaling_efficiency=Scaling(
            dhp=row.tokens_per_device_s["dhp"] / base_dhp,
            best_static=row.tokens_per_device_s[row.best_static] / base_static,
        ))
        for row in rows
    ]


def check_fits_everywhere(source: LengthSource, config: SimulationConfig) -> None:
    """SimulationError before any work when the longest sample (or, under a vision budget, the one with the
    most vision patches) fits no simulated device count."""
    longest, most_patches = int(source.lengths.max()), source.most_patches()
    vision_budget = config.vision_patches_per_device
    for num_devices in config.devices:
        if not fitting_static_degrees(longest, num_devices, config.tokens_per_device):
            needed = int(min_degrees(np.array([longest]), config.tokens_per_device)[0])
            raise SimulationError(
                f"distribution {source.name!r}: its longest sample ({longest} tokens) needs a power-of-two "
                f"degree >= {needed} dividing --devices {num_devices} at --tokens-per-device "
                f"{config.tokens_per_device}; raise --tokens-per-device or use more devices"
            )
        if not fitting_static_degrees(longest, num_devices, config.tokens_per_device, most_patches, vision_budget):
            needed = int(vision_min_degrees(np.int64(most_patches), vision_budget))
            raise SimulationError(
                f"distribution {source.name!r}: its sample with the most vision patches ({most_patches}) needs a "
                f"power-of-two degree >= {needed} dividing --devices {num_devices} at --vision-patches-per-device "
                f"{vision_budget}; raise --vision-patches-per-device or use more devices"
            )
