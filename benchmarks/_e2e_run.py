"""One training run of the end-to-end benchmark: the example's VLM fine-tuning under one strategy.

Run by ``benchmarks/e2e.py`` as a subprocess: ``python benchmarks/_e2e_run.py SPEC_JSON RESULT_JSON``.
Lightning's default (popen) launcher re-executes this script for ranks 1..N-1 with the same
arguments; global rank 0 writes the result: the global loss of every step, the steady-state
throughput from the plan history of ``DHPPlanReport`` (every step, uncapped) and the fit's wall time.
With ``params_path`` in the spec it also saves the final parameters as one flat float64 tensor (for
the exactness check); the report's files (``plans.png``, ``dhp_summary.json``) go to ``report_dir``.

The spec (JSON) holds ``overrides`` (Hydra overrides of ``lightning_dhp/conf/vlm_finetune.yaml``), ``devices``,
``steps``, ``warmup_steps`` (recorded steps left out of the throughput), ``precision``,
``tokens_per_device``, ``static_degree`` (null for DHP) and optionally ``cost_model`` (a JSON path; without
it ``CostModel.default()``, not the example's profiled model, so every variant plans with the same one); the
strategy's other settings come from the configuration (``strategy.cp_implementation=allgather`` works).
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from lightning.pytorch import seed_everything
from omegaconf import DictConfig

from lightning_dhp import DHPStrategy
from lightning_dhp.app.main import CONF_DIR, build_datasets
from lightning_dhp.lightning import DHPDataModule
from lightning_dhp.lightning.callbacks import DHPPlanReport, plan_summary


def compose_config(overrides: Sequence[str]) -> DictConfig:
    """The example's Hydra configuration (``lightning_dhp/conf/vlm_finetune.yaml``) with ``overrides`` applied."""
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(config_name="vlm_finetune", overrides=list(overrides))


def train(spec: dict[str, Any]) -> dict[str, Any] | None:
    """Fit the example's task for ``spec["steps"]`` optimizer steps; the result on global rank 0."""
    cfg = compose_config(spec["overrides"])
    seed_everything(cfg.seed, workers=True, verbose=False)
    train_set, _, _ = build_datasets(cfg)
    task = instantiate(cfg.model, _convert_="all")  # random initialisation, the same on every run (seeded)
    strategy: DHPStrategy = instantiate(cfg.strategy, tokens_per_device=spec["tokens_per_device"],
                                        static_degree=spec["static_degree"],
                                        cost_model=spec.get("cost_model"))  # None: CostModel.default()
    report = DHPPlanReport(dirpath=spec["report_dir"], num_plotted_steps=1, log_metrics=False)
    trainer = instantiate(cfg.trainer, devices=spec["devices"], max_steps=spec["steps"], precision=spec["precision"],
                          strategy=strategy, callbacks=[report], logger=False, enable_progress_bar=False,
                          enable_model_summary=False)
    data = DHPDataModule(train_set, train_set.lengths.tolist(), cfg.data.global_batch_size,
                         num_workers=cfg.data.num_workers, seed=cfg.seed)
    started = time.perf_counter()
    trainer.fit(task, datamodule=data)
    fit_s = time.perf_counter() - started
    if not trainer.is_global_zero:
        return None
    if spec.get("params_path"):
        flat = torch.cat([p.detach().double().reshape(-1) for p in task.parameters()])
        torch.save(flat, spec["params_path"])
    steady = report.history[spec["warmup_steps"]:]
    return {
        "steps": trainer.global_step,
        "losses": report.losses,
        "fit_s": fit_s,
        "measured_steps": len(steady),
        "steady": plan_summary(steady),
        "step_s": [entry["measured_s"] for entry in steady],
        "tokens_per_step": [entry["tokens"] for entry in steady],
        "pool_misses": strategy.pool.stats.misses,
        "pool_creation_s": strategy.pool.stats.creation_seconds,
    }



if __name__ == "__main__":
    spec_path, result_path = sys.argv[1:3]
    result = train(json.loads(Path(spec_path).read_text()))
    if result is not None:
        Path(result_path).write_text(json.dumps(result, indent=1))
