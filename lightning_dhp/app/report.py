"""The summary a person reads at the end of the main job."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any


def format_table(rows: list[tuple[str, str]], title: str) -> str:
    width = max(len(name) for name, _ in rows)
    value_width = max(len(value) for _, value in rows)
    rule = "-" * (width + value_width + 3)
    lines = [title, rule, *(f"{name:<{width}} | {value}" for name, value in rows), rule]
    return "\n".join(lines)


def summary_rows(result: Mapping[str, Any]) -> list[tuple[str, str]]:
    plan = result["plan"]
    degrees = ", ".join(f"d={degree}: {count}" for degree, count in plan.get("groups_by_degree", {}).items())
    return [
        ("strategy", result["strategy"]),
        ("devices", str(result["devices"])),
        ("optimizer steps", str(result["steps"])),
        ("tokens / s", f"{plan.get('tokens_per_s', float('nan')):,.0f}"),
        ("median step time", f"{plan.get('step_s_median', float('nan')):.3f} s "
                             f"(predicted {plan.get('predicted_step_s_median', float('nan')):.3f} s)"),
        ("train loss first -> last step", f"{result['loss_first']:.4f} -> {result['loss_last']:.4f}"),
        ("answer accuracy before -> after", f"{result['accuracy_before']:.1%} -> {result['accuracy_after']:.1%} "
                                            f"(chance 10%, {result['eval_samples']} held-out samples)"),
        ("groups used, by CP degree", degrees or "-"),
        ("rounds per step (mean)", f"{plan.get('rounds_per_step', float('nan')):.2f}"),
        ("planner time (median)", f"{plan.get('planner_ms_median', float('nan')):.2f} ms"),
        ("process-group pool", f"{plan.get('pool_misses', 0)} created, {plan.get('pool_hits', 0)} reused, "
                               f"{plan.get('pool_evictions', 0)} evicted"),
        ("wall time", f"{result['wall_s']:.0f} s"),
        ("metrics CSV", result["metrics_csv"]),
        ("TensorBoard", result["tensorboard"]),
        ("plan plot", result["plan_plot"]),
    ]
