"""The DataLoader workers of DHP loaders: how they start, and a bound on every wait for their batches.

**Start.** Workers start from a forkserver, not by forking the training process. By the time a loader
starts its workers, the training process runs process-group threads (gloo's, NCCL's) and loader threads
(queue feeders, pin-memory), and a child forked while one of them holds a lock can deadlock before it runs
any Python: a rank then waits for its first batch forever while its peers wait for it
(``benchmarks/loader_stress.py`` measures how often). The forkserver is a process of its own, started by
``exec``; it preloads this module (and with it torch and Lightning), so each worker forked from it starts
in milliseconds. What a worker needs travels pickled (the dataset, the item transform, ``worker_init_fn``),
and every worker imports the training script (as ``__mp_main__``), so the script's training code must sit
under ``if __name__ == "__main__":``. A DataLoader's own ``multiprocessing_context`` is kept.

**Watchdog.** :class:`WatchedIterator` bounds the wait for each batch (``DHPStrategy(data_wait_timeout=...)``).
When a worker stalls past it or dies, the rank does not raise alone (its peers would wait in the step's first
collective until the process-group timeout): it hands the strategy a failed step in place of the batch, and
every rank raises the same :class:`~lightning_dhp.errors.DHPLoaderError`, naming the rank, the worker, its
state and its Python stack (dumped on request by :mod:`faulthandler`, registered by :class:`WorkerInit`).
"""

from __future__ import annotations

import faulthandler
import multiprocessing
import os
import shutil
import signal
import tempfile
import time
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from multiprocessing import forkserver
from multiprocessing.context import BaseContext
from pathlib import Path
from typing import Any

from lightning_dhp.errors import DHPConfigError

DEFAULT_DATA_WAIT_S = 600.0  # a third of the default collective timeout (30 min)
STACK_SIGNAL = signal.SIGUSR2  # a worker dumps its threads' Python stacks when it receives this
POLL_S = 5.0  # a DHP loader's DataLoader timeout: how often a waiting rank checks that its workers live
_STACK_WAIT_S = 2.0  # how long the training process waits for a signalled worker's stack
_TORCH_TIMEOUT, _TORCH_WORKER_DIED = "DataLoader timed out after", "DataLoader worker (pid"  # torch's own errors


def default_context() -> BaseContext:
    """The start method of DHP loaders' workers: a forkserver preloading this module (spawn where the
    platform has no forkserver)."""
    if "forkserver" not in multiprocessing.get_all_start_methods():
        return multiprocessing.get_context("spawn")
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload([__name__])  # read when the server starts; later calls change nothing
    return context


def refuse_training_script_rerun_in_a_worker() -> None:
    """Raise when called while this process imports its parent's main script (a worker or a spawned process
    starting up): training code outside ``if __name__ == "__main__":`` would train again in every worker."""
    if getattr(multiprocessing.current_process(), "_inheriting", False):
        raise DHPConfigError(
            "DHPStrategy was created while a new process imported the training script: with the 'forkserver' and "
            "'spawn' start methods (DHP's DataLoader workers, Lightning's spawn launcher) every such process "
            "imports the script, and training code at its top level would run again there. Put the training "
            "code under `if __name__ == \"__main__\":`")


def start_worker_server() -> None:
    """Start the forkserver of :func:`default_context` now, so that it imports torch and Lightning while the
    model is set up rather than when the first loader starts its workers."""
    if default_context().get_start_method() == "forkserver":
        forkserver.ensure_running()


@dataclass(frozen=True)
class WorkerInit:
    """A DHP loader's ``worker_init_fn``: the worker writes its stacks to a file of ``stack_dir`` on
    :data:`STACK_SIGNAL` (the file's existence also tells that the worker ran Python), then runs the
    DataLoader's own ``worker_init_fn``."""

    stack_dir: str
    user_init: Callable[[int], None] | None = None

    def __call__(self, worker_id: int) -> None:
        stack_file = open(stack_path(self.stack_dir, worker_id), "w")  # noqa: SIM115 (faulthandler keeps it open)
        faulthandler.register(STACK_SIGNAL, file=stack_file, all_threads=True)
        if self.user_init is not None:
            self.user_init(worker_id)


def stack_path(stack_dir: str, worker_id: int) -> Path:
    return Path(stack_dir) / f"worker-{worker_id}.stack"


def new_stack_dir(owner: object) -> str:
    """A folder for one loader's worker stacks, removed when ``owner`` (the loader) is."""
    folder = tempfile.mkdtemp(prefix="dhp-loader-")
    weakref.finalize(owner, shutil.rmtree, folder, ignore_errors=True)
    return folder


class WatchedIterator:
    """A DataLoader iterator that waits at most ``wait_s`` seconds for each batch (``None``: forever).

    The DataLoader's own ``timeout`` is :data:`POLL_S`: each time it passes, torch has checked that the
    workers live, and the wait goes on until ``wait_s``. A batch that does not come in time, or a worker that
    died, becomes a failed step from ``on_failure(request, message)`` once the message says what the worker
    was doing. ``request_of(n)`` is the request of the ``n``-th batch of this iteration (batches come in order).
    """

    def __init__(self, iterator: Iterator[Any], *, rank: int, wait_s: float | None, stack_dir: str,
                 request_of: Callable[[int], Any], on_failure: Callable[[Any, str], Any]) -> None:
        self._iterator = iterator
        self._rank = rank
        self._wait_s = wait_s
        self._stack_dir = stack_dir
        self._request_of = request_of
        self._on_failure = on_failure
        self._received = 0

    def __iter__(self) -> WatchedIterator:
        return self

    def __len__(self) -> int:
        return len(self._iterator)  # type: ignore[arg-type]

    def __next__(self) -> Any:
        started = time.monotonic()
        while True:
            try:
                batch = next(self._iterator)
            except RuntimeError as error:  # torch's iterator stays usable after its own timeout
                message = str(error)
                waited = time.monotonic() - started
                if message.startswith(_TORCH_TIMEOUT) and (self._wait_s is None or waited < self._wait_s):
                    continue
                if not message.startswith((_TORCH_TIMEOUT, _TORCH_WORKER_DIED)):
                    raise
                request = self._request_of(self._received)
                return self._on_failure(request, self._describe(request, waited, message))
            self._received += 1
            return batch

    def _describe(self, request: Any, waited_s: float, torch_error: str) -> str:
        where = (f"global batch {request.position} (epoch {request.epoch})" if request is not None
                 else f"batch {self._received + 1} of this epoch")
        worker_id, process = _awaited_worker(self._iterator)
        if process is None:
            return f"rank {self._rank} got no {where} from its DataLoader workers: {torch_error}"
        worker = f"DataLoader worker {worker_id} (pid {process.pid})"
        started = stack_path(self._stack_dir, worker_id).exists()  # WorkerInit ran: the worker runs Python
        if process.exitcode is not None:
            if not started:
                return (f"rank {self._rank}'s {worker} {_ended(process.exitcode)} while starting, before loading "
                        f"{where}. With the 'forkserver' and 'spawn' start methods every worker imports your "
                        "training script, so its training code must sit under `if __name__ == \"__main__\":`; the "
                        "worker's own error, if it printed one, is in this rank's log above")
            return (f"rank {self._rank}'s {worker} {_ended(process.exitcode)} while loading {where}; its own "
                    "error, if it printed one, is in this rank's log above")
        head = f"rank {self._rank} waited {waited_s:.0f} s for {where} from its {worker}, which is still running"
        if not started:
            return (f"{head} but never started running Python: a worker forked from a process with running "
                    "threads can deadlock before it starts (leave the DataLoader's multiprocessing_context unset, "
                    "DHP then uses 'forkserver', or pass 'spawn')")
        stack = _stack_of(process.pid, stack_path(self._stack_dir, worker_id))
        return f"{head}. Its Python stack (most recent call first):\n{stack}" if stack else f"{head}: {torch_error}"


def _awaited_worker(iterator: Any) -> tuple[int, Any]:
    """The worker the iterator waits for (torch's ``_MultiProcessingDataLoaderIter`` internals), if known."""
    task = getattr(iterator, "_task_info", {}).get(getattr(iterator, "_rcvd_idx", None))
    workers = getattr(iterator, "_workers", [])
    if task and 0 <= task[0] < len(workers):
        return task[0], workers[task[0]]
    return -1, None


def _ended(exitcode: int) -> str:
    return f"was killed by {signal.Signals(-exitcode).name}" if exitcode < 0 else f"exited with code {exitcode}"


def _stack_of(pid: int, path: Path) -> str:
    """Ask a running worker for its stacks (see :class:`WorkerInit`); the stack of its main thread."""
    try:
        os.kill(pid, STACK_SIGNAL)
    except OSError:
        return ""
    deadline, size = time.monotonic() + _STACK_WAIT_S, -1
    while time.monotonic() < deadline:  # until the dump stops growing
        time.sleep(0.1)
        current = path.stat().st_size
        if current and current == size:
            break
        size = current
    dump = path.read_text()
    main_thread = dump.find("Current thread")  # the thread the signal interrupted: the one loading data
    return dump[dump.index("\n", main_thread) + 1:].rstrip() if main_thread >= 0 else dump.strip()
