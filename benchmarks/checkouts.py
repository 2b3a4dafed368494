"""Run a benchmark's worker mode under another checkout of the code: the harness of the before/after planner
benchmarks (``planner_compare.py``, ``small_batches.py``), which alternate two checkouts in one session."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]


def run_worker(checkout: Path, script: str, *args: str) -> Any:
    """``python script *args`` in a fresh process whose ``lightning_dhp`` (and ``benchmarks``) come from
    ``checkout``; returns the JSON its last line of output prints. The length metadata stays this checkout's
    (``DHP_DATA_DIR``), wherever ``checkout`` is."""
    environment = {"DHP_DATA_DIR": str(ROOT.parent / "shared" / "data"), **os.environ, "PYTHONPATH": str(checkout)}
    output = subprocess.run([sys.executable, script, *args], env=environment, cwd=checkout, check=True,
                            capture_output=True, text=True).stdout
    return json.loads(output.splitlines()[-1])


def alternation_order(alternation: int) -> tuple[int, int]:
    """Which checkout runs first in each alternation: the first, then the second, and so on."""
    return (0, 1) if alternation % 2 == 0 else (1, 0)
