"""DHPStrategy end to end on gloo ranks: exact gradients, rounds, idle ranks, launchers.

The ranks are started by ``run_distributed`` with LOCAL_RANK set, so Lightning sees an externally
launched job (like torchrun) and every rank's result comes back to the test.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from lightning.pytorch import Trainer
from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

from lightning_dhp import DHPStrategy
from lightning_dhp.errors import DHPConfigError
from lightning_dhp.lightning import DHPBatchSampler, DHPDataModule, DHPPlanReport
from lightning_dhp.testing import launch_environment, run_distributed
from tests.tiny_lm import LMTask, TokenDataset, reference_mean_loss, reference_training

LENGTHS = [37, 5, 9, 2, 16, 23, 4, 11, 30, 6, 3, 14, 1, 19, 8, 27, 12, 7, 21, 10, 2, 33, 5, 13]
GLOBAL_BATCH = 6
STEPS = 3


def _global_batches(epochs: int, global_batch: int = GLOBAL_BATCH) -> list[list[int]]:
    sampler = DHPBatchSampler(LENGTHS, global_batch, seed=0)
    batches = []
    for epoch in range(epochs):
        sampler.set_epoch(epoch)
        batches += sampler.batches()
    return batches


BATCHES = _global_batches(epochs=2)
REPO = Path(__file__).resolve().parents[1]


def tokens_for_full_degree(lengths: list[int], world_size: int) -> int:
    """A device capacity at which the longest sample runs on all ``world_size`` processes (degree 3 on 3)."""
    return 2 * -(-max(lengths) // (2 * world_size))  # zigzag: 2 chunks a rank


def _trainer(world_size: int, strategy: DHPStrategy | str, steps: int = STEPS, **kwargs) -> Trainer:
    options = {"max_steps": steps, "logger": False, "enable_checkpointing": False, "enable_progress_bar": False,
               "enable_model_summary": False, "num_sanity_val_steps": 0, **kwargs}
    return Trainer(accelerator="cpu", devices=world_size, strategy=strategy, **options)


def plan_report() -> DHPPlanReport:
    """A plan recorder whose end-of-training files go to a fresh temporary folder, not the working directory."""
    return DHPPlanReport(dirpath=tempfile.mkdtemp(prefix="dhp-plans-"), log_metrics=False)


def _as_torchrun_rank(rank: int) -> None:
    os.environ.update(LOCAL_RANK=str(rank), NODE_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT="1")


def _data(global_batch: int = GLOBAL_BATCH) -> DHPDataModule:
    return DHPDataModule(TokenDataset(LENGTHS), LENGTHS, global_batch, seed=0,
                         val_dataset=TokenDataset(LENGTHS, seed=1), val_lengths=LENGTHS)


def _fit(rank: int, world_size: int, tokens_per_device: int, global_batch: int, strategy_kwargs: dict,
         trainer_kwargs: dict) -> dict:
    _as_torchrun_rank(rank)
    task = LMTask()
    strategy = DHPStrategy(tokens_per_device, **strategy_kwargs)
    report = plan_report()
    trainer = _trainer(world_size, strategy, callbacks=[report], **trainer_kwargs)
    data = _data(global_batch)
    trainer.fit(task, datamodule=data)
    plans = [entry["plan"] for entry in report.history]
    validation = trainer.validate(task, datamodule=data, verbose=False)
    return {"params": {k: v.detach().clone() for k, v in task.model.state_dict().items()},
            "rounds": [len(plan.rounds) for plan in plans],
            "idle": sum(plan.stats()["idle_device_rounds"] for plan in plans),
            "degrees": sorted({group.degree for plan in plans for r in plan.rounds for group in r.groups}),
            "val_loss": validation[0]["val_loss"]}


def _assert_params_close(params: dict, expected: dict) -> None:
    assert params.keys() >= expected.keys(), f"missing parameters {sorted(expected.keys() - params.keys())}"
    for name, value in expected.items():
        torch.testing.assert_close(params[name], value, rtol=1e-9, atol=1e-12, msg=f"parameter {name}")


def assert_bf16_mixed_runs_match_single_device(runs: list[dict]) -> None:
    """Every run (``params`` after STEPS steps, ``autocast``: whether each step ran under bf16 autocast) against
    single-device bf16-mixed training of the tiny LM (see :func:`assert_within_bf16_rounding`)."""
    expected = reference_training(LENGTHS, BATCHES, STEPS, precision="bf16-mixed")
    initial = reference_training(LENGTHS, BATCHES, 0, precision="bf16-mixed")
    for run in runs:
        assert run["autocast"] and all(run["autocast"])
        assert_within_bf16_rounding(run["params"], expected, initial)


def assert_within_bf16_rounding(params: dict, expected: dict, initial: dict, share: float = 0.02) -> None:
    """``params`` against single-device bf16-mixed training from ``initial`` to ``expected``. bf16 rounds
    differently once samples are packed, split over ranks or sharded, so each parameter may differ by a small
    share of its update (measured on the tiny LM: at most 0.7%, as much as bf16-mixed differs from float32
    training; losing the shortest sample of every batch, or a learning rate 10% off, moves every parameter by
    7% or more)."""
    for name, value in expected.items():
        update = float((value - initial[name]).norm())
        difference = float((params[name] - value).norm())
        assert params[name].dtype == value.dtype, f"parameter {name}: {params[name].dtype}, expected {value.dtype}"
        assert difference <= share * update, f"parameter {name}: off by {difference / update:.1%} of its update"


def load_weights_from_rank_zero(module: torch.nn.Module, weights_of_model: Callable[[], dict]) -> None:
    """Load the state dict ``weights_of_model()`` builds (``module.model``'s, as from a pretrained checkpoint),
    built and read on rank 0 only, into every rank's (sharded) ``module``."""
    weights = {f"model.{name}": value for name, value in weights_of_model().items()} if dist.get_rank() == 0 else {}
    set_model_state_dict(module, weights, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))


def same_error_on_every_rank(reports: list[dict], scenario: str) -> tuple[str, str]:
    """The one (type, message) every rank reported for ``scenario``; fails if ranks disagree."""
    errors = {report[scenario] for report in reports}
    assert len(errors) == 1, f"ranks disagree: {errors}"
    return errors.pop()


def error_of(run) -> tuple[str, str]:
    """("ok", "") if ``run()`` returns, else the type and message of what it raised (to compare ranks)."""
    try:
        run()
    except Exception as error:
        return type(error).__name__, str(error)
    return "ok", ""


@pytest.mark.parametrize(("world_size", "tokens_per_device", "global_batch", "strategy_kwargs", "trainer_kwargs"), [
    (1, 64, 6, {}, {}),
    (2, 20, 6, {"group_free_ring": True, "gradient_bucket_mb": None}, {}),  # one flat sum after the backward
    # buckets of ~500 bytes: gradients summed in many buckets during the backward
    (3, 20, 6, {"gradient_bucket_mb": 5e-4}, {"accumulate_grad_batches": 2, "gradient_clip_val": 0.05}),
    (4, 16, 6, {"cp_implementation": "allgather"}, {}),
    (4, 40, 3, {"static_degree": 1}, {}),
], ids=["1-device", "2-group-free-ring", "3-ring-accumulate-clip", "4-allgather", "4-idle-rank"])
def test_dhp_training_equals_single_device_training(world_size, tokens_per_device, global_batch, strategy_kwargs,
                                                     trainer_kwargs):
    accumulate = trainer_kwargs.get("accumulate_grad_batches", 1)
    reference = reference_training(LENGTHS, _global_batches(2, global_batch), STEPS, accumulate=accumulate,
                                   clip=trainer_kwargs.get("gradient_clip_val"))
    results = run_distributed(_fit, world_size, tokens_per_device, global_batch, strategy_kwargs, trainer_kwargs,
                              timeout_s=240)
    for result in results:  # every rank ends with the same parameters, equal to the oracle
        _assert_params_close(result["params"], reference)
        val_batches = DHPBatchSampler(LENGTHS, global_batch, shuffle=False).batches()
        expected_val_loss = reference_mean_loss(reference, LENGTHS, val_batches, seed=1)
        assert result["val_loss"] == pytest.approx(expected_val_loss, rel=1e-9)
    if world_size in (2, 3):
        assert max(results[0]["rounds"]) > 1, "the test data should need several rounds"
    if strategy_kwargs.get("static_degree") == 1:
        assert results[0]["idle"] > 0, "the test data should leave a rank idle in every round"
    elif world_size > 1:
        assert max(results[0]["degrees"]) > 1, "the test data should use context parallelism"


def test_spawn_launcher_trains_the_model_of_the_calling_process():
    task = LMTask()
    _trainer(2, DHPStrategy(20, start_method="spawn")).fit(task, datamodule=_data())
    _assert_params_close(task.model.state_dict(), reference_training(LENGTHS, BATCHES, STEPS))


def test_popen_launcher_runs_a_script_on_two_processes(tmp_path):
    output = tmp_path / "params.pt"
    env = launch_environment(PYTHONPATH=str(REPO))
    subprocess.run([sys.executable, str(REPO / "tests" / "popen_train.py"), str(output)], cwd=tmp_path, env=env,
                   check=True, timeout=240)
    _assert_params_close(torch.load(output), reference_training(LENGTHS, BATCHES, STEPS))


@pytest.mark.parametrize(("options", "fragment"), [
    ({"data_wait_timeout": 0}, "positive number of seconds"),
    ({"data_wait_timeout": 600.0, "timeout": timedelta(seconds=300)}, "not below the collective timeout"),
    ({"vision_patches_per_device": 0}, "vision_patches_per_device must be a whole number >= 1"),
    ({"vision_patches_per_device": 2.5}, "vision_patches_per_device must be a whole number >= 1"),
])
def test_options_that_cannot_work_are_refused_when_the_strategy_is_built(options, fragment):
    with pytest.raises(DHPConfigError, match=fragment):
        DHPStrategy(**options)
