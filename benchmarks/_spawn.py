"""Spawn a gloo world of CPU processes for a benchmark and collect each rank's return value.

Benchmarks must not import from ``tests/``; this is their copy of the harness: one thread per rank,
a file store in a temporary folder, a hard timeout that kills every rank, and every failing rank's
traceback in the raised error. ``fn`` must be importable from a module (a script's top-level
function works: spawn re-imports the script).
"""

from __future__ import annotations

import os
import pickle
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


def _rank_main(rank: int, world_size: int, folder: str, timeout_s: float, fn: Callable[..., Any], args: tuple) -> None:
    torch.set_num_threads(1)
    os.environ["TORCH_DEVICE_BACKEND_AUTOLOAD"] = "0"
    dist.init_process_group(
        "gloo",
        init_method=f"file://{os.path.join(folder, 'store')}",
        rank=rank,
        world_size=world_size,
        timeout=timedelta(seconds=timeout_s),
    )
    try:
        result = fn(rank, world_size, *args)
        with open(os.path.join(folder, f"result_{rank}.pkl"), "wb") as handle:
            pickle.dump(result, handle)
    except BaseException:
        with open(os.path.join(folder, f"error_{rank}.txt"), "w") as handle:
            handle.write(traceback.format_exc())
        raise
    finally:
        dist.destroy_process_group()


def run_world(fn: Callable[..., Any], world_size: int, *args: Any, timeout_s: float = 600.0) -> list[Any]:
    """``fn(rank, world_size, *args)`` on ``world_size`` spawned gloo ranks; the results by rank.

    Raises ``RuntimeError`` with the failing ranks' tracebacks, or ``TimeoutError`` (after killing
    every rank) when the world does not finish within ``timeout_s``.
    """
    with tempfile.TemporaryDirectory() as folder:
        context = mp.start_processes(
            _rank_main,
            args=(world_size, folder, timeout_s, fn, args),
            nprocs=world_size,
            join=False,
            start_method="spawn",
        )
        deadline = time.monotonic() + timeout_s
        try:
            while not context.join(timeout=0.5):
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{world_size} ranks did not finish within {timeout_s:.0f} s")
        except mp.ProcessRaisedException as error:
            errors = [
                Path(folder, name).read_text() for name in sorted(os.listdir(folder)) if name.startswith("error_")
            ]
            raise RuntimeError("\n".join(errors) or str(error)) from None
        finally:
            for process in context.processes:
                if process.is_alive():
                    process.kill()
        results = []
        for rank in range(world_size):
            with open(os.path.join(folder, f"result_{rank}.pkl"), "rb") as handle:
                results.append(pickle.load(handle))
        return results
