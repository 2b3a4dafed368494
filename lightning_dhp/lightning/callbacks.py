"""A callback that leaves a readable record of the plans a run used: a PNG and a JSON summary."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
from lightning.pytorch import Callback, LightningModule, Trainer

from lightning_dhp.plots import draw_plans


def plan_summary(history: list[dict[str, Any]]) -> dict[str, Any]:
    """Aggregate statistics of recorded steps (see ``DHPStrategy.plan_history``)."""
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
    return {
        "steps": len(history),
        "tokens_per_s": float(tokens.sum() / measured.sum()),
        "step_s_median": float(np.median(measured)),
        "predicted_step_s_median": float(np.median(predicted)),
        "planner_ms_median": float(np.median([entry["planner_s"] for entry in history]) * 1e3),
        "rounds_per_step": float(np.mean([len(entry["plan"].rounds) for entry in history])),
        "groups_by_degree": dict(sorted(degrees.items())),
    }


class DHPPlanReport(Callback):
    """At the end of training, on global rank 0, write ``plans.png`` and ``dhp_summary.json``.

    Files go to ``dirpath`` or else the logger's directory. The PNG draws the first
    ``num_plotted_steps`` recorded steps. ``losses`` keeps the global loss of every step.
    """

    def __init__(self, dirpath: str | None = None, num_plotted_steps: int = 6) -> None:
        self.dirpath = dirpath
        self.num_plotted_steps = num_plotted_steps
        self.summary: dict[str, Any] = {}
        self.plot_path: Path | None = None
        self.losses: list[float] = []

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        loss = trainer.callback_metrics.get("dhp/loss")
        if loss is not None:
            self.losses.append(float(loss))

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        history = getattr(trainer.strategy, "plan_history", None)
        if not trainer.is_global_zero or not history:
            return
        directory = Path(self.dirpath or trainer.log_dir or trainer.default_root_dir)
        directory.mkdir(parents=True, exist_ok=True)
        pool = trainer.strategy.pool.stats
        self.summary = {**plan_summary(history), "pool_hits": pool.hits, "pool_misses": pool.misses,
                        "pool_evictions": pool.evictions, "pool_creation_s": pool.creation_seconds}
        (directory / "dhp_summary.json").write_text(json.dumps(self.summary, indent=2))
        shown = history[: self.num_plotted_steps]
        self.plot_path = draw_plans([entry["plan"] for entry in shown], directory / "plans.png",
                                    measured_seconds=[entry["measured_s"] for entry in shown],
                                    titles=[f"step {entry['position']} (epoch {entry['epoch']})" for entry in shown])
