"""Fine-tune the tiny VLM under DHPStrategy, configured with Hydra (``lightning_dhp/conf/vlm_finetune.yaml``).

Every rank runs this file: Lightning's launcher re-executes it for ranks 1..N-1 with the same
overrides. Pretraining is cached on disk, so only the first run pays for it; evaluation and the
summary happen on global rank 0 after training.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import hydra
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from hydra.utils import instantiate
from lightning.pytorch import seed_everything
from omegaconf import DictConfig, OmegaConf

from lightning_dhp.app.cost_model_cache import CHOICE_VARIABLE, choose_cost_model
from lightning_dhp.app.pretrain import pretrained_checkpoint
from lightning_dhp.app.quiet_warnings import ignore_lightning_pytree_warning
from lightning_dhp.app.report import format_table, summary_rows
from lightning_dhp.data.lengths import LengthFileError
from lightning_dhp.data.video_digits import VideoDigits
from lightning_dhp.lightning import DHPBatchSampler, DHPConfigError, DHPDataError, DHPDataModule, DHPStrategy
from lightning_dhp.lightning.callbacks import DHPPlanReport
from lightning_dhp.planner import PlanError

CONF_DIR = Path(__file__).resolve().parents[1] / "conf"  # package data: shipped with every install
USER_ERRORS = (PlanError, LengthFileError, DHPConfigError, DHPDataError)
_LAUNCHER_VARIABLES = ("LOCAL_RANK", "NODE_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", CHOICE_VARIABLE)


class ConfigError(ValueError):
    """A configuration value that cannot work on this machine; the message names key and fix."""


def check_devices(trainer_cfg: DictConfig) -> None:
    """Refuse more processes than this machine can run, naming the key and the limit."""
    devices, accelerator = trainer_cfg.devices, trainer_cfg.accelerator
    if accelerator == "cpu":
        limit = 4 * (os.cpu_count() or 1)
        where = f"{os.cpu_count()} CPU cores here; at most 4 gloo processes per core"
    elif accelerator in ("gpu", "cuda"):
        limit = torch.cuda.device_count()
        where = f"{limit} CUDA devices visible"
    else:
        return
    if isinstance(devices, int) and devices > limit:
        raise ConfigError(f"trainer.devices={devices} is more than this machine allows ({where}); "
                          f"pass trainer.devices=<= {limit}")
    if isinstance(devices, int) and devices < 1 and devices != -1:
        raise ConfigError(f"trainer.devices={devices} must be >= 1 (or -1 for all)")


def build_datasets(cfg: DictConfig) -> tuple[VideoDigits, VideoDigits, VideoDigits]:
    """Training, validation and held-out evaluation sets (different seeds, same length rule)."""
    data = cfg.data
    common = {"sample_fps": data.sample_fps, "max_frames": data.max_frames,
              "frame_sizes": list(data.frame_sizes), "metadata_file": data.metadata_file,
              "data_dir": data.data_dir}
    return (VideoDigits(data.num_train, seed=cfg.seed, **common),
            VideoDigits(data.num_val, seed=cfg.seed + 1, **common),
            VideoDigits(cfg.eval.num_samples, seed=cfg.seed + 2, **common))


def epochs_to_cover(max_steps: int, batches_per_epoch: int, accumulate_grad_batches: int = 1) -> int:
    """Epochs that hold ``max_steps`` optimizer steps: a finite ``max_epochs`` keeps the progress bar
    honest (Lightning shows ``max_epochs - 1``, i.e. "Epoch 1/-2" when training is bounded by steps alone)."""
    steps_per_epoch = max(1, batches_per_epoch // accumulate_grad_batches)
    return max(1, math.ceil(max_steps / steps_per_epoch))


def _children_run_this_job_only() -> None:
    """Lightning's launcher starts ranks 1..N-1 by re-running ``sys.argv``; inside a multirun job that
    would start the whole sweep again, so hand them this job's own overrides instead."""
    hydra_config = HydraConfig.get()
    if hydra_config.mode == RunMode.MULTIRUN:
        sys.argv = [sys.argv[0], *hydra_config.overrides.task]


@contextmanager
def _own_world() -> Iterator[None]:
    """Leave no process group and no launcher variables behind, so a multirun's next job launches its
    own world (variables a cluster set before the run are kept)."""
    before = {key: os.environ.get(key) for key in _LAUNCHER_VARIABLES}
    try:
        yield
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
        for key, value in before.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def run(cfg: DictConfig) -> dict[str, Any] | None:
    """The main job; returns the summary on global rank 0 (None on other ranks)."""
    started = time.perf_counter()
    ignore_lightning_pytree_warning()
    _children_run_this_job_only()
    check_devices(cfg.trainer)
    seed_everything(cfg.seed, workers=True, verbose=False)
    train_set, val_set, eval_set = build_datasets(cfg)
    output_dir = Path(HydraConfig.get().runtime.output_dir)

    model_cfg = OmegaConf.to_container(cfg.model.config, resolve=True)
    checkpoint = pretrained_checkpoint(
        model_cfg, steps=cfg.pretrain.steps, samples_per_step=cfg.pretrain.samples_per_step,
        lr=cfg.pretrain.lr, num_samples=cfg.pretrain.num_samples, seed=cfg.seed,
        frame_sizes=list(cfg.data.frame_sizes), cache_dir=cfg.pretrain.cache_dir)
    task = instantiate(cfg.model, init_checkpoint=str(checkpoint), _convert_="all")

    report = DHPPlanReport(dirpath=str(output_dir), num_plotted_steps=cfg.plot_steps)
    loggers = [instantiate(logger_cfg) for logger_cfg in cfg.logger.values()]
    data = DHPDataModule(train_set, train_set.lengths.tolist(), cfg.data.global_batch_size,
                         val_dataset=val_set, num_workers=cfg.data.num_workers, seed=cfg.seed)
    bounded = {}
    if cfg.trainer.get("max_steps", -1) > 0 and cfg.trainer.get("max_epochs") is None:
        batches = len(DHPBatchSampler(train_set.lengths.tolist(), cfg.data.global_batch_size))
        bounded["max_epochs"] = epochs_to_cover(cfg.trainer.max_steps, batches, cfg.trainer.accumulate_grad_batches)
    with _own_world():
        cost_model = choose_cost_model(cfg, cfg.profile_cache_dir)
        strategy: DHPStrategy = instantiate(cfg.strategy, cost_model=cost_model.strategy_value)
        trainer = instantiate(cfg.trainer, strategy=strategy, logger=loggers, callbacks=[report], **bounded)
        trainer.fit(task, datamodule=data)
        trained_state = trainer.strategy.lightning_module_state_dict()  # gathered to rank 0 when sharded
    if not trainer.is_global_zero:
        return None
    calibrated = cost_model.calibrate_and_save(strategy.planning_cost_model, report.history)
    trained = instantiate(cfg.model, _convert_="all")
    trained.load_state_dict(trained_state)

    before = instantiate(cfg.model, init_checkpoint=str(checkpoint), _convert_="all")
    result = {
        "strategy": _describe(strategy),
        "cost_model": {"name": cost_model.name, "source": cost_model.source,
                       "stated_error": cost_model.calibration and cost_model.calibration.describe(),
                       "next_run_error": calibrated and calibrated.describe()},
        "devices": trainer.world_size,
        "steps": trainer.global_step,
        "loss_first": report.losses[0] if report.losses else float("nan"),
        "loss_last": report.losses[-1] if report.losses else float("nan"),
        "accuracy_before": before.answer_accuracy(eval_set),
        "accuracy_after": trained.answer_accuracy(eval_set),
        "eval_samples": len(eval_set),
        "plan": report.summary,
        "metrics_csv": str(Path(loggers[0].log_dir) / "metrics.csv"),
        "tensorboard": str(loggers[1].log_dir) if len(loggers) > 1 else "-",
        "plan_plot": str(report.plot_path),
        "wall_s": time.perf_counter() - started,
        "load_average": os.getloadavg()[0],  # step times on a shared machine move with it
    }
    (output_dir / "summary.json").write_text(json.dumps(result, indent=2, default=str))
    print("\n" + format_table(summary_rows(result), "lightning-dhp: VLM fine-tuning summary"), flush=True)
    return result


def _describe(strategy: DHPStrategy) -> str:
    if strategy.static_degree == 1:
        return "data parallel (degree 1, no CP)"
    if strategy.static_degree is not None:
        return f"static ring CP, degree {strategy.static_degree}"
    tuned = strategy.planner_options.changed() if strategy.planner_options is not None else {}
    planner = "".join(f", {name}={value}" for name, value in tuned.items())
    return f"DHP ({strategy.cp_implementation}, tokens_per_device={strategy.tokens_per_device}{planner})"


@hydra.main(config_path=str(CONF_DIR), config_name="vlm_finetune", version_base="1.3")
def _hydra_main(cfg: DictConfig) -> None:
    try:
        run(cfg)
    except (*USER_ERRORS, ConfigError) as error:
        print(f"\nerror: {error}", file=sys.stderr, flush=True)
        sys.exit(2)


def main() -> None:
    """Console-script entry point (``dhp-vlm-finetune``)."""
    _hydra_main()


if __name__ == "__main__":
    main()
