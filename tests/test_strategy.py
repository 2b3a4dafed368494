"""DHPStrategy end to end on gloo ranks: exact gradients, rounds, idle ranks, launchers.

The ranks are started by ``run_distributed`` with LOCAL_RANK set, so Lightning sees an externally
launched job (like torchrun) and every rank's result comes back to the test.
"""

from __future__ import annotations

import subprocess
import sys
from datetime import timedelta

import pytest
import torch

from lightning_dhp import DHPStrategy
from lightning_dhp.errors import DHPConfigError
from lightning_dhp.lightning import DHPBatchSampler
from lightning_dhp.testing import launch_environment, run_distributed
from tests.helpers import (
    LENGTHS,
    REPO,
    STEPS,
    as_torchrun_rank,
    assert_parameters_match,
    cpu_trainer,
    global_batches,
    plan_report,
    single_device_training,
    token_data,
)
from tests.tiny_lm import LMTask, reference_mean_loss, reference_training


def _fit(rank: int, world_size: int, tokens_per_device: int, global_batch: int, strategy_kwargs: dict,
         trainer_kwargs: dict) -> dict:
    as_torchrun_rank(rank)
    task = LMTask()
    strategy = DHPStrategy(tokens_per_device, **strategy_kwargs)
    report = plan_report()
    trainer = cpu_trainer(world_size, strategy, callbacks=[report], **trainer_kwargs)
    data = token_data(global_batch)
    trainer.fit(task, datamodule=data)
    plans = [entry["plan"] for entry in report.history]
    validation = trainer.validate(task, datamodule=data, verbose=False)
    return {"params": {k: v.detach().clone() for k, v in task.model.state_dict().items()},
            "rounds": [len(plan.rounds) for plan in plans],
            "idle": sum(plan.stats()["idle_device_rounds"] for plan in plans),
            "degrees": sorted({group.degree for plan in plans for r in plan.rounds for group in r.groups}),
            "val_loss": validation[0]["val_loss"]}


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
    reference = reference_training(LENGTHS, global_batches(2, global_batch), STEPS, accumulate=accumulate,
                                   clip=trainer_kwargs.get("gradient_clip_val"))
    results = run_distributed(_fit, world_size, tokens_per_device, global_batch, strategy_kwargs, trainer_kwargs,
                              timeout_s=240)
    for result in results:  # every rank ends with the same parameters, equal to the oracle
        assert_parameters_match(result["params"], reference)
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
    cpu_trainer(2, DHPStrategy(20, start_method="spawn")).fit(task, datamodule=token_data())
    assert_parameters_match(task.model.state_dict(), single_device_training())


def test_popen_launcher_runs_a_script_on_two_processes(tmp_path):
    output = tmp_path / "params.pt"
    env = launch_environment(PYTHONPATH=str(REPO))
    subprocess.run([sys.executable, str(REPO / "tests" / "popen_train.py"), str(output)], cwd=tmp_path, env=env,
                   check=True, timeout=240)
    assert_parameters_match(torch.load(output), single_device_training())


@pytest.mark.parametrize(("options", "fragment"), [
    ({"data_wait_timeout": 0}, "positive number of seconds"),
    ({"data_wait_timeout": 600.0, "timeout": timedelta(seconds=300)}, "not below the collective timeout"),
    ({"vision_patches_per_device": 0}, "vision_patches_per_device must be a whole number >= 1"),
    ({"vision_patches_per_device": 2.5}, "vision_patches_per_device must be a whole number >= 1"),
])
def test_options_that_cannot_work_are_refused_when_the_strategy_is_built(options, fragment):
    with pytest.raises(DHPConfigError, match=fragment):
        DHPStrategy(**options)
