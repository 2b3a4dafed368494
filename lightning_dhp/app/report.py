"""The plan report and the summary a person reads at the end of a job (the main job and the HF examples)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from lightning.pytorch import LightningDataModule, LightningModule, Trainer
from omegaconf import DictConfig

from lightning_dhp.lightning.callbacks import DHPPlanReport


def fit_with_plan_report(cfg: DictConfig, module: LightningModule,
                         data: LightningDataModule) -> tuple[Trainer, DHPPlanReport, Path]:
    """Fit ``module`` with ``cfg.trainer`` and ``cfg.strategy`` (no logger, no progress bar), a
    :class:`DHPPlanReport` writing plans.png and dhp_summary.json to Hydra's output directory, which it returns."""
    output_dir = Path(HydraConfig.get().runtime.output_dir)
    report = DHPPlanReport(dirpath=str(output_dir), log_metrics=False)
    trainer = instantiate(cfg.trainer, strategy=instantiate(cfg.strategy), logger=False, callbacks=[report],
                          enable_progress_bar=False)
    trainer.fit(module, datamodule=data)
    return trainer, report, output_dir


def degrees_used(plan: Mapping[str, Any]) -> str:
    """A plan summary's groups by CP degree, e.g. ``d=1: 40, d=2: 12`` (``-`` when none)."""
    return ", ".join(f"d={degree}: {count}" for degree, count in plan.get("groups_by_degree", {}).items()) or "-"


def format_table(rows: list[tuple[str, str]], title: str) -> str:
    width = max(len(name) for name, _ in rows)
    value_width = max(len(value) for _, value in rows)
    rule = "-" * (width + value_width + 3)
    lines = [title, rule, *(f"{name:<{width}} | {value}" for name, value in rows), rule]
    return "\n".join(lines)


def step_time_rows(plan: Mapping[str, Any]) -> list[tuple[str, str]]:
    """Measured against predicted step time, the wait for each batch, and the planner's share of a step."""
    nan = float("nan")
    measured, predicted = plan.get("step_s_median", nan), plan.get("predicted_step_s_median", nan)
    return [
        ("median step time", f"{measured:.3f} s (predicted {predicted:.3f} s, {measured / predicted - 1:+.0%})"),
        ("batch wait (median / p90)", f"{plan.get('batch_wait_ms_median', nan):.1f} / "
                                      f"{plan.get('batch_wait_ms_p90', nan):.1f} ms"),
        ("planner CPU time (median)", f"{plan.get('planner_cpu_ms_median', nan):.2f} ms "
                                  f"({plan.get('planner_share_of_predicted_step_median', nan):.1%} of the predicted "
                                  "step)"),
    ]


def cost_model_rows(cost_model: Mapping[str, Any]) -> list[tuple[str, str]]:
    """Which cost model planned the run, its stated error, and what this run taught the next one."""
    rows = [("cost model", cost_model["name"]), ("cost model source", cost_model["source"]),
            ("cost model's stated error", cost_model.get("stated_error") or "none yet (not calibrated on whole steps)")]
    if cost_model.get("next_run_error"):
        rows.append(("recalibrated for the next run", cost_model["next_run_error"]))
    return rows


def summary_rows(result: Mapping[str, Any]) -> list[tuple[str, str]]:
    plan = result["plan"]
    return [
        ("strategy", result["strategy"]),
        *cost_model_rows(result["cost_model"]),
        ("devices", str(result["devices"])),
        ("optimizer steps", str(result["steps"])),
        ("tokens / s", f"{plan.get('tokens_per_s', float('nan')):,.0f}"),
        *step_time_rows(plan),
        ("train loss first -> last step", f"{result['loss_first']:.4f} -> {result['loss_last']:.4f}"),
        ("answer accuracy before -> after", f"{result['accuracy_before']:.1%} -> {result['accuracy_after']:.1%} "
                                            f"(chance 10%, {result['eval_samples']} held-out samples)"),
        ("groups used, by CP degree", degrees_used(plan)),
        ("rounds per step (mean)", f"{plan.get('rounds_per_step', float('nan')):.2f}"),
        ("process-group pool", f"{plan.get('pool_misses', 0)} created, {plan.get('pool_hits', 0)} reused, "
                               f"{plan.get('pool_evictions', 0)} evicted"),
        ("wall time", f"{result['wall_s']:.0f} s (load average at the end {result['load_average']:.1f})"),
        ("metrics CSV", result["metrics_csv"]),
        ("TensorBoard", result["tensorboard"]),
        ("plan plot", result["plan_plot"]),
    ]
