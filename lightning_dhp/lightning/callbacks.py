"""A callback that records the plans a run used, logs them as ``dhp/*`` metrics, and leaves a readable
record at the end: a PNG of the first plans and a JSON summary."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np
from lightning.pytorch import Callback, LightningModule, Trainer
from typing_extensions import override

from lightning_dhp.lightning import _lightning
from lightning_dhp.lightning.planned_loader import PlannedStep
from lightning_dhp.plots import draw_plans


def plan_summary(history: list[dict[str, Any]]) -> dict[str, Any]:
    """Aggregate statistics of recorded steps (see :attr:`DHPPlanReport.history`)."""
    if not history:
        return {"steps": 0}
    degrees: dict[int, int] = {}
    for entry in history:
        for round_ in entry["plan"].rounds:
            for group in round_.groups:
                degrees[group.degree] = degrees.get(group.degree, 0) + 1
    measured = np.array([entry["measured_s"] for entry in history])
    predicted = np.array([entry["plan"].predicted_time for entry in history])
    tokens = np.array([entry["tokens"] for entry in history])
    planner = np.array([entry["planner_cpu_s"] for entry in history])
    batch_wait = np.array([entry["batch_wait_s"] for entry in history])
    return {
        "steps": len(history),
        "tokens_per_s": float(tokens.sum() / measured.sum()),
        "step_s_median": float(np.median(measured)),
        "predicted_step_s_median": float(np.median(predicted)),
        "planner_cpu_ms_median": float(np.median(planner) * 1e3),
        "planner_share_of_predicted_step_median": float(np.median(planner / predicted)),
        "batch_wait_ms_median": float(np.median(batch_wait) * 1e3),
        "batch_wait_ms_p90": float(np.percentile(batch_wait, 90) * 1e3),
        "rounds_per_step": float(np.mean([len(entry["plan"].rounds) for entry in history])),
        "groups_by_degree": dict(sorted(degrees.items())),
    }


class DHPPlanReport(Callback):
    """Record every training step's plan and time, log ``dhp/*`` metrics, write files at the end.

    ``history`` holds one entry per training step: ``plan``, ``measured_s`` (wall time of the step,
    from batch start to batch end), ``batch_wait_s`` (from the end of the previous batch, or the start of
    the epoch, to this batch's start: the wait for the loader plus Lightning's bookkeeping between steps;
    near zero when loading overlaps the step), ``tokens``, ``planner_cpu_s``, ``position`` and ``epoch``; it
    keeps the last ``max_history`` steps (all by default). At the end of training, on global rank 0,
    ``plans.png`` (the first ``num_plotted_steps`` steps; none for 0) and ``dhp_summary.json`` go to ``dirpath``
    or else the logger's directory. ``losses`` keeps the global loss of every step.

    With ``log_metrics``, global rank 0 sends each step's ``dhp/*`` statistics straight to the trainer's loggers
    every ``log_every_n_steps`` steps, as Lightning's ``LearningRateMonitor`` does: ``self.log`` spent about a
    millisecond per metric and step on bookkeeping (device moves, reductions) that these rank-local numbers do
    not need, between every two steps. So they are not in ``trainer.callback_metrics``.
    """

    def __init__(self, dirpath: str | None = None, num_plotted_steps: int = 6, *, log_metrics: bool = True,
                 max_history: int | None = None) -> None:
        self.dirpath = dirpath
        self.num_plotted_steps = num_plotted_steps
        self.log_metrics = log_metrics
        self.max_history = max_history
        self.history: list[dict[str, Any]] = []
        self.summary: dict[str, Any] = {}
        self.plot_path: Path | None = None
        self.losses: list[float] = []
        self._started: float | None = None
        self._previous_end: float | None = None  # end of the previous batch, or start of the epoch

    @override
    def on_train_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._previous_end = time.perf_counter()

    @override
    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        self._started = time.perf_counter()

    @override
    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        loss = trainer.callback_metrics.get("dhp/loss")
        if loss is not None:
            self.losses.append(float(loss))
        if not isinstance(batch, PlannedStep) or self._started is None:
            return
        ended = time.perf_counter()
        measured = ended - self._started
        batch_wait = self._started - self._previous_end if self._previous_end is not None else 0.0
        self._previous_end = ended
        self.history.append({"plan": batch.plan, "measured_s": measured, "batch_wait_s": batch_wait,
                             "tokens": batch.num_tokens, "planner_cpu_s": batch.planner_cpu_seconds,
                             "position": batch.request.position, "epoch": batch.request.epoch})
        if self.max_history is not None:
            del self.history[:-self.max_history]
        logging_step = _lightning.logging_step(trainer) if self.log_metrics and trainer.is_global_zero else None
        if logging_step is not None:  # rank 0's loggers write, as with self.log, without its per-call bookkeeping
            metrics = self._metrics(trainer, batch, measured, batch_wait)
            for logger in trainer.loggers:
                logger.log_metrics(metrics, step=logging_step)

    @staticmethod
    def _metrics(trainer: Trainer, step: PlannedStep, measured_seconds: float,
                 batch_wait_seconds: float) -> dict[str, float]:
        stats = step.plan.stats()
        strategy = trainer.strategy
        metrics = {
            "dhp/rounds": float(len(step.plan.rounds)),
            "dhp/groups": float(stats["num_groups"]),
            "dhp/max_degree": float(stats["max_degree"]),
            "dhp/mean_degree": float(stats["mean_degree"]),
            "dhp/predicted_step_s": float(step.plan.predicted_time),
            "dhp/planner_cpu_ms": step.planner_cpu_seconds * 1e3,
            "dhp/step_s": measured_seconds,
            "dhp/batch_wait_s": batch_wait_seconds,
            "dhp/tokens_per_s": step.num_tokens / measured_seconds,
        }
        if hasattr(strategy, "pool"):
            metrics.update({"dhp/pool_hits": float(strategy.pool.stats.hits),
                            "dhp/pool_misses": float(strategy.pool.stats.misses),
                            "dhp/pool_groups": float(len(strategy.pool)),
                            "dhp/skipped_samples": float(strategy.skipped_samples)})
        return metrics

    @override
    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        log_dir = self.dirpath or trainer.log_dir  # a collective: every rank asks
        if not trainer.is_global_zero or not self.history:
            return
        directory = Path(log_dir or trainer.default_root_dir)
        directory.mkdir(parents=True, exist_ok=True)
        pool = trainer.strategy.pool.stats
        self.summary = {**plan_summary(self.history), "pool_hits": pool.hits, "pool_misses": pool.misses,
                        "pool_evictions": pool.evictions, "pool_creation_s": pool.creation_seconds}
        (directory / "dhp_summary.json").write_text(json.dumps(self.summary, indent=2))
        shown = self.history[: self.num_plotted_steps]
        if not shown:  # num_plotted_steps=0: no plot
            return
        self.plot_path = draw_plans([entry["plan"] for entry in shown], directory / "plans.png",
                                    measured_seconds=[entry["measured_s"] for entry in shown],
                                    titles=[f"step {entry['position']} (epoch {entry['epoch']})" for entry in shown])
