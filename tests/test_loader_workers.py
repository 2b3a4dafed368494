"""DataLoader workers under DHP: how they start, and what every rank sees when one stalls or dies."""

from __future__ import annotations

import multiprocessing
import os
import re
import time
from multiprocessing.reduction import ForkingPickler
from pathlib import Path

import pytest
import torch

from lightning_dhp import DHPStrategy
from lightning_dhp.errors import DHPConfigError
from lightning_dhp.lightning import DHPBatchSampler, DHPDataLoader, DHPDataModule, DHPPacking
from lightning_dhp.lightning.planned_loader import PlanConfig
from lightning_dhp.lightning.transfer import send_in_one_buffer
from lightning_dhp.lightning.workers import POLL_S, WatchedIterator, stack_path
from lightning_dhp.testing import run_distributed
from tests.helpers import (
    BATCHES,
    GLOBAL_BATCH,
    LENGTHS,
    as_torchrun_rank,
    cpu_trainer,
    error_of,
    same_error_on_every_rank,
)
from tests.tiny_lm import LMTask, TokenDataset

WAIT_S = 10.0  # data_wait_timeout of the stalling runs: well above a worker's start from a running forkserver
FAILING_RANK = 1
# each world runs one failure of each kind; between them, both sharding modes on 2 and 3 processes
SCENARIOS = {2: (("dies", "replicate"), ("hangs", "fsdp")), 3: (("dies", "fsdp"), ("hangs", "replicate"))}


class Misbehaving(TokenDataset):
    """On FAILING_RANK, the loader worker stalls (``how="hangs"``) or dies with exit code 3 (``"dies"``, after
    2 s, so its rank is already waiting for the batch) when it loads a sample of the second global batch."""

    def __init__(self, rank: int, how: str) -> None:
        super().__init__(LENGTHS)
        self.rank, self.how = rank, how

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        if self.rank == FAILING_RANK and index in BATCHES[1]:
            _stalls_or_dies_here(self.how)
        return super().__getitem__(index)


def _stalls_or_dies_here(how: str) -> None:
    if how == "hangs":
        time.sleep(3600)
    time.sleep(2)
    os._exit(3)


def _misbehaving_fits(rank: int, world_size: int) -> dict:
    as_torchrun_rank(rank)
    reports = {}
    for how, sharding in SCENARIOS[world_size]:
        data = DHPDataModule(Misbehaving(rank, how), LENGTHS, GLOBAL_BATCH, seed=0, num_workers=1)
        strategy = DHPStrategy(20, sharding=sharding, data_wait_timeout=WAIT_S)
        started = time.monotonic()
        reports[how] = error_of(lambda: cpu_trainer(world_size, strategy).fit(LMTask(), datamodule=data))  # noqa: B023
        reports[f"{how}_elapsed_s"] = time.monotonic() - started
    return reports


@pytest.fixture(scope="module", params=sorted(SCENARIOS), ids=[f"{size}-process" for size in sorted(SCENARIOS)])
def misbehaving(request) -> list[dict]:
    return run_distributed(_misbehaving_fits, request.param, timeout_s=300)


def test_a_stalled_loader_worker_stops_every_rank_with_its_stack_within_the_wait_bound(misbehaving):
    kind, message = same_error_on_every_rank(misbehaving, "hangs")
    assert kind == "DHPLoaderError", message
    assert f"rank {FAILING_RANK} waited" in message and "global batch 1 (epoch 0)" in message, message
    assert "DataLoader worker 0" in message and "still running" in message, message
    assert "_stalls_or_dies_here" in message and "__getitem__" in message, message  # its Python stack
    for report in misbehaving:  # setup, the first step and the wait: far below a collective timeout
        assert report["hangs_elapsed_s"] < WAIT_S + 60, report


def test_a_dead_loader_worker_stops_every_rank_naming_it(misbehaving):
    kind, message = same_error_on_every_rank(misbehaving, "dies")
    assert kind == "DHPLoaderError", message
    assert f"rank {FAILING_RANK}'s DataLoader worker 0" in message and "exited with code 3" in message, message
    # the worker dies loading the second batch; a rank slow to start (two busy pytest workers) can still be waiting
    # for the first when it notices, and names the batch it waited for
    assert re.search(r"while loading global batch [01] \(epoch 0\)", message), message


# -- without processes -------------------------------------------------------------------------------


def _loader(num_workers: int = 1, packing: DHPPacking | None = None, **kwargs) -> DHPDataLoader:
    return DHPDataLoader(TokenDataset(LENGTHS), DHPBatchSampler(LENGTHS, GLOBAL_BATCH), PlanConfig(1, 0, 64),
                         packing or DHPPacking(), {}, num_workers=num_workers, **kwargs)


def _tensors(value) -> list[torch.Tensor]:
    """The tensors of a nest of dicts, lists and tuples, in order."""
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, dict):
        value = list(value.values())
    if isinstance(value, list | tuple):
        return [tensor for item in value for tensor in _tensors(item)]
    return []


def _assert_same_tensors(actual: list[torch.Tensor], expected: list[torch.Tensor]) -> None:
    assert len(actual) == len(expected)
    for got, want in zip(actual, expected, strict=True):
        assert (type(got), got.dtype, got.shape, got.requires_grad) == (type(want), want.dtype, want.shape,
                                                                          want.requires_grad)
        assert torch.equal(got.detach(), want.detach())


def test_a_steps_tensors_cross_from_its_worker_in_one_shared_buffer_unchanged():
    """Each tensor of a step in a buffer of its own cost a round trip to the worker per tensor (the main job's
    batch wait); the worker's steps equal the same steps loaded without workers."""
    with_workers, in_process = list(_loader()), list(_loader(num_workers=0))
    assert len(with_workers) == len(in_process) > 1
    for step, expected in zip(with_workers, in_process, strict=True):
        assert step.plan.digest() == expected.plan.digest()
        tensors = _tensors(step.rounds)
        _assert_same_tensors(tensors, _tensors(expected.rounds))
        assert len({tensor.untyped_storage().data_ptr() for tensor in tensors}) == 1
        assert [r["dhp"] for r in step.rounds] == [r["dhp"] for r in expected.rounds]


class _Holder:
    def __init__(self, contents) -> None:
        self.contents = contents


def test_one_buffer_transfer_keeps_every_kind_of_tensor():
    send_in_one_buffer(_Holder)
    grid = torch.arange(12.0, dtype=torch.float64).reshape(3, 4)
    contents = {"mask": torch.tensor([True, False, True]), "transposed": grid.t(), "scalar": torch.tensor(5),
                "empty": torch.zeros(0, 7), "half": torch.linspace(-1, 1, 5, dtype=torch.bfloat16),
                "strided": torch.arange(9, dtype=torch.int16)[::2], "trainable": torch.ones(2, requires_grad=True),
                "parameter": torch.nn.Parameter(torch.ones(2)), "nested": [grid, (torch.tensor([7]),)], "text": "a"}
    received = ForkingPickler.loads(ForkingPickler.dumps(_Holder(contents))).contents
    assert received.keys() == contents.keys() and received["text"] == "a"
    _assert_same_tensors(_tensors(received), _tensors(contents))
    plain = [tensor for tensor in _tensors(received) if type(tensor) is torch.Tensor]
    assert len({tensor.untyped_storage().data_ptr() for tensor in plain}) == 1  # the parameter pickles as usual
    assert received["trainable"].is_leaf
    assert ForkingPickler.loads(ForkingPickler.dumps(_Holder({"no": "tensors"}))).contents == {"no": "tensors"}
    with pytest.raises(RuntimeError, match=r"shape \(2,\) computed with autograd .*\(tensor\.detach\(\)\)"):
        ForkingPickler.dumps(_Holder({"graph": torch.ones(2, requires_grad=True) * 2}))


def test_workers_start_from_a_forkserver_unless_the_dataloader_names_a_start_method():
    loader = _loader(data_wait_timeout=30.0)
    assert loader.multiprocessing_context.get_start_method() == "forkserver"
    assert loader.persistent_workers and loader.timeout == POLL_S
    assert _loader(multiprocessing_context="spawn").multiprocessing_context.get_start_method() == "spawn"
    assert _loader(num_workers=0).multiprocessing_context is None


@pytest.mark.filterwarnings("ignore:Got pickle error")  # torch's own note on the same failure
def test_an_unpicklable_item_transform_is_a_clear_error_when_the_workers_start():
    loader = _loader(packing=DHPPacking(item_transform=lambda item: item))
    with pytest.raises(DHPConfigError, match=r"'forkserver'.*cannot be pickled.*module level"):
        iter(loader)


def test_a_training_script_run_again_by_a_starting_worker_is_refused():
    process = multiprocessing.current_process()
    process._inheriting = True  # what multiprocessing sets while a new process imports its parent's script
    try:
        with pytest.raises(DHPConfigError, match=r'if __name__ == "__main__"'):
            DHPStrategy()
    finally:
        del process._inheriting


class _Worker:
    def __init__(self, exitcode: int | None) -> None:
        self.pid, self.exitcode = 4242, exitcode


class _TorchIterator:
    """Raises torch's own timeout ``timeouts`` times, then returns "batch" (or raises ``final``)."""

    def __init__(self, worker: _Worker, timeouts: int, final: str | None = None) -> None:
        self._task_info, self._rcvd_idx, self._workers = {0: (0,)}, 0, [worker]
        self.timeouts, self.final = timeouts, final

    def __next__(self):
        if self.timeouts:
            self.timeouts -= 1
            raise RuntimeError(f"DataLoader timed out after {POLL_S} seconds")
        if self.final:
            raise RuntimeError(self.final)
        return "batch"


def _watched(iterator: _TorchIterator, stack_dir: Path, wait_s: float | None) -> WatchedIterator:
    return WatchedIterator(iterator, rank=2, wait_s=wait_s, stack_dir=str(stack_dir), request_of=lambda _: None,
                           on_failure=lambda request, message: message)


def test_the_watchdog_keeps_waiting_within_its_bound_and_names_what_the_worker_was_doing(tmp_path):
    assert next(_watched(_TorchIterator(_Worker(None), timeouts=3), tmp_path, wait_s=None)) == "batch"
    assert next(_watched(_TorchIterator(_Worker(None), timeouts=3), tmp_path, wait_s=60)) == "batch"
    never_started = next(_watched(_TorchIterator(_Worker(None), timeouts=10**6), tmp_path, wait_s=0.01))
    assert "rank 2 waited" in never_started and "never started running Python" in never_started
    died = "DataLoader worker (pid(s) 4242) exited unexpectedly"
    died_starting = next(_watched(_TorchIterator(_Worker(1), timeouts=0, final=died), tmp_path, wait_s=60))
    assert "exited with code 1 while starting" in died_starting and 'if __name__ == "__main__"' in died_starting
    stack_path(str(tmp_path), 0).write_text("")  # the worker ran DHP's worker_init_fn
    killed = next(_watched(_TorchIterator(_Worker(-9), timeouts=0, final=died), tmp_path, wait_s=60))
    assert "rank 2's DataLoader worker 0 (pid 4242) was killed by SIGKILL while loading" in killed
    with pytest.raises(RuntimeError, match="another error"):
        next(_watched(_TorchIterator(_Worker(None), timeouts=0, final="another error"), tmp_path, wait_s=60))
