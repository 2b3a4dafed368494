"""Reliability: every sample exactly once, exact resume, dead ranks do not hang the others."""

from __future__ import annotations

import os
import time
from collections import Counter

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from lightning.pytorch.callbacks import ModelCheckpoint

from lightning_dhp import DHPStrategy
from lightning_dhp.lightning import DHPBatchSampler, DHPDataLoader, DHPPacking
from lightning_dhp.lightning.planned_loader import PlanConfig, StepRequest
from lightning_dhp.testing import run_distributed
from tests.helpers import as_torchrun_rank, assert_parameters_match, cpu_trainer, plan_report, token_data
from tests.tiny_lm import LMTask


class Zeros(torch.utils.data.Dataset):
    def __init__(self, lengths: list[int]) -> None:
        self.lengths = lengths

    def __len__(self) -> int:
        return len(self.lengths)

    def __getitem__(self, index: int) -> dict:
        return {"input_ids": torch.zeros(self.lengths[index], dtype=torch.long)}


def _loaders(lengths: list[int], batch: int, world: int, tokens_per_device: int, trained: dict) -> list:
    return [DHPDataLoader(Zeros(lengths), DHPBatchSampler(lengths, batch, seed=3), PlanConfig(world, rank,
                          tokens_per_device), DHPPacking(), trained) for rank in range(world)]


@settings(max_examples=25, deadline=None)
@given(lengths=st.lists(st.integers(1, 64), min_size=1, max_size=40), batch=st.integers(1, 12),
       world=st.integers(1, 6), resume_world=st.integers(1, 6), stop=st.integers(0, 8))
def test_every_sample_is_trained_exactly_once_per_epoch_across_a_resume(lengths, batch, world, resume_world, stop):
    """Ranks' groups cover every sample of the epoch exactly once, also when the run stops after
    ``stop`` steps (with one batch prefetched and lost) and resumes on another number of devices."""
    tokens_per_device = 64
    trained: dict = {}
    seen: Counter = Counter()

    def train(step_per_rank: list) -> None:
        for step in step_per_rank:
            for batch_of_round in step.rounds:
                if batch_of_round["dhp"].layout.rank == 0:  # count each group once, at its first rank
                    seen.update(batch_of_round["dhp"].sample_indices)
        trained[step_per_rank[0].request.loader_id] = step_per_rank[0].request

    loaders = _loaders(lengths, batch, world, tokens_per_device, trained)
    iterators = [iter(loader) for loader in loaders]
    steps = len(loaders[0])
    for _ in range(min(stop, steps)):
        train([next(iterator) for iterator in iterators])
    if stop < steps:
        [next(iterator) for iterator in iterators]  # prefetched by Lightning, never trained
    state = loaders[0].state_dict()

    resumed = _loaders(lengths, batch, resume_world, tokens_per_device, trained)
    for loader in resumed:
        loader.load_state_dict(state)
    for step_per_rank in zip(*resumed, strict=True):
        train(list(step_per_rank))
    assert seen == Counter(range(len(lengths)))


class ZerosWithBadItems(Zeros):
    def __init__(self, lengths: list[int], bad: set[int]) -> None:
        super().__init__(lengths)
        self.bad = bad

    def __getitem__(self, index: int) -> dict:
        return {"tokens": index} if index in self.bad else super().__getitem__(index)


@settings(max_examples=20, deadline=None)
@given(lengths=st.lists(st.integers(1, 64), min_size=2, max_size=30), world=st.integers(1, 6), data=st.data())
def test_skipped_samples_are_counted_once_over_all_ranks(lengths, world, data):
    """Each skipped sample is counted by exactly one rank (its group's first), whatever the groups."""
    bad = set(data.draw(st.lists(st.integers(0, len(lengths) - 1), unique=True)))
    dataset = ZerosWithBadItems(lengths, bad)
    steps = [DHPDataLoader(dataset, DHPBatchSampler(lengths, len(lengths), seed=1),
                           PlanConfig(world, rank, 64, skip_bad_samples=True), DHPPacking(), {}).dataset[
                 StepRequest("x", 0, 0, tuple(range(len(lengths))))] for rank in range(world)]
    assert sum(step.leader_skipped for step in steps) == len(bad)
    assert all(step.error is None for step in steps)


def _fit_with_checkpoints(rank: int, world_size: int, directory: str, steps: int,
                          resume_from: str | None = None) -> dict:
    """Fit for ``steps`` steps (resuming from the checkpoint ``resume_from``), writing a checkpoint after every
    step to ``directory``."""
    as_torchrun_rank(rank)
    task = LMTask()
    strategy = DHPStrategy(20)
    checkpoints = ModelCheckpoint(dirpath=directory, every_n_train_steps=1, save_top_k=-1, filename="{step}")
    report = plan_report()
    trainer = cpu_trainer(world_size, strategy, steps=steps, enable_checkpointing=True,
                          callbacks=[checkpoints, report], limit_val_batches=0)
    trainer.fit(task, datamodule=token_data(), ckpt_path=resume_from)
    return {"params": {k: v.detach().clone() for k, v in task.model.state_dict().items()},
            "batches": [entry["plan"].lengths for entry in report.history]}


def _stop_and_resume(rank: int, world_size: int, directory: str) -> dict:
    """In one world: an uninterrupted 5-step run, a run stopped after step 2, and that run resumed."""
    uninterrupted = _fit_with_checkpoints(rank, world_size, f"{directory}/uninterrupted", 5)
    _fit_with_checkpoints(rank, world_size, f"{directory}/stopped", 2)
    resumed = _fit_with_checkpoints(rank, world_size, f"{directory}/resumed", 5, f"{directory}/stopped/step=2.ckpt")
    return {"uninterrupted": uninterrupted, "resumed": resumed}


@pytest.fixture(scope="module")
def two_process_runs(tmp_path_factory) -> tuple[dict, str]:
    """Rank 0's runs of :func:`_stop_and_resume` on 2 processes, and the folder of their checkpoints."""
    directory = str(tmp_path_factory.mktemp("checkpoints"))
    return run_distributed(_stop_and_resume, 2, directory, timeout_s=240)[0], directory


@pytest.mark.parametrize("resume_world", [2, 3], ids=["same-world", "other-world"])
def test_stop_and_resume_equals_the_uninterrupted_run(two_process_runs, resume_world, tmp_path):
    """Resumed in the world that stopped, and in a new world of 3 processes (a fresh start, as after a failure)."""
    runs, directory = two_process_runs
    resumed = runs["resumed"] if resume_world == 2 else run_distributed(
        _fit_with_checkpoints, resume_world, str(tmp_path), 5, f"{directory}/stopped/step=2.ckpt", timeout_s=240)[0]
    assert_parameters_match(resumed["params"], runs["uninterrupted"]["params"])
    # the strategy records a step when the next one starts: compare the batches both runs recorded
    assert resumed["batches"] == runs["uninterrupted"]["batches"][2:len(resumed["batches"]) + 2]


COLLECTIVE_TIMEOUT_S = 10
STALL_S = 2 * COLLECTIVE_TIMEOUT_S  # only the collective timeout can stop the others before the stalled rank wakes


class FailsAtStepTwo(LMTask):
    """Rank 1 dies (``how="dies"``) or stops answering for STALL_S seconds at the third step."""

    how = "dies"

    def on_train_batch_start(self, batch, batch_idx: int) -> None:
        if batch_idx == 2 and self.global_rank == 1:
            if self.how == "dies":
                os._exit(1)
            time.sleep(STALL_S)
            self.woke_at = time.time()


def _fit_until_a_rank_fails(rank: int, world_size: int, how: str) -> tuple[float, str]:
    """(when this rank stopped, or the stalled rank woke up; how its fit ended)."""
    as_torchrun_rank(rank)
    task = FailsAtStepTwo()
    task.how = how
    try:
        cpu_trainer(world_size, DHPStrategy(20)).fit(task, datamodule=token_data())
        outcome = "finished"
    except Exception as error:
        outcome = f"{type(error).__name__}: {error}"
    return getattr(task, "woke_at", time.time()), outcome


@pytest.mark.parametrize("how", ["dies", "stalls"])
def test_a_dead_or_stalled_rank_stops_the_others_with_a_clear_message(how):
    # a survivor still waiting when the harness times out would fail the test with TimeoutError
    results = run_distributed(_fit_until_a_rank_fails, 3, how, timeout_s=240, allow_dead_ranks=True,
                              collective_timeout_s=COLLECTIVE_TIMEOUT_S)
    if how == "dies":
        assert results[1] is None
    for stopped_at, message in (results[0], results[2]):
        assert "a peer rank died or stalled" in message and "global batch 2" in message, message
        if how == "stalls":  # stopped by the collective timeout, before the stalled rank woke up
            assert stopped_at < results[1][0], (stopped_at, results[1][0])
