"""Run a function on N gloo CPU ranks in spawned processes, for tests and benchmarks.

A file store in a temporary folder (no ports to collide), one thread per rank, a hard timeout that
kills every rank (a hang fails instead of blocking), and every failing rank's traceback in the error.
Inside :func:`kept_worlds` (the test suite's session) the rank processes outlive each world, so torch and
Lightning are imported once per rank rather than once per rank of every world.
:func:`launch_environment` is the environment for a subprocess that launches its own ranks, and
:func:`run_job` runs such a subprocess with a bound on its time.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from collections.abc import Callable, Iterator
from datetime import timedelta
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any, NamedTuple

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

# what a launcher (torchrun, or Lightning's own launcher, even for one device) sets in its process
LAUNCH_VARIABLES = ("LOCAL_RANK", "RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "NODE_RANK")


def launch_environment(**extra: str) -> dict[str, str]:
    """This process's environment without :data:`LAUNCH_VARIABLES`, plus ``extra``: for a script run as a
    subprocess that launches its own ranks. An inherited ``LOCAL_RANK`` makes Lightning take the script for
    one rank of an external launch, and rank 0 waits for peers that never start."""
    return {**{key: value for key, value in os.environ.items() if key not in LAUNCH_VARIABLES}, **extra}


def run_job(command: list[str], timeout_s: float, *, cwd: str | os.PathLike[str] | None = None,
            env: dict[str, str] | None = None, stack_signal: int | None = None) -> tuple[int | None, str]:
    """Run ``command`` (a job that may launch its own ranks) in a session of its own, in
    :func:`launch_environment` plus ``env``; return its exit code, or ``None`` when it did not finish within
    ``timeout_s`` and was killed with every process it started, and its standard error. ``stack_signal`` is
    sent to the session 2 s before the kill, for processes that dump their stacks on it."""
    with subprocess.Popen(command, cwd=cwd, env=launch_environment(**(env or {})), stdout=subprocess.DEVNULL,
                          stderr=subprocess.PIPE, text=True, start_new_session=True) as job:
        try:
            _, stderr = job.communicate(timeout=timeout_s)
            return job.returncode, stderr
        except subprocess.TimeoutExpired:
            if stack_signal is not None:
                os.killpg(job.pid, stack_signal)
                time.sleep(2)
            os.killpg(job.pid, signal.SIGKILL)
            return None, job.communicate()[1]


class _Task(NamedTuple):
    """One call of ``fn(rank, world_size, *args)`` on every rank of a fresh gloo world."""

    world_size: int
    store_path: str
    out_dir: str
    collective_timeout_s: float
    fn: Callable[..., Any]
    args: tuple


_SETUP_FAILED = "the rank's gloo group could not be set up:\n"


# rank processes skip loading out-of-tree device backends (torch-npu and the like): the worlds here are gloo on CPU
_RANK_ENVIRONMENT = {"TORCH_DEVICE_BACKEND_AUTOLOAD": "0"}


def _prepare_rank_process() -> None:
    torch.set_num_threads(1)
    os.environ.update(_RANK_ENVIRONMENT)


def _run_rank(rank: int, task: _Task) -> bool:
    """Run ``task`` as ``rank`` of a gloo world set up for it; leave its result or traceback in ``task.out_dir``.
    Returns whether ``fn`` returned."""
    try:
        dist.init_process_group("gloo", init_method=f"file://{task.store_path}", rank=rank,
                                world_size=task.world_size, timeout=timedelta(seconds=task.collective_timeout_s))
    except Exception:
        Path(task.out_dir, f"error_{rank}.txt").write_text(_SETUP_FAILED + traceback.format_exc())
        return False
    try:
        result = task.fn(rank, task.world_size, *task.args)
        torch.save(result, os.path.join(task.out_dir, f"result_{rank}.pt"))
        return True
    except BaseException:
        Path(task.out_dir, f"error_{rank}.txt").write_text(traceback.format_exc())
        return False
    finally:
        dist.destroy_process_group()


def _one_task_rank(rank: int, task: _Task) -> None:
    _prepare_rank_process()
    if not _run_rank(rank, task):
        sys.exit(1)


def _kept_rank(rank: int, tasks: Connection) -> None:
    """A rank kept between calls: runs each task it receives in the caller's environment and working folder, then
    restores its own, and answers whether ``fn`` returned; ends on ``None``."""
    _prepare_rank_process()
    own_environment, own_folder = dict(os.environ), os.getcwd()
    while (received := _next_task(tasks)) is not None:
        task, environment, folder = received
        default_dtype = torch.get_default_dtype()
        os.environ.clear()
        os.environ.update({**environment, **_RANK_ENVIRONMENT})
        os.chdir(folder)
        try:
            with warnings.catch_warnings():
                returned = _run_rank(rank, task)
        finally:
            os.environ.clear()
            os.environ.update(own_environment)
            os.chdir(own_folder)
            torch.set_default_dtype(default_dtype)
            if "torch._dynamo" in sys.modules:
                torch._dynamo.reset()
        tasks.send(returned)


def _next_task(tasks: Connection) -> tuple[_Task, dict[str, str], str] | None:
    try:
        return tasks.recv()
    except EOFError:  # the caller is gone
        return None


class _Rank:
    """One rank's process: started for one task, or kept (see :func:`kept_worlds`)."""

    def __init__(self, process: mp.Process, tasks: Connection | None = None) -> None:
        self.process, self.tasks, self.returned = process, tasks, None

    def finished(self) -> bool:
        if self.tasks is None:
            return not self.process.is_alive()
        if self.returned is None and self.tasks.poll():
            try:
                self.returned = self.tasks.recv()
            except EOFError:  # it died without answering
                self.returned = False
        return self.returned is not None or not self.process.is_alive()

    def failed(self) -> bool:
        if self.tasks is None:
            return bool(self.process.exitcode)
        return self.returned is False or (self.returned is None and not self.process.is_alive())


class _KeptRanks:
    """Rank processes kept between :func:`run_distributed` calls: rank ``r`` of every world is process ``r``, so a
    test session imports torch and Lightning once per rank instead of once per rank of every world."""

    def __init__(self) -> None:
        self.ranks: list[_Rank] = []

    def start(self, task: _Task) -> list[_Rank]:
        if not all(rank.process.is_alive() for rank in self.ranks):
            self.stop()
        context = mp.get_context("spawn")
        while len(self.ranks) < task.world_size:
            ours, theirs = context.Pipe()
            process = context.Process(target=_kept_rank, args=(len(self.ranks), theirs))  # ranks start loader workers
            process.start()
            self.ranks.append(_Rank(process, ours))
        ranks = self.ranks[:task.world_size]
        for rank in ranks:
            rank.returned = None
            rank.tasks.send((task, dict(os.environ), os.getcwd()))
        return ranks

    def stop(self) -> None:
        for rank in self.ranks:
            if rank.process.is_alive():
                rank.process.kill()
            rank.process.join()
        self.ranks = []


_kept: _KeptRanks | None = None


@contextlib.contextmanager
def kept_worlds() -> Iterator[None]:
    """Within it, :func:`run_distributed` keeps its rank processes for the next call (a test session: spawning and
    importing torch and Lightning was most of a small world's time). Each call still gets a fresh process group,
    the caller's environment variables and working folder, and its ranks' default dtype, warning filters and
    ``torch.compile`` caches restored after; a call that fails, times out or lets ranks die discards the kept
    processes (the next call starts new ones)."""
    global _kept
    _kept = _KeptRanks()
    try:
        yield
    finally:
        _kept.stop()
        _kept = None


def _spawned(task: _Task) -> list[_Rank]:
    context = mp.start_processes(_one_task_rank, args=(task,), nprocs=task.world_size, join=False,
                                 start_method="spawn")
    return [_Rank(process) for process in context.processes]


def run_distributed(
    fn: Callable[..., Any],
    world_size: int,
    *args: Any,
    timeout_s: float = 300.0,
    allow_dead_ranks: bool = False,
    collective_timeout_s: float | None = None,
) -> list[Any]:
    """Call ``fn(rank, world_size, *args)`` on ``world_size`` gloo ranks; return the results by rank.

    ``fn`` must be importable (module level). Raises ``RuntimeError`` with every failing rank's
    traceback, or ``TimeoutError`` (after killing all ranks) when the ranks do not finish in time.
    With ``allow_dead_ranks`` the survivors run to their end and a rank that died without a result
    reports ``None``: for tests of what the others do when a rank dies. ``collective_timeout_s``
    (default ``timeout_s``) is the process group's timeout for one collective. Inside
    :func:`kept_worlds` the rank processes are reused (not with ``allow_dead_ranks``). A world whose
    gloo group fails to connect (before ``fn`` runs: seen once, under heavy load) is started again once.
    """
    world = (fn, world_size, args, timeout_s, allow_dead_ranks, collective_timeout_s or timeout_s)
    try:
        return _results(*world)
    except _GroupNotConnected:
        return _results(*world)


class _GroupNotConnected(RuntimeError):
    """Every failing rank failed to set up its gloo group: nothing of ``fn`` ran."""


def _results(fn: Callable[..., Any], world_size: int, args: tuple, timeout_s: float, allow_dead_ranks: bool,
             collective_timeout_s: float) -> list[Any]:
    with tempfile.TemporaryDirectory() as out_dir:
        task = _Task(world_size, os.path.join(out_dir, "store"), out_dir, collective_timeout_s, fn, args)
        dead, errors = _run_world(task, timeout_s, allow_dead_ranks)
        if errors and all(error.startswith(_SETUP_FAILED) for error in errors):
            raise _GroupNotConnected("\n".join(errors))
        if errors or (dead and not allow_dead_ranks):
            raise RuntimeError("\n".join(errors) or f"ranks {list(dead)} exited with exit codes {list(dead.values())}")
        results = [Path(out_dir, f"result_{rank}.pt") for rank in range(world_size)]
        return [torch.load(path, weights_only=False) if path.exists() else None for path in results]


def _run_world(task: _Task, timeout_s: float, allow_dead_ranks: bool) -> tuple[dict[int, int | None], list[str]]:
    """Run ``task`` on kept or new ranks; return the failed ranks (with their exit codes) and their errors."""
    kept = _kept if _kept is not None and not allow_dead_ranks else None
    ranks = kept.start(task) if kept is not None else _spawned(task)
    deadline = time.monotonic() + timeout_s
    finished = False
    try:
        while not all(rank.finished() for rank in ranks):
            if time.monotonic() > deadline:
                raise TimeoutError(f"{task.world_size} ranks did not finish within {timeout_s:.0f} s")
            if not allow_dead_ranks and any(rank.failed() for rank in ranks):
                break
            time.sleep(0.02)
        finished = not any(rank.failed() for rank in ranks)
    finally:
        if kept is not None and not finished:
            kept.stop()
        for rank in ranks:
            if rank.process.is_alive() and kept is None:
                rank.process.kill()
    names = sorted(name for name in os.listdir(task.out_dir) if name.startswith("error_"))
    dead = {index: rank.process.exitcode for index, rank in enumerate(ranks) if rank.failed()}
    return dead, [Path(task.out_dir, name).read_text() for name in names]
