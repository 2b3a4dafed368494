"""The Hydra application end to end in a subprocess, and its answers to bad configuration."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

from lightning_dhp.testing import launch_environment

REPO = Path(__file__).resolve().parents[1]
TINY = ["data.num_train=48", "data.num_val=8", "data.global_batch_size=8", "data.num_workers=0", "eval.num_samples=16",
        "pretrain.steps=3", "pretrain.num_samples=64", "pretrain.samples_per_step=8", "trainer.max_steps=3",
        "plot_steps=2"]


def _run(tmp_path: Path, *overrides: str, timeout: int = 300,
         flags: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    env = launch_environment()
    command = [sys.executable, str(REPO / "examples" / "vlm_finetune.py"), *flags, *TINY,
               f"pretrain.cache_dir={tmp_path / 'cache'}", f"hydra.run.dir={tmp_path / 'run'}", *overrides]
    return subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=timeout)


# The main job's test learns: a starting checkpoint pretrained for 150 steps (5 s) on 16 px frames, then
# 3 fine-tuning steps on videos of at most 4 frames, each one over the budget of 24 tokens (CP degree 2).
LEARNS = ["data.max_frames=4", "data.frame_sizes=[16]", "strategy.tokens_per_device=24", "eval.num_samples=50",
          "pretrain.steps=150", "pretrain.num_samples=512", "pretrain.samples_per_step=16"]
ACCURACY_FLOOR = 0.3  # chance is 0.1; measured 0.46 with this seed (0.70 with seed=1)


def test_main_job_runs_on_two_processes_learns_and_leaves_its_results(tmp_path):
    result = _run(tmp_path, "trainer.devices=2", *LEARNS)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "VLM fine-tuning summary" in result.stdout
    run = tmp_path / "run"
    summary = json.loads((run / "summary.json").read_text())
    assert summary["devices"] == 2 and summary["steps"] == 3
    assert summary["eval_samples"] == 50 and summary["accuracy_after"] >= ACCURACY_FLOOR, summary
    assert summary["plan"]["groups_by_degree"].get("2", 0) > 0, "the long samples must have run context-parallel"
    with open(summary["metrics_csv"]) as metrics:
        rows = list(csv.DictReader(metrics))
    loss_steps = {row["step"] for row in rows if row.get("dhp/loss")}
    assert loss_steps == {"0", "1", "2"}, "the strategy's loss must reach the logger every step"
    assert {row["step"] for row in rows if row.get("dhp/planner_cpu_ms")} == loss_steps, \
        "plan statistics must reach the logger under the steps Lightning logs the loss"
    assert (run / "plans.png").stat().st_size > 10_000
    assert any((tmp_path / "cache").glob("tiny_vlm_pretrained_*.pt")), "the starting checkpoint is cached"
    assert summary["cost_model"]["name"] == "profiled on this machine at the start of this run", summary
    assert summary["plan"]["batch_wait_ms_p90"] >= summary["plan"]["batch_wait_ms_median"] >= 0
    assert "Epoch 0/0" in result.stdout and "/-" not in result.stdout, "max_epochs must cover max_steps"
    assert "LeafSpec" not in result.stdout + result.stderr, "Lightning's pytree warning must be filtered"


@pytest.mark.parametrize(("overrides", "fragments"), [
    (["trainer.no_such_key=1"], ["no_such_key"]),
    (["strategy.tokens_per_device=16"], ["tokens_per_device", "dataset sample"]),
    (["data.metadata_file=/no/such/durations.csv"], ["/no/such/durations.csv"]),
    (["trainer.devices=4096"], ["trainer.devices=4096", "trainer.devices=<="]),
], ids=["unknown-key", "tokens-per-device-too-small", "missing-length-file", "too-many-devices"])
def test_bad_configuration_is_named_without_a_traceback(tmp_path, overrides, fragments):
    result = _run(tmp_path, "trainer.devices=1", *overrides, timeout=120)
    assert result.returncode != 0
    for fragment in fragments:
        assert fragment in result.stderr, result.stderr[-2000:]
    assert "Traceback" not in result.stderr


def test_multirun_sweeps_strategies_each_job_with_its_own_world(tmp_path):
    sweep = f"hydra.sweep.dir={tmp_path / 'sweep'}"
    result = _run(tmp_path, "strategy=dhp,static_cp", "trainer.devices=2", sweep, flags=("--multirun",))
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("Launching 2 jobs") == 1, "ranks > 0 must not start the sweep again"
    strategies = [json.loads((tmp_path / "sweep" / job / "summary.json").read_text())["strategy"] for job in "01"]
    assert strategies[0].startswith("DHP") and strategies[1] == "static ring CP, degree 2"


def test_the_summary_names_the_planner_options_that_differ_from_the_defaults():
    from lightning_dhp import DHPStrategy
    from lightning_dhp.app.main import _describe
    assert _describe(DHPStrategy(tokens_per_device=24)) == "DHP (ring, tokens_per_device=24)"
    lighter = DHPStrategy(tokens_per_device=24, planner_options={"rebalance": False, "prune_margin": 0.02})
    assert _describe(lighter) == "DHP (ring, tokens_per_device=24, rebalance=False)"  # 0.02 is the default


def test_progress_bar_epochs_cover_max_steps():
    from lightning_dhp.app.main import epochs_to_cover
    assert epochs_to_cover(200, 128) == 2 and epochs_to_cover(128, 128) == 1 and epochs_to_cover(129, 128) == 2
    assert epochs_to_cover(200, 128, accumulate_grad_batches=2) == 4  # 64 optimizer steps per epoch
    assert epochs_to_cover(3, 1) == 3


def test_profiled_cost_model_is_calibrated_on_the_steps_cached_per_key_and_rank_zero_decides(tmp_path, monkeypatch):
    from types import SimpleNamespace

    from hydra import compose, initialize_config_dir

    from lightning_dhp.app.cost_model_cache import CHOICE_VARIABLE, PROFILE, choose_cost_model, profile_key
    from lightning_dhp.app.main import CONF_DIR
    from lightning_dhp.planner import CostModel

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name="vlm_finetune", overrides=[f"profile_cache_dir={tmp_path}"])
        wider = compose(config_name="vlm_finetune", overrides=["model.config.hidden_size=128"])
        longer = compose(config_name="vlm_finetune", overrides=["trainer.max_steps=5"])
        lighter = compose(config_name="vlm_finetune", overrides=["strategy.planner_options={rebalance:false}"])
    assert profile_key(cfg) != profile_key(wider), "another model must be profiled again"
    assert profile_key(cfg) == profile_key(longer), "the step count does not change the model"
    assert profile_key(cfg) == profile_key(lighter), "how the planner searches does not change the model"
    monkeypatch.delenv(CHOICE_VARIABLE, raising=False)
    first = choose_cost_model(cfg, tmp_path)
    assert first.strategy_value == PROFILE and os.environ[CHOICE_VARIABLE] == PROFILE
    # Steps measured at 2x the profiled prediction plus 10 ms per round (the optimizer, hooks, ...).
    profiled = CostModel(linear_s_per_token=3e-5, attention_s_per_token2=1e-8, ring_step_latency_s=6e-3)
    history = [{"plan": SimpleNamespace(predicted_time=0.05 * (1 + step % 7), rounds=[None] * (1 + step % 3)),
                "measured_s": 2 * 0.05 * (1 + step % 7) + 0.01 * (1 + step % 3)} for step in range(20)]
    calibration = first.calibrate_and_save(profiled, history)
    assert calibration.scale == pytest.approx(2) and calibration.per_round_s == pytest.approx(0.01)
    assert calibration.median_abs_pct_error < 1e-6 and calibration.steps == 20
    assert choose_cost_model(cfg, tmp_path).strategy_value == PROFILE, "a launched rank keeps rank 0's choice"
    monkeypatch.delenv(CHOICE_VARIABLE)
    second = choose_cost_model(cfg, tmp_path)
    cached = CostModel.load(second.strategy_value)
    for lengths, degree in (([300], 1), ([500, 100], 2), ([800], 3)):
        expected = 2 * profiled.group_time(lengths, degree) + 0.01
        assert cached.group_time(lengths, degree) == pytest.approx(expected, rel=1e-12)
    assert second.calibration == calibration and "calibrated" in second.name


def test_only_lightnings_pytree_warning_is_silenced():
    from lightning_dhp.app.quiet_warnings import LIGHTNING_PYTREE_WARNING, ignore_lightning_pytree_warning

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ignore_lightning_pytree_warning()
        warnings.warn(LIGHTNING_PYTREE_WARNING, FutureWarning, stacklevel=1)
        warnings.warn(LIGHTNING_PYTREE_WARNING + " and more", FutureWarning, stacklevel=1)
        warnings.warn(LIGHTNING_PYTREE_WARNING, DeprecationWarning, stacklevel=1)
    assert [(type(w.message), str(w.message)) for w in caught] == [
        (FutureWarning, LIGHTNING_PYTREE_WARNING + " and more"), (DeprecationWarning, LIGHTNING_PYTREE_WARNING)]
