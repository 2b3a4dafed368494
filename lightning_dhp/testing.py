"""Run a function on N gloo CPU ranks in spawned processes, for tests and benchmarks.

A file store in a temporary folder (no ports to collide), one thread per rank, a hard timeout that
kills every rank (a hang fails instead of blocking), and every failing rank's traceback in the error.
:func:`launch_environment` is the environment for a subprocess that launches its own ranks, and
:func:`run_job` runs such a subprocess with a bound on its time.
"""

from __future__ import annotations

import os
import signal
import subprocess
import tempfile
import time
import traceback
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

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


def _worker(
    rank: int,
    world_size: int,
    store_path: str,
    out_dir: str,
    collective_timeout_s: float,
    fn: Callable[..., Any],
    args: tuple,
) -> None:
    torch.set_num_threads(1)
    os.environ["TORCH_DEVICE_BACKEND_AUTOLOAD"] = "0"
    dist.init_process_group(
        "gloo",
        init_method=f"file://{store_path}",
        rank=rank,
        world_size=world_size,
        timeout=timedelta(seconds=collective_timeout_s),
    )
    try:
        result = fn(rank, world_size, *args)
        torch.save(result, os.path.join(out_dir, f"result_{rank}.pt"))
    except BaseException:
        with open(os.path.join(out_dir, f"error_{rank}.txt"), "w") as f:
            f.write(traceback.format_exc())
        raise
    finally:
        dist.destroy_process_group()


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
    (default ``timeout_s``) is the process group's timeout for one collective.
    """
    with tempfile.TemporaryDirectory() as out_dir:
        store_path = os.path.join(out_dir, "store")
        context = mp.start_processes(
            _worker,
            args=(world_size, store_path, out_dir, collective_timeout_s or timeout_s, fn, args),
            nprocs=world_size,
            join=False,
            start_method="spawn",
        )
        deadline = time.monotonic() + timeout_s
        try:
            while any(process.is_alive() for process in context.processes):
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{world_size} ranks did not finish within {timeout_s:.0f} s")
                if not allow_dead_ranks and any(process.exitcode for process in context.processes):
                    break
                time.sleep(0.2)
        finally:
            for process in context.processes:
                if process.is_alive():
                    process.kill()
        errors = [Path(out_dir, name).read_text() for name in sorted(os.listdir(out_dir)) if name.startswith("error_")]
        dead = [rank for rank, process in enumerate(context.processes) if process.exitcode]
        if errors or (dead and not allow_dead_ranks):
            raise RuntimeError(
                "\n".join(errors)
                or f"ranks {dead} exited with exit codes {[context.processes[rank].exitcode for rank in dead]}"
            )
        results = [Path(out_dir, f"result_{rank}.pt") for rank in range(world_size)]
        return [torch.load(path, weights_only=False) if path.exists() else None for path in results]
