"""The main job's cost model: profiled on the machine it runs on, calibrated on its own steps, cached.

Planning a CPU run with the default (H100-class) model makes the predicted step times meaningless. With
``strategy.cost_model: profile`` the first run has the strategy time this job's own module on packs of real
samples before training, every rank at once (so the processes' contention for the cores is in the timings).
Those packs miss what a whole step also costs (the optimizer, the gradient all-reduce, Lightning's hooks,
the loader workers' share of the cores), and on a busy machine a few-second profile is noisy; so at the end
of every run the model is calibrated on the run's measured steps: measured ~ ``scale`` x predicted +
``per_round_s`` x rounds (least squares in relative error), which is exactly the prediction of the same
model with every time term multiplied by ``scale`` and ``per_round_s`` added to the per-group overhead.
The calibrated model and its error over those steps are cached under a key of everything that shapes them
(model, data, strategy, processes, precision, machine, library versions): the next run with that key plans
with it from the start and states that error; a run that changes any of them profiles again. Any other
``strategy.cost_model`` is passed through untouched.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import platform
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import lightning
import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from lightning_dhp.lightning.planning_model import CALIBRATE, PROFILE
from lightning_dhp.planner import CostModel

CHOICE_VARIABLE = "DHP_APP_COST_MODEL"  # rank 0's choice, inherited by the ranks Lightning launches
MIN_CALIBRATION_STEPS = 10
PROFILED_AT_START = "profiled on this machine at the start of this run"
_KEY_VERSION = 1


@dataclass(frozen=True)
class StepCalibration:
    """How a cost model was fitted to whole measured steps, and how well it then predicts them."""

    scale: float  # every time term multiplied by this
    per_round_s: float  # added to every group's overhead, so once per round
    steps: int
    median_abs_pct_error: float  # of the calibrated prediction against each measured step
    p90_abs_pct_error: float
    date: str

    def describe(self) -> str:
        return (f"step-time error median {self.median_abs_pct_error:.0f}%, p90 {self.p90_abs_pct_error:.0f}% over "
                f"{self.steps} steps of a run on {self.date}")


@dataclass(frozen=True)
class CostModelChoice:
    """What the strategy is given (``strategy_value``), how to describe it, and where to keep its calibration."""

    strategy_value: Any  # passed to DHPStrategy(cost_model=...)
    name: str  # for the summary table
    source: str  # where it comes from
    calibration: StepCalibration | None = None  # the stated error of a cached model
    cache_path: Path | None = None  # where this run's calibrated model goes (None: not cached)

    def calibrate_and_save(self, model: CostModel, history: Sequence[dict[str, Any]]) -> StepCalibration | None:
        """Calibrate the run's resolved ``model`` on its steps (:attr:`DHPPlanReport.history`) and cache it;
        None when this choice is not cached or the run had fewer than :data:`MIN_CALIBRATION_STEPS` steps."""
        if self.cache_path is None or not isinstance(model, CostModel) or len(history) < MIN_CALIBRATION_STEPS:
            return None
        plans = [entry["plan"] for entry in history]
        calibrated, calibration = calibrate_to_steps(model, [plan.predicted_time for plan in plans],
                                                     [len(plan.rounds) for plan in plans],
                                                     [entry["measured_s"] for entry in history])
        self._save(calibrated, calibration)
        return calibration

    def _save(self, model: CostModel, calibration: StepCalibration) -> None:
        self.cache_path.parent.mkdir(parents=True, exist_ok=True)
        for path, text in ((self.cache_path, model.to_json()),
                           (calibration_path(self.cache_path), json.dumps(dataclasses.asdict(calibration)))):
            partial = path.with_suffix(f".{os.getpid()}.tmp")
            partial.write_text(text)
            partial.replace(path)


def calibration_path(model_path: Path) -> Path:
    return model_path.with_suffix(".calibration.json")


def calibrate_to_steps(model: CostModel, predicted_s: Sequence[float], rounds: Sequence[int],
                       measured_s: Sequence[float]) -> tuple[CostModel, StepCalibration]:
    """``model`` scaled and offset so that its step predictions fit ``measured_s`` (see the module docstring)."""
    predicted, counts, measured = (np.asarray(values, dtype=np.float64) for values in (predicted_s, rounds, measured_s))
    features = np.column_stack([predicted, counts]) / measured[:, None]  # relative error: each step weighs alike
    (scale, per_round), *_ = np.linalg.lstsq(features, np.ones_like(measured), rcond=None)
    if per_round < 0 or scale <= 0:  # keep the model's shape: scale alone
        scale, per_round = float(np.median(measured / predicted)), 0.0
    errors = np.abs(scale * predicted + per_round * counts - measured) / measured * 100
    calibrated = dataclasses.replace(
        model, attention_s_per_token2=model.attention_s_per_token2 * scale,
        linear_s_per_token=model.linear_s_per_token * scale, overhead_s=model.overhead_s * scale + per_round,
        ring_step_latency_s=model.ring_step_latency_s * scale, vision_s_per_patch=model.vision_s_per_patch * scale,
        intra_node_bytes_per_s=model.intra_node_bytes_per_s / scale,
        inter_node_bytes_per_s=model.inter_node_bytes_per_s / scale)
    return calibrated, StepCalibration(float(scale), float(per_round), len(measured), float(np.median(errors)),
                                       float(np.percentile(errors, 90)),
                                       datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"))


def machine_fingerprint(accelerator: str) -> dict[str, Any]:
    """The machine and software a profile is valid for."""
    fingerprint = {"host": platform.node(), "machine": platform.machine(), "processor": platform.processor(),
                   "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
                   "lightning": lightning.__version__, "python": platform.python_version()}
    if accelerator in ("gpu", "cuda") and torch.cuda.is_available():
        fingerprint["gpu"] = torch.cuda.get_device_name(0)
    return fingerprint


def profile_key(cfg: DictConfig) -> str:
    """Hash of everything a profiled cost model depends on (not the step count, logging or evaluation)."""
    strategy = OmegaConf.to_container(cfg.strategy, resolve=True)
    for not_in_the_model in ("cost_model", "planner_options"):  # (what plans with the model, not what it models)
        strategy.pop(not_in_the_model, None)
    trainer = OmegaConf.to_container(cfg.trainer, resolve=True)
    recipe = {"version": _KEY_VERSION, "model": OmegaConf.to_container(cfg.model, resolve=True),
              "data": OmegaConf.to_container(cfg.data, resolve=True), "seed": cfg.seed, "strategy": strategy,
              "trainer": {key: trainer.get(key) for key in ("accelerator", "devices", "num_nodes", "precision")},
              "machine": machine_fingerprint(str(trainer.get("accelerator")))}
    return hashlib.sha256(json.dumps(recipe, sort_keys=True, default=str).encode()).hexdigest()[:16]


def uncached_choice(value: Any) -> CostModelChoice:
    """The strategy's own reading of a ``cost_model`` value, described: the default model, a calibration at the
    start, a file, or a profile at the start of the run (not cached: that is :func:`choose_cost_model`'s)."""
    if value is None:
        return CostModelChoice(None, "default", "CostModel.default(), an H100-class 7B decoder")
    if value == CALIBRATE:
        return CostModelChoice(value, "calibrated on this device", "a generic transformer timed at the start")
    if value == PROFILE:
        return CostModelChoice(PROFILE, PROFILED_AT_START, "the strategy's profile of this model")
    return CostModelChoice(value, "from a file", str(value))


def choose_cost_model(cfg: DictConfig, cache_dir: str | os.PathLike) -> CostModelChoice:
    """The cost model for this run. Ranks Lightning launches take rank 0's choice (from the environment), so
    a cache file appearing mid-launch cannot make some ranks profile and others not."""
    value = cfg.strategy.cost_model
    if value != PROFILE:
        return uncached_choice(value)
    cache_path = Path(cache_dir) / f"cost_model_{profile_key(cfg)}.json"
    decided = os.environ.get(CHOICE_VARIABLE)
    if decided is None:  # global rank 0, before it launches the others
        decided = str(cache_path) if cache_path.exists() and calibration_path(cache_path).exists() else PROFILE
        os.environ[CHOICE_VARIABLE] = decided
    if decided == PROFILE:
        return CostModelChoice(PROFILE, PROFILED_AT_START,
                               f"the strategy's profile; calibrated on this run's steps into {cache_path}",
                               cache_path=cache_path)
    calibration = StepCalibration(**json.loads(calibration_path(Path(decided)).read_text()))
    return CostModelChoice(decided, "profiled on this machine, calibrated on an earlier run's steps", decided,
                           calibration, cache_path)
