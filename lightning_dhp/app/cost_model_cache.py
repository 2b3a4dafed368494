"""The main job's cost model: profiled on the machine it runs on, once, then read from disk.

Planning a CPU run with the default (H100-class) model makes the predicted step times meaningless. With
``strategy.cost_model: profile`` the strategy times this job's own module on packs of real samples at the
start of training, every rank at once (so the processes' contention for the cores is in the timings); the
fitted model is cached under a key of everything that shapes it (model, data, strategy, processes,
precision, machine, library versions), so the next run with the same key plans with it from the start and
one that changes any of them profiles again. Any other ``strategy.cost_model`` is passed through untouched.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import lightning
import torch
from omegaconf import DictConfig, OmegaConf

from lightning_dhp.planner import CostModel

PROFILE = "profile"
CHOICE_VARIABLE = "DHP_APP_COST_MODEL"  # rank 0's choice, inherited by the ranks Lightning launches
_KEY_VERSION = 1


@dataclass(frozen=True)
class CostModelChoice:
    """What the strategy is given (``strategy_value``) and how to describe and keep it."""

    strategy_value: Any  # passed to DHPStrategy(cost_model=...)
    name: str  # e.g. "profiled (cached)" for the summary table
    source: str  # where it comes from: a file, or "profiled at the start of this run"
    cache_path: Path | None = None  # where a freshly profiled model is saved (None: nothing to save)

    def save(self, model: CostModel) -> None:
        """Cache the strategy's profiled ``model`` (atomically: a concurrent reader never sees half a file)."""
        if self.cache_path is None:
            return
        self.cache_path.parent.mkdir(parents=True, exist_ok=True)
        partial = self.cache_path.with_suffix(f".{os.getpid()}.tmp")
        model.save(partial)
        partial.replace(self.cache_path)


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
    strategy.pop("cost_model", None)
    trainer = cfg.trainer
    recipe = {"version": _KEY_VERSION, "model": OmegaConf.to_container(cfg.model, resolve=True),
              "data": OmegaConf.to_container(cfg.data, resolve=True), "seed": cfg.seed, "strategy": strategy,
              "trainer": {key: OmegaConf.to_container(trainer, resolve=True).get(key)
                          for key in ("accelerator", "devices", "num_nodes", "precision")},
              "machine": machine_fingerprint(str(trainer.accelerator))}
    return hashlib.sha256(json.dumps(recipe, sort_keys=True, default=str).encode()).hexdigest()[:16]


def choose_cost_model(cfg: DictConfig, cache_dir: str | os.PathLike) -> CostModelChoice:
    """The cost model for this run. Ranks Lightning launches take rank 0's choice (from the environment), so
    a cache file appearing mid-launch cannot make some ranks profile and others not."""
    value = cfg.strategy.cost_model
    if value is None:
        return CostModelChoice(None, "default (H100-class 7B decoder)", "CostModel.default()")
    if value == "auto":
        return CostModelChoice(value, "calibrated on this device", "a generic transformer timed at the start")
    if value != PROFILE:
        return CostModelChoice(value, "from a file", str(value))
    cache_path = Path(cache_dir) / f"cost_model_{profile_key(cfg)}.json"
    decided = os.environ.get(CHOICE_VARIABLE)
    if decided is None:  # global rank 0, before it launches the others
        decided = str(cache_path) if cache_path.exists() else PROFILE
        os.environ[CHOICE_VARIABLE] = decided
    if decided == PROFILE:
        return CostModelChoice(PROFILE, "profiled on this machine",
                               f"profiled at the start of this run, cached at {cache_path}", cache_path)
    written = datetime.fromtimestamp(Path(decided).stat().st_mtime, timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    return CostModelChoice(decided, "profiled on this machine (cached)", f"{decided}, profiled {written}")
