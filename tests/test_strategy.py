"""DHPStrategy end to end on gloo ranks: exact gradients, rounds, idle ranks, errors on every rank.

The ranks are started by ``run_distributed`` with LOCAL_RANK set, so Lightning sees an externally
launched job (like torchrun) and every rank's result comes back to the test.
"""

from __future__ import annotations

import os

import pytest
import torch
from lightning.pytorch import Trainer

from lightning_dhp import DHPStrategy
from lightning_dhp.lightning import DHPBatchSampler, DHPDataModule
from tests.distributed import run_distributed
from tests.tiny_lm import LMTask, TokenDataset, reference_training

LENGTHS = [37, 5, 9, 2, 16, 23, 4, 11, 30, 6, 3, 14, 1, 19, 8, 27, 12, 7]
GLOBAL_BATCH = 6
STEPS = 3


def _trainer(world_size: int, strategy: DHPStrategy, steps: int = STEPS, **kwargs) -> Trainer:
    return Trainer(accelerator="cpu", devices=world_size, strategy=strategy, max_steps=steps, logger=False,
                   enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                   num_sanity_val_steps=0, limit_val_batches=0, **kwargs)


def _as_torchrun_rank(rank: int) -> None:
    os.environ.update(LOCAL_RANK=str(rank), NODE_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT="1")


def _fit(rank: int, world_size: int, tokens_per_device: int, strategy_kwargs: dict) -> dict:
    _as_torchrun_rank(rank)
    task = LMTask()
    data = DHPDataModule(TokenDataset(LENGTHS), LENGTHS, GLOBAL_BATCH, seed=0)
    strategy = DHPStrategy(tokens_per_device, **strategy_kwargs)
    trainer = _trainer(world_size, strategy)
    trainer.fit(task, datamodule=data)
    plans = [entry["plan"] for entry in strategy.plan_history]
    return {"params": {k: v.detach().clone() for k, v in task.model.state_dict().items()},
            "rounds": [len(plan.rounds) for plan in plans],
            "idle": [plan.stats()["idle_device_rounds"] for plan in plans],
            "degrees": sorted({group.degree for plan in plans for r in plan.rounds for group in r.groups}),
            "pool": (strategy.pool.stats.hits, strategy.pool.stats.misses)}


@pytest.fixture(scope="module")
def reference() -> dict:
    batches = DHPBatchSampler(LENGTHS, GLOBAL_BATCH, seed=0).batches()
    return reference_training(LENGTHS, batches, STEPS)


def _assert_params_close(params: dict, expected: dict) -> None:
    for name, value in expected.items():
        torch.testing.assert_close(params[name], value, rtol=1e-9, atol=1e-12, msg=f"parameter {name}")


@pytest.mark.parametrize(("world_size", "tokens_per_device"), [(1, 64), (2, 20), (3, 20), (4, 20)])
def test_dhp_training_equals_single_device_training(world_size, tokens_per_device, reference):
    results = run_distributed(_fit, world_size, tokens_per_device, {}, timeout_s=180)
    for result in results:  # every rank ends with the same parameters, equal to the oracle
        _assert_params_close(result["params"], reference)
    if world_size == 2:
        assert max(results[0]["rounds"]) > 1, "the test data should need several rounds on 2 ranks"
    if world_size > 1:
        assert max(results[0]["degrees"]) > 1, "the test data should use context parallelism"


def test_group_free_ring_and_allgather_match_too(reference):
    for kwargs in ({"group_free_ring": True}, {"cp_implementation": "allgather"}):
        results = run_distributed(_fit, 3, 20, kwargs, timeout_s=180)
        _assert_params_close(results[0]["params"], reference)
