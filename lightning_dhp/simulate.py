"""Cluster-scale simulator: replay a length distribution through DHP and static CP on 8..1024 devices.

Every simulated step draws one global batch (``samples_per_device x devices`` samples; batches are
consecutive slices of seeded shuffles of the whole distribution, so each pass sees every sample once)
and plans it under one cost model with:

- ``dhp``: :func:`~lightning_dhp.planner.plan_batch` (node-aware, any degree);
- ``dhp-paper``: the DHP paper's algorithm as published, :func:`~lightning_dhp.planner.peers.paper_plan`
  (best-fit-decreasing bins, the ``O(K' N^2)`` min-max DP, round-robin leftover devices; rounds split
  as DHP splits them);
- ``megatron-dcp``: Megatron-Core's dynamic (hybrid) CP, :func:`~lightning_dhp.planner.peers.megatron_dcp_plan`
  (a power-of-two CP size per sample on pre-created aligned groups, its greedy balancing), its
  groups timed running their samples one after another as Megatron does;
- ``ring-<d>``: :func:`~lightning_dhp.planner.static_plan` at every power-of-two degree ``d`` that
  divides the devices and fits the longest sample of the whole distribution (Megatron-style ring CP,
  one degree for the whole run, DP = devices / d); groups wider than a node pay the inter-node
  bandwidth;
- ``ulysses-<d>``: the same groups as ``ring-<d>`` for every such ``d`` that also divides the
  attention heads, timed with an all-to-all model built from the cost model's fields (see
  :func:`ulysses_group_time`);
- ``dhp-vision-blind`` (sources with vision patches, e.g. ``activitynet+mooncake``): ``plan_batch``
  without the patches, timed with them, i.e. what DHP loses by ignoring the vision tower. Every other
  policy plans and is timed with the patches.

``--vision-patches-per-device`` budgets the vision tower's memory as ``--tokens-per-device`` budgets the
language model's: every policy but ``dhp-vision-blind`` (which does not see the patches, so may break
it) keeps each group's patches within its degree x that budget.

"Best static" is the static policy with the lowest predicted time over all simulated steps (chosen
with hindsight); "Megatron static" is ``ring-<d>`` at the smallest fitting degree (Megatron's default).
Useful work is the cost model's degree-1 compute of every sample (``a L^2 + b L + vision V``, no
padding, no communication, no overhead); utilisation is useful work over devices x step time.

Run ``python -m lightning_dhp.simulate --help``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from lightning_dhp.data.lengths import DISTRIBUTIONS, LengthFileError, read_metadata, token_lengths
from lightning_dhp.planner import CostModel, Plan, PlanError, padded_length, plan_batch, static_plan
from lightning_dhp.planner.cost_model import take
from lightning_dhp.planner.inputs import min_degrees
from lightning_dhp.planner.memory import vision_min_degrees
from lightning_dhp.planner.peers import megatron_dcp_plan, paper_plan, sequential_group_time
from lightning_dhp.planner.presets import MODEL_PRESETS, VISION_PRESETS

DEFAULT_DEVICES = (8, 16, 32, 64, 128, 256, 512, 1024)
QUICK_DEVICES = (8, 16, 64)
QUICK_DISTRIBUTIONS = ("epic_kitchens_segments",)
# Bytes one Ulysses token moves per step over the ring's K/V bytes per token (kv_bytes_per_token).
# For the default 7B-class model (32 query heads, 8 KV heads): the ring moves K, V forward and
# K, V, dK, dV backward = 3 x 16 KV-head vectors per layer; Ulysses all-to-alls q, k, v, out forward
# and their gradients backward = 2 x (32 + 8 + 8 + 32) head vectors per layer: 160 / 48 = 10 / 3.
ULYSSES_VOLUME_RATIO = 10 / 3
# Multimodal sources: every sample of a whole-video distribution (with vision patches) and of a text one
# (without); "<video>+<text>", e.g. activitynet+mooncake.
VIDEO_DISTRIBUTIONS = ("activitynet", "epic_kitchens_videos")
TEXT_DISTRIBUTIONS = ("mooncake", "azure_conv", "azure_code")
MULTIMODAL_DISTRIBUTIONS = tuple(f"{video}+{text}" for video in VIDEO_DISTRIBUTIONS for text in TEXT_DISTRIBUTIONS)
# Vision patches per visual token: both presets' towers merge 2 x 2 patches into one token (Qwen2-VL's
# spatial merge 2, InternVL's pixel shuffle 0.5), so a frame of (H/14) x (W/14) patches has a quarter as
# many tokens (64 tokens per frame: 224 x 224 pixels).
PATCHES_PER_VISUAL_TOKEN = 4
VISION_BLIND = "dhp-vision-blind"


class SimulationError(ValueError):
    """Bad simulator input; the message names the argument or file, the limit and the fix."""


@dataclass(frozen=True)
class LengthSource:
    """Token lengths of one distribution (and each sample's vision patches, None: a text-only source) and
    the rule that made them (quoted in every report)."""

    name: str
    rule: str
    lengths: np.ndarray
    vision_patches: np.ndarray | None = None

    def stats(self) -> dict[str, float]:
        """Spread of the token lengths; ``cv`` (std / mean) is the heterogeneity the report ranks by."""
        lengths = self.lengths.astype(np.float64)
        stats = {
            "samples": float(len(lengths)),
            "median": float(np.median(lengths)),
            "mean": float(lengths.mean()),
            "p99": float(np.percentile(lengths, 99)),
            "max": float(lengths.max()),
            "cv": float(lengths.std() / lengths.mean()),
        }
        if self.vision_patches is not None:
            stats["with_vision"] = float(np.mean(self.vision_patches > 0))
        return stats

    def most_patches(self) -> int:
        """The most vision patches of any sample (0 for a text-only source)."""
        return 0 if self.vision_patches is None else int(self.vision_patches.max())


def named_source(name: str, *, data_dir: str | None = None, params: dict[str, float] | None = None) -> LengthSource:
    """A distribution of :data:`~lightning_dhp.data.lengths.DISTRIBUTIONS` or of
    :data:`MULTIMODAL_DISTRIBUTIONS` (see :func:`multimodal_source`) with optional rule overrides."""
    if name in MULTIMODAL_DISTRIBUTIONS:
        video, text = name.split("+")
        return multimodal_source(video, text, data_dir=data_dir, params=params)
    if name not in DISTRIBUTIONS:
        raise SimulationError(f"--dist {name!r} is not a known distribution; choose from "
                              f"{sorted(DISTRIBUTIONS) + list(MULTIMODAL_DISTRIBUTIONS)}")
    params = params or {}
    overrides = f" (overrides: {', '.join(f'{key}={value:g}' for key, value in params.items())})" if params else ""
    return LengthSource(name, DISTRIBUTIONS[name].description + overrides, _rule_lengths(name, data_dir, params))


def _rule_lengths(name: str, data_dir: str | None, params: dict[str, float]) -> np.ndarray:
    try:
        return token_lengths(name, data_dir=data_dir, **params)
    except TypeError as error:
        raise SimulationError(f"--param {params}: {error}; use the constants named in that rule") from None


def multimodal_source(
    video: str, text: str, *, data_dir: str | None = None, params: dict[str, float] | None = None
) -> LengthSource:
    """Every sample of the ``video`` distribution, with :data:`PATCHES_PER_VISUAL_TOKEN` vision patches per
    visual token, and of the ``text`` one, without; ``params`` override the video rule's constants.

    The patches come from the video rule itself: its visual tokens are its tokens with ``text_tokens=0``.
    """
    params = params or {}
    video_source = named_source(video, data_dir=data_dir, params=params)
    visual_tokens = _rule_lengths(video, data_dir, {**params, "text_tokens": 0})
    text_lengths = named_source(text, data_dir=data_dir).lengths
    rule = (f"every {video} video ({video_source.rule}) with {PATCHES_PER_VISUAL_TOKEN} vision patches per visual "
            f"token, i.e. (H/14) x (W/14) patches per frame, and every {text} sample "
            f"({DISTRIBUTIONS[text].description}) without patches")
    return LengthSource(
        f"{video}+{text}",
        rule,
        np.concatenate([video_source.lengths, text_lengths]),
        np.concatenate([visual_tokens * PATCHES_PER_VISUAL_TOKEN, np.zeros(len(text_lengths), dtype=np.int64)]),
    )


def csv_source(path: str, column: str, *, scale: float = 1.0, offset: float = 0.0) -> LengthSource:
    """Lengths from the user's CSV: ``tokens = ceil(column * scale + offset)`` per row."""
    values = read_metadata(path, [column])[column]
    tokens = np.ceil(values * scale + offset)
    bad = np.flatnonzero(~(tokens >= 1))
    if bad.size:
        row = int(bad[0])
        raise SimulationError(
            f"{path} row {row + 2} column {column!r} holds {values[row]:g}, which the rule "
            f"ceil({column} * {scale:g} + {offset:g}) turns into {tokens[row]:g} tokens; every sample needs "
            f">= 1 token: fix that row or raise --offset"
        )
    rule = f"{Path(path).name}: tokens = ceil({column} * {scale:g} + {offset:g})"
    return LengthSource(f"{Path(path).stem}:{column}", rule, tokens.astype(np.int64))


@dataclass(frozen=True)
class SimulationConfig:
    """What is simulated; every field is a CLI option of the same name."""

    devices: tuple[int, ...] = DEFAULT_DEVICES
    samples_per_device: int = 8
    tokens_per_device: int = 16384
    vision_patches_per_device: int | None = None  # None: the vision tower's memory is not budgeted
    node_size: int = 8
    steps: int = 32
    pool_size: int = 32
    ulysses_heads: int = 8
    ulysses_volume_ratio: float = ULYSSES_VOLUME_RATIO
    seed: int = 0


@dataclass(frozen=True)
class Preset:
    """The DHP paper's setting: a VLM's language model (:data:`~lightning_dhp.planner.presets.MODEL_PRESETS`)
    on a device (:data:`~lightning_dhp.planner.presets.DEVICE_PRESETS`), its per-device token budget, and
    video length distributions.

    The budgets are assumptions (the activation memory left after ZeRO-sharded weights and optimizer
    states on 64-80 GB devices): 32768 tokens for the 2B model, 16384 for the 7-8B ones. Set
    ``--tokens-per-device`` from your own memory profile. The vision tower is modelled only in the
    ``-vision-`` presets (:data:`~lightning_dhp.planner.presets.VISION_PRESETS`), whose videos carry
    vision patches and are mixed with text samples. No preset budgets the tower's activations: the token
    budget is already assumed to fill the activation memory, and how a run splits it between tower and
    language model (checkpointing, freeing the tower's activations) is its own; pass
    ``--vision-patches-per-device`` from your memory profile.
    """

    model: str
    device: str
    tokens_per_device: int
    distributions: tuple[str, ...] = ("activitynet", "epic_kitchens_videos")
    vision: bool = False

    def cost_model(self) -> CostModel:
        vision = VISION_PRESETS[self.model] if self.vision else None
        return CostModel.for_transformer(MODEL_PRESETS[self.model], vision=vision, device=self.device)

    def ulysses(self) -> tuple[int, float]:
        """Ulysses degrees divide the KV heads; its all-to-all moves q, k, v, out and their gradients,
        ``2 (2 heads + 2 kv_heads)`` head vectors per token and layer, against the ring's ``6 kv_heads``."""
        shape = MODEL_PRESETS[self.model]
        return shape.kv_heads, 2 * (2 * shape.heads + 2 * shape.kv_heads) / (6 * shape.kv_heads)


PRESETS: dict[str, Preset] = {
    **{
        f"{model}-{device_key}": Preset(model, device, 32768 if model == "internvl3-2b" else 16384)
        for model in MODEL_PRESETS
        for device_key, device in (("910b", "Ascend 910B"), ("h100", "H100"))
    },
    **{
        f"{model}-vision-h100": Preset(model, "H100", 16384, ("activitynet+mooncake", "activitynet+azure_conv"),
                                       vision=True)
        for model in ("qwen2.5-vl-7b", "internvl3-8b")
    },
}


# -- policies ---------------------------------------------------------------------------------------

# (lengths, degree, crosses a node, vision patches per sample or None) -> seconds
GroupTime = Callable[[list[int], int, bool, "list[int] | None"], float]


def ring_group_time(cost: CostModel) -> GroupTime:
    """The cost model's own ring-CP group time."""

    def group_time(lengths: list[int], degree: int, crosses_node: bool, patches: list[int] | None = None) -> float:
        return cost.group_time(lengths, degree, crosses_node=crosses_node, patches=patches)

    return group_time


def ulysses_group_time(cost: CostModel, volume_ratio: float) -> GroupTime:
    """Ulysses (all-to-all over heads) group time from the cost model's fields.

    ``overhead + (a sum P^2 + b sum P + vision sum V) / d + [d > 1] (d - 1) (step_latency + volume_ratio
    * kv_bytes * (sum P / d) / d / bandwidth)``: the same compute as the ring with ``P`` = length padded
    to a multiple of ``d``; each rank sends ``(d - 1) / d`` of its ``sum P / d`` tokens' head vectors;
    the all-to-alls sit between projection and attention, so nothing overlaps them; ``d - 1`` peers per
    collective pay the ring's per-step latency.
    """

    def group_time(lengths: list[int], degree: int, crosses_node: bool, patches: list[int] | None = None) -> float:
        padded = np.asarray([-(-length // degree) * degree for length in lengths], dtype=np.float64)
        compute = (cost.attention_s_per_token2 * (padded * padded).sum() + cost.linear_s_per_token * padded.sum())
        if patches is not None:
            compute += cost.vision_s_per_patch * sum(patches)
        if degree == 1:
            return cost.overhead_s + compute
        bandwidth = cost.inter_node_bytes_per_s if crosses_node else cost.intra_node_bytes_per_s
        tokens_per_rank = padded.sum() / degree
        all_to_all = volume_ratio * cost.kv_bytes_per_token * tokens_per_rank / degree / bandwidth
        return cost.overhead_s + compute / degree + (degree - 1) * (cost.ring_step_latency_s + all_to_all)

    return group_time


def megatron_group_time(cost: CostModel) -> GroupTime:
    """Megatron's hybrid-CP groups run their samples one after another: one forward+backward each."""

    def group_time(lengths: list[int], degree: int, crosses_node: bool, patches: list[int] | None = None) -> float:
        return sequential_group_time(cost, lengths, degree, crosses_node, patches)

    return group_time


PEERS = ("dhp-paper", "megatron-dcp")


def retimed(
    plan: Plan, group_time: GroupTime, node_size: int, *, vision_patches: Sequence[int] | None = None
) -> float:
    """Predicted time of ``plan``'s rounds under ``group_time``; groups spanning two nodes cross. The groups
    hold ``vision_patches`` (per sample; default: the plan's own, :attr:`Plan.vision_patches`)."""
    patches = plan.vision_patches if vision_patches is None else vision_patches
    total = 0.0
    for round_ in plan.rounds:
        total += max(
            group_time(
                [plan.lengths[sample] for sample in group.samples],
                group.degree,
                group.ranks[0] // node_size != group.ranks[-1] // node_size,
                None if patches is None else [int(patches[sample]) for sample in group.samples],
            )
            for group in round_.groups
        )
    return total


def fitting_static_degrees(
    longest: int, num_devices: int, tokens_per_device: int, most_patches: int = 0,
    vision_patches_per_device: int | None = None,
) -> list[int]:
    """Power-of-two degrees dividing ``num_devices`` that hold a sample of ``longest`` tokens and, under a
    vision budget, one of ``most_patches`` vision patches."""
    needed = int(min_degrees(np.array([longest]), tokens_per_device)[0])
    if vision_patches_per_device is not None:
        needed = max(needed, int(vision_min_degrees(np.int64(most_patches), vision_patches_per_device)))
    degrees, degree = [], 1
    while degree <= num_devices:
        fits = padded_length(longest, degree) <= degree * tokens_per_device
        if degree >= needed and num_devices % degree == 0 and fits:
            degrees.append(degree)
        degree *= 2
    return degrees


def batch_stream(population: np.ndarray, batch_size: int, seed: int) -> Iterator[np.ndarray]:
    """Endless global batches: consecutive slices of seeded shuffles of ``population``."""
    rng = np.random.default_rng(seed)
    order = np.empty(0, dtype=np.int64)
    while True:
        while len(order) < batch_size:
            order = np.concatenate([order, rng.permutation(len(population))])
        yield population[order[:batch_size]]
        order = order[batch_size:]


# -- one device count ---------------------------------------------------------------------------------


def _pool_replay(rank_sets_per_step: list[list[tuple[int, ...]]], capacity: int) -> dict[str, float]:
    """Replay the strategy's group pool (capped LRU keyed by rank tuple) over the simulated steps."""
    from lightning_dhp.distributed.pool import GroupPool  # imports torch: only when a simulation runs

    pool = GroupPool(capacity, create=tuple, destroy=lambda group: None)
    for rank_sets in rank_sets_per_step:
        pool.acquire_plan(rank_sets)
    distinct = {ranks for rank_sets in rank_sets_per_step for ranks in rank_sets if len(ranks) > 1}
    lookups = pool.stats.hits + pool.stats.misses
    return {
        "capacity": float(capacity),
        "created": float(pool.stats.misses),
        "evicted": float(pool.stats.evictions),
        "distinct_rank_sets": float(len(distinct)),
        "hit_rate": pool.stats.hit_rate,
        "hit_rate_uncapped": 1.0 - len(distinct) / lookups if lookups else 1.0,
    }


def simulate_device_count(
    source: LengthSource, num_devices: int, config: SimulationConfig, cost: CostModel
) -> dict[str, Any]:
    """Every policy on the same ``config.steps`` global batches of ``num_devices x samples_per_device``
    (with their vision patches, when the source has some)."""
    node_size, capacity, vision_budget = config.node_size, config.tokens_per_device, config.vision_patches_per_device
    ring, ulysses = ring_group_time(cost), ulysses_group_time(cost, config.ulysses_volume_ratio)
    dynamic = {
        "dhp": (plan_batch, ring),
        "dhp-paper": (paper_plan, ring),
        "megatron-dcp": (megatron_dcp_plan, megatron_group_time(cost)),
    }
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
        for policy, (planner, group_time) in dynamic.items():
            started = time.perf_counter()
            plan = planner(batch, num_devices, capacity, cost, node_size=node_size, vision_patches=patches,
                           vision_patches_per_device=vision_budget)
            planner_ms[policy].append((time.perf_counter() - started) * 1e3)
            totals[policy] += plan.predicted_time if group_time is ring else retimed(plan, group_time, node_size)
            if policy == "dhp":
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
    step_time = {policy: total / config.steps for policy, total in totals.items()}
    best_static = min(statics, key=totals.__getitem__)
    megatron = f"ring-{static_degrees[0]}"
    return {
        "devices": num_devices,
        "global_batch": config.samples_per_device * num_devices,
        "steps": config.steps,
        "epochs": config.steps * config.samples_per_device * num_devices / len(source.lengths),
        "step_time_s": step_time,
        "lower_bound_s": lower_bound / config.steps,
        "dhp_rounds": rounds / config.steps,
        "best_static": best_static,
        "megatron": megatron,
        "speedup_over_best_static": totals[best_static] / totals["dhp"],
        "speedup_over_megatron": totals[megatron] / totals["dhp"],
        "speedup_over": {peer: totals[peer] / totals["dhp"] for peer in PEERS},
        "utilisation": {
            policy: useful / (num_devices * totals[policy]) for policy in ("dhp", best_static)
        },
        "tokens_per_device_s": {
            policy: tokens / (num_devices * totals[policy]) for policy in ("dhp", best_static)
        },
        "planner_ms": {
            "median": statistics.median(planner_ms["dhp"]),
            "p90": float(np.percentile(planner_ms["dhp"], 90)),
        },
        "peer_planner_ms_median": {peer: statistics.median(planner_ms[peer]) for peer in PEERS},
        "pool": _pool_replay(rank_sets_per_step, config.pool_size),
        **({"vision_blind_over_aware": ratio_spread(blind_over_aware)} if vision else {}),
    }


def ratio_spread(ratios: Sequence[float]) -> dict[str, float]:
    """Median, p10, p90, min and max of per-step ratios."""
    return {
        "median": statistics.median(ratios),
        "p10": float(np.percentile(ratios, 10)),
        "p90": float(np.percentile(ratios, 90)),
        "min": min(ratios),
        "max": max(ratios),
    }


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


def machine_description() -> str:
    """Host, CPUs, the 1-minute load average (timings on a shared machine depend on it) and the commit."""
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=10,
            cwd=Path(__file__).resolve().parent, check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit = "unknown"
    return (
        f"{platform.node()} ({platform.machine()}, {os.cpu_count()} CPUs, {platform.system()}, python "
        f"{platform.python_version()}, load average {os.getloadavg()[0]:.1f}), commit {commit}"
    )


def simulate(
    sources: Sequence[LengthSource],
    config: SimulationConfig,
    cost: CostModel,
    *,
    progress: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Simulate every source at every device count; the result is what ``--json`` writes."""
    for source in sources:
        check_fits_everywhere(source, config)
    distributions = []
    for source in sources:
        rows = []
        for num_devices in config.devices:
            if progress:
                progress(f"{source.name}: {num_devices} devices")
            rows.append(simulate_device_count(source, num_devices, config, cost))
        _add_scaling(rows)
        distributions.append({"name": source.name, "rule": source.rule, "stats": source.stats(), "results": rows})
    return {
        "config": dataclasses.asdict(config),
        "cost_model": dataclasses.asdict(cost),
        "machine": machine_description(),
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "distributions": distributions,
    }


def _add_scaling(rows: list[dict[str, Any]]) -> None:
    """Per-device throughput at each device count over that at the smallest one (DHP; best static)."""
    base = rows[0]
    base_static = base["tokens_per_device_s"][base["best_static"]]
    for row in rows:
        row["scaling_efficiency"] = {
            "dhp": row["tokens_per_device_s"]["dhp"] / base["tokens_per_device_s"]["dhp"],
            "best_static": row["tokens_per_device_s"][row["best_static"]] / base_static,
        }


# -- reports -----------------------------------------------------------------------------------------


def _policy_order(policy: str) -> tuple[int, int]:
    if policy in ("dhp", *PEERS, VISION_BLIND):
        return (0, ("dhp", *PEERS, VISION_BLIND).index(policy))
    kind, _, degree = policy.partition("-")
    return ({"ring": 1, "ulysses": 2}[kind], int(degree))


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---:" for _ in header) + "|"]
    return lines + ["| " + " | ".join(row) + " |" for row in rows]


def _preset_lines(preset: dict[str, Any] | None) -> list[str]:
    if not preset:
        return []
    tower = "with its vision tower" if preset["vision"] else "the vision tower is not modelled"
    return [f"Preset {preset['name']}: the {preset['model']} language model on {preset['device']} "
            f"(CostModel.for_transformer; {tower}).", ""]


def format_markdown(result: dict[str, Any], *, preamble: Sequence[str] = ()) -> str:
    """The report: configuration, ``preamble`` lines, then per distribution a summary and a per-policy table."""
    config, lines = result["config"], []
    budget = config["vision_patches_per_device"]
    vision_budget = "" if budget is None else f"{budget} vision patches per device; "
    lines += [
        "# DHP cluster-scale simulation",
        "",
        f"{result['date']} on {result['machine']}. Global batch = {config['samples_per_device']} samples per "
        f"device; {config['steps']} steps per device count; {config['tokens_per_device']} tokens per device; "
        f"{vision_budget}{config['node_size']} devices per node; pool capacity {config['pool_size']}; Ulysses "
        f"degrees divide {config['ulysses_heads']} heads (all-to-all volume {config['ulysses_volume_ratio']:.3g} x "
        f"ring K/V bytes); seed {config['seed']}.",
        "",
        "Cost model: " + ", ".join(f"{key}={value:.3g}" for key, value in result["cost_model"].items()) + ".",
        "",
        *_preset_lines(result.get("preset")),
        *preamble,
    ]
    for distribution in result["distributions"]:
        stats = distribution["stats"]
        with_vision = f" {stats['with_vision']:.0%} of them with vision patches." if "with_vision" in stats else ""
        lines += [
            "",
            f"## {distribution['name']}",
            "",
            f"Rule: {distribution['rule']}. {stats['samples']:.0f} samples, tokens median {stats['median']:.0f}, "
            f"mean {stats['mean']:.0f}, p99 {stats['p99']:.0f}, max {stats['max']:.0f}, CV {stats['cv']:.2f}."
            + with_vision,
            "",
        ]
        summary_rows = []
        for row in distribution["results"]:
            pool, best = row["pool"], row["best_static"]
            summary_rows.append([
                str(row["devices"]),
                str(row["global_batch"]),
                f"{row['step_time_s']['dhp']:.3f}",
                f"{best} {row['step_time_s'][best]:.3f}",
                f"**{row['speedup_over_best_static']:.3f}**",
                f"{row['speedup_over_megatron']:.3f} ({row['megatron']})",
                *(f"{row['speedup_over'][peer]:.3f}" for peer in PEERS),
                f"{row['step_time_s']['dhp'] / row['lower_bound_s']:.3f}",
                f"{row['dhp_rounds']:.1f}",
                f"{row['utilisation']['dhp']:.1%} / {row['utilisation'][best]:.1%}",
                f"{row['scaling_efficiency']['dhp']:.1%} / {row['scaling_efficiency']['best_static']:.1%}",
                f"{row['planner_ms']['median']:.1f} ({row['planner_ms']['p90']:.1f})",
                " / ".join(f"{row['peer_planner_ms_median'][peer]:.1f}" for peer in PEERS),
                f"{pool['created']:.0f} / {pool['distinct_rank_sets']:.0f}",
                f"{pool['hit_rate']:.1%} ({pool['hit_rate_uncapped']:.1%})",
            ])
        lines += _table(
            [
                "devices", "batch", "DHP s/step", "best static s/step", "DHP / best static", "DHP / Megatron static",
                *(f"DHP / {peer}" for peer in PEERS), "DHP / bound", "DHP rounds", "utilisation DHP / best",
                "scaling DHP / best", "planner ms median (p90)", "peer planner ms (paper / megatron)",
                "groups created / distinct", "pool hits (uncapped)",
            ],
            summary_rows,
        )
        policies = sorted({p for row in distribution["results"] for p in row["step_time_s"]}, key=_policy_order)
        lines += ["", "Predicted seconds per step of every policy:", ""]
        lines += _table(
            ["devices", *policies],
            [
                [str(row["devices"])] + [
                    f"{row['step_time_s'][policy]:.3f}" if policy in row["step_time_s"] else "-" for policy in policies
                ]
                for row in distribution["results"]
            ],
        )
        lines += _vision_lines(distribution["results"])
    lines += [
        "",
        "DHP / X: X's time over DHP's, both summed over the same steps (> 1: DHP faster). Best static: the "
        "fastest ring or Ulysses degree with hindsight. Megatron static: the smallest fitting ring degree. "
        "dhp-paper: the DHP paper's published planner; megatron-dcp: Megatron-Core dynamic CP (its groups run "
        "their samples one after another). DHP / bound: DHP's time over the planner's lower bound. "
        "DHP rounds: mean rounds (micro-steps) per batch. "
        "Utilisation: degree-1 compute of the batch over devices x step time. Scaling: per-device throughput "
        "over that at the smallest device count. Planner ms: wall time per batch on the machine above. "
        "Groups: process groups the capped pool created over the run / "
        "distinct rank sets (what an uncapped pool creates). Static policies create devices / degree groups once.",
    ]
    return "\n".join(lines) + "\n"


def _vision_lines(rows: list[dict[str, Any]]) -> list[str]:
    """Vision-blind over vision-aware DHP per device count (sources with vision patches only)."""
    if not all("vision_blind_over_aware" in row for row in rows):
        return []
    keys = ["median", "p10", "p90", "min", "max"]
    table = _table(
        ["devices", *keys],
        [[str(row["devices"]), *(f"{row['vision_blind_over_aware'][key]:.3f}" for key in keys)] for row in rows],
    )
    return ["", f"{VISION_BLIND} over dhp per step (the plan made without the vision patches, timed with them, "
            "over the plan made with them):", "", *table]


# -- command line --------------------------------------------------------------------------------------


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} must be an integer >= 1")
    return value


def _device_counts(text: str) -> tuple[int, ...]:
    counts = tuple(_positive_int(part.strip()) for part in text.split(","))
    if list(counts) != sorted(set(counts)):
        raise argparse.ArgumentTypeError(f"{text!r} must list distinct device counts in increasing order")
    return counts


def _rule_param(text: str) -> tuple[str, float]:
    key, _, value = text.partition("=")
    try:
        number = float(value)
    except ValueError:
        number = math.nan
    if not key.strip() or not math.isfinite(number):
        raise argparse.ArgumentTypeError(f"{text!r} must look like KEY=NUMBER, e.g. sample_fps=2")
    return key.strip(), int(number) if number.is_integer() else number


def build_parser() -> argparse.ArgumentParser:
    """The CLI of ``python -m lightning_dhp.simulate``."""
    defaults = SimulationConfig()
    parser = argparse.ArgumentParser(
        prog="python -m lightning_dhp.simulate",
        description="Replay token-length distributions through DHP and static context parallelism "
        "(ring and Ulysses) at cluster scale under a cost model; print a markdown report.",
    )
    source = parser.add_argument_group("lengths")
    source.add_argument("--dist", action="append", metavar="NAME",
                        help=f"named distribution (repeatable; default: all, --quick: "
                        f"{', '.join(QUICK_DISTRIBUTIONS)}); one of {sorted(DISTRIBUTIONS)}, or a video and a text "
                        f"one with vision patches on the videos: {', '.join(MULTIMODAL_DISTRIBUTIONS)}")
    source.add_argument("--param", action="append", type=_rule_param, default=[], metavar="KEY=NUMBER",
                        help="override a constant of the named distributions' rules, e.g. sample_fps=2")
    source.add_argument("--data-dir",
                        help="folder of the shared metadata CSVs (default: $DHP_DATA_DIR or ../shared/data)")
    source.add_argument("--csv", help="your own CSV of per-sample metadata (used instead of the named ones "
                        "unless --dist is given too)")
    source.add_argument("--column", help="--csv column to turn into tokens: ceil(column * scale + offset)")
    source.add_argument("--scale", type=float, default=1.0, help="tokens per unit of --column (default 1)")
    source.add_argument("--offset", type=float, default=0.0, help="tokens added to every --csv sample (default 0)")
    cluster = parser.add_argument_group("cluster")
    cluster.add_argument("--devices", type=_device_counts,
                         help=f"comma-separated device counts (default {','.join(map(str, DEFAULT_DEVICES))}; "
                         f"--quick {','.join(map(str, QUICK_DEVICES))})")
    cluster.add_argument("--samples-per-device", type=_positive_int, default=defaults.samples_per_device,
                         help="global batch = this x devices (default %(default)s)")
    cluster.add_argument("--tokens-per-device", type=_positive_int,
                         help=f"per-device token capacity C (default {defaults.tokens_per_device}, or the preset's)")
    cluster.add_argument("--vision-patches-per-device", type=_positive_int,
                         help="per-device vision-tower patch budget: a group of d devices holds at most d x this "
                         "many patches (default: none, the tower's memory is not budgeted; no preset sets one)")
    cluster.add_argument("--node-size", type=_positive_int, default=defaults.node_size,
                         help="devices per node; wider groups pay the inter-node bandwidth (default %(default)s)")
    cluster.add_argument("--cost-model", help="CostModel JSON (CostModel.save); default CostModel.default()")
    cluster.add_argument("--preset", choices=sorted(PRESETS),
                         help="the DHP paper's setting: the model's cost model on the device "
                         "(CostModel.for_transformer), its token budget, Ulysses heads and video distributions")
    cluster.add_argument("--steps", type=_positive_int,
                         help=f"global batches per device count (default {defaults.steps}, --quick 3)")
    cluster.add_argument("--pool-size", type=_positive_int, default=defaults.pool_size,
                         help="process-group pool capacity, as DHPStrategy(pool_size=...) (default %(default)s)")
    cluster.add_argument("--ulysses-heads", type=_positive_int,
                         help=f"Ulysses degrees must divide this head count (default {defaults.ulysses_heads}: "
                         "the KV heads, or the preset's)")
    cluster.add_argument("--ulysses-volume-ratio", type=float,
                         help="Ulysses all-to-all bytes per token over the ring's kv_bytes_per_token (default "
                         "10/3, or the preset's)")
    cluster.add_argument("--seed", type=int, default=defaults.seed, help="batch shuffling seed (default %(default)s)")
    output = parser.add_argument_group("output")
    output.add_argument("--quick", action="store_true", help="small fast run (few steps, devices and distributions)")
    output.add_argument("--out", help="folder for simulation.md")
    output.add_argument("--json", help="write the full result as JSON to this path")
    return parser


def _sources(args: argparse.Namespace) -> list[LengthSource]:
    params = dict(args.param)
    if args.csv is None and args.column is not None:
        raise SimulationError("--column needs --csv PATH (the file that holds that column)")
    if args.csv is not None and args.column is None:
        raise SimulationError(f"--csv {args.csv} needs --column NAME: the column to turn into token lengths")
    defaults = PRESETS[args.preset].distributions if args.preset else DISTRIBUTIONS
    names = args.dist or ([] if args.csv else list(QUICK_DISTRIBUTIONS if args.quick else defaults))
    sources = [named_source(name, data_dir=args.data_dir, params=params) for name in names]
    if args.csv:
        sources.append(csv_source(args.csv, args.column, scale=args.scale, offset=args.offset))
    return sources


def _cost_model(path: str | None, preset: str | None) -> CostModel:
    if preset is not None:
        if path is not None:
            raise SimulationError(f"--cost-model {path} and --preset {preset} both set the cost model; pass one")
        return PRESETS[preset].cost_model()
    if path is None:
        return CostModel.default()
    try:
        return CostModel.load(path)
    except FileNotFoundError:
        raise SimulationError(f"--cost-model {path} does not exist; pass a file written by CostModel.save") from None
    except (ValueError, TypeError) as error:
        raise SimulationError(
            f"--cost-model {path} is not a CostModel JSON ({error}); write one with CostModel.save"
        ) from None


def run(argv: Sequence[str] | None = None, *, prog: str | None = None) -> tuple[argparse.Namespace, dict[str, Any]]:
    """Parse the CLI's arguments and simulate; bad input exits with code 2 and the reason on stderr."""
    parser = build_parser()
    if prog:
        parser.prog = prog
    args = parser.parse_args(argv)
    defaults, preset = SimulationConfig(), PRESETS.get(args.preset)
    preset_heads, preset_ratio = preset.ulysses() if preset else (defaults.ulysses_heads, defaults.ulysses_volume_ratio)
    budget = preset.tokens_per_device if preset else defaults.tokens_per_device
    ratio = args.ulysses_volume_ratio if args.ulysses_volume_ratio is not None else preset_ratio
    if ratio < 0 or not math.isfinite(ratio):
        parser.error(f"--ulysses-volume-ratio {ratio} must be a finite number >= 0")
    config = SimulationConfig(
        devices=args.devices or (QUICK_DEVICES if args.quick else DEFAULT_DEVICES),
        samples_per_device=args.samples_per_device,
        tokens_per_device=args.tokens_per_device or budget,
        vision_patches_per_device=args.vision_patches_per_device,
        node_size=args.node_size,
        steps=args.steps or (3 if args.quick else defaults.steps),
        pool_size=args.pool_size,
        ulysses_heads=args.ulysses_heads or preset_heads,
        ulysses_volume_ratio=ratio,
        seed=args.seed,
    )
    try:
        cost = _cost_model(args.cost_model, args.preset)
        sources = _sources(args)
        result = simulate(sources, config, cost, progress=lambda message: print(message, file=sys.stderr))
    except (SimulationError, LengthFileError, PlanError) as error:
        parser.exit(2, f"{parser.prog}: error: {error}\n")
    if preset:
        result["preset"] = {"name": args.preset, **dataclasses.asdict(preset)}
    return args, result


def write_outputs(args: argparse.Namespace, report: str, result: dict[str, Any]) -> None:
    """Print ``report``; write it to ``--out``/simulation.md and ``result`` to ``--json`` when given."""
    print(report, end="")
    if args.out:
        out_dir = Path(args.out)
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "simulation.md").write_text(report)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; returns the exit code (2 on bad input, with the reason on stderr)."""
    args, result = run(argv)
    write_outputs(args, format_markdown(result), result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
