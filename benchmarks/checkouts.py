"""Run a benchmark's worker mode under another checkout of the code: the harness of the before/after planner
benchmarks (``planner_compare.py``, ``small_batches.py``), which keep one long-lived process per checkout
(:class:`Worker`) and ask them in turn, so that the two versions alternate every few milliseconds and a shared
machine's changes of speed hit both (with a fresh process per run, a swing of up to 1.7x fell on one)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]


def _environment(checkout: Path) -> dict[str, str]:
    """``lightning_dhp`` (and ``benchmarks``) from ``checkout``; the length metadata stays this checkout's
    (``DHP_DATA_DIR``), wherever ``checkout`` is."""
    return {"DHP_DATA_DIR": str(ROOT.parent / "shared" / "data"), **os.environ, "PYTHONPATH": str(checkout)}


class Worker:
    """``python script *args`` kept running under ``checkout``: each :meth:`ask` writes one JSON request line
    to its input and reads one JSON reply line from its output. Its first reply (``ready``) comes unasked."""

    def __init__(self, checkout: Path, script: str, *args: str) -> None:
        self.process = subprocess.Popen([sys.executable, script, *args], env=_environment(checkout), cwd=checkout,
                                        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self.ready = self._reply()

    def ask(self, request: Any) -> Any:
        assert self.process.stdin is not None
        self.process.stdin.write(json.dumps(request) + "\n")
        self.process.stdin.flush()
        return self._reply()

    def _reply(self) -> Any:
        assert self.process.stdout is not None
        line = self.process.stdout.readline()
        if not line:
            raise RuntimeError(f"the worker {self.process.args} exited with {self.process.wait()}")
        return json.loads(line)

    def __enter__(self) -> Worker:
        return self

    def __exit__(self, *exc_info: object) -> None:
        assert self.process.stdin is not None
        self.process.stdin.close()
        self.process.wait(timeout=60)


def alternation_order(alternation: int) -> tuple[int, int]:
    """Which checkout runs first in each alternation: the first, then the second, and so on."""
    return (0, 1) if alternation % 2 == 0 else (1, 0)
