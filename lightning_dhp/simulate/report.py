"""The simulation's markdown report: the settings, then per distribution a summary table and every
policy's predicted step time (the benchmark's targets and plots: ``benchmarks/simulation_report.py``)."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from lightning_dhp.simulate.config import Preset
from lightning_dhp.simulate.policies import PEERS, VISION_BLIND, policy_order
from lightning_dhp.simulate.results import DeviceCountResult, SimulationResult


def format_markdown(result: SimulationResult, *, preamble: Sequence[str] = ()) -> str:
    """The report: configuration, ``preamble`` lines, then per distribution a summary and a per-policy table."""
    config = result.config
    budget = config.vision_patches_per_device
    vision_budget = "" if budget is None else f"{budget} vision patches per device; "
    lines = [
        "# DHP cluster-scale simulation",
        "",
        f"{result.date} on {result.machine}. Global batch = {config.samples_per_device} samples per "
        f"device; {config.steps} steps per device count; {config.tokens_per_device} tokens per device; "
        f"{vision_budget}{config.node_size} devices per node; pool capacity {config.pool_size}; Ulysses "
        f"degrees divide {config.ulysses_heads} heads (all-to-all volume {config.ulysses_volume_ratio:.3g} x "
        f"ring K/V bytes); seed {config.seed}.",
        "",
        "Cost model: " + ", ".join(f"{key}={value:.3g}" for key, value in dataclasses.asdict(result.cost_model).items())
        + ".",
        "",
        *_preset_lines(result.preset),
        *preamble,
    ]
    for distribution in result.distributions:
        stats = distribution.stats
        with_vision = "" if stats.with_vision is None else f" {stats.with_vision:.0%} of them with vision patches."
        lines += [
            "",
            f"## {distribution.name}",
            "",
            f"Rule: {distribution.rule}. {stats.samples:.0f} samples, tokens median {stats.median:.0f}, "
            f"mean {stats.mean:.0f}, p99 {stats.p99:.0f}, max {stats.max:.0f}, CV {stats.cv:.2f}." + with_vision,
            "",
        ]
        rows = distribution.results
        lines += _table(
            [
                "devices", "batch", "DHP s/step", "best static s/step", "DHP / best static", "DHP / Megatron static",
                *(f"DHP / {peer}" for peer in PEERS), "DHP / bound", "DHP rounds", "utilisation DHP / best",
                "scaling DHP / best", "planner ms median (p90)", "peer planner ms (paper / megatron)",
                "groups created / distinct", "pool hits (uncapped)",
            ],
            [_summary_row(row) for row in rows],
        )
        policies = sorted({policy for row in rows for policy in row.step_time_s}, key=policy_order)
        lines += ["", "Predicted seconds per step of every policy:", ""]
        lines += _table(
            ["devices", *policies],
            [
                [str(row.devices)] + [
                    f"{row.step_time_s[policy]:.3f}" if policy in row.step_time_s else "-" for policy in policies
                ]
                for row in rows
            ],
        )
        lines += _vision_lines(rows)
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


def _summary_row(row: DeviceCountResult) -> list[str]:
    best, pool, scaling = row.best_static, row.pool, row.scaling_efficiency
    return [
        str(row.devices),
        str(row.global_batch),
        f"{row.step_time_s['dhp']:.3f}",
        f"{best} {row.step_time_s[best]:.3f}",
        f"**{row.speedup_over_best_static:.3f}**",
        f"{row.speedup_over_megatron:.3f} ({row.megatron})",
        *(f"{row.speedup_over[peer]:.3f}" for peer in PEERS),
        f"{row.step_time_s['dhp'] / row.lower_bound_s:.3f}",
        f"{row.dhp_rounds:.1f}",
        f"{row.utilisation['dhp']:.1%} / {row.utilisation[best]:.1%}",
        f"{scaling.dhp:.1%} / {scaling.best_static:.1%}",
        f"{row.planner_ms.median:.1f} ({row.planner_ms.p90:.1f})",
        " / ".join(f"{row.peer_planner_ms_median[peer]:.1f}" for peer in PEERS),
        f"{pool.created:.0f} / {pool.distinct_rank_sets:.0f}",
        f"{pool.hit_rate:.1%} ({pool.hit_rate_uncapped:.1%})",
    ]


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---:" for _ in header) + "|"]
    return lines + ["| " + " | ".join(row) + " |" for row in rows]


def _preset_lines(preset: Preset | None) -> list[str]:
    if preset is None:
        return []
    tower = "with its vision tower" if preset.vision else "the vision tower is not modelled"
    return [f"Preset {preset.name}: the {preset.model} language model on {preset.device} "
            f"(CostModel.for_transformer; {tower}).", ""]


def _vision_lines(rows: list[DeviceCountResult]) -> list[str]:
    """Vision-blind over vision-aware DHP per device count (sources with vision patches only)."""
    if not all(row.vision_blind_over_aware is not None for row in rows):
        return []
    keys = ["median", "p10", "p90", "min", "max"]
    table = _table(
        ["devices", *keys],
        [[str(row.devices), *(f"{getattr(row.vision_blind_over_aware, key):.3f}" for key in keys)] for row in rows],
    )
    return ["", f"{VISION_BLIND} over dhp per step (the plan made without the vision patches, timed with them, "
            "over the plan made with them):", "", *table]
