"""Where and when a result was produced: machine, CPUs, load, commit, torch version and date.

The simulator's report and every benchmark's JSON quote the same fields, so that two results can be
compared knowing what ran them. It lives in the package (not in ``benchmarks/``) because the installed
``dhp-simulate`` needs it too; it imports nothing heavy (torch only when asked for its version).
"""

from __future__ import annotations

import os
import platform
import subprocess
from datetime import datetime, timezone
from pathlib import Path


def git_commit(*, short: bool = True) -> str:
    """The checkout's commit (abbreviated unless ``short=False``), or ``"unknown"`` outside a git checkout."""
    command = ["git", "rev-parse", *(["--short"] if short else []), "HEAD"]
    try:
        return subprocess.run(command, capture_output=True, text=True, timeout=10, check=True,
                              cwd=Path(__file__).resolve().parent).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def machine_description() -> str:
    """Host, CPUs, the 1-minute load average (timings on a shared machine depend on it) and the commit."""
    return (
        f"{platform.node()} ({platform.machine()}, {os.cpu_count()} CPUs, {platform.system()}, python "
        f"{platform.python_version()}, load average {os.getloadavg()[0]:.1f}), commit {git_commit()}"
    )


def utc_date() -> str:
    """Now, to the minute, as every result writes it: ``2026-12-06 14:05 UTC``."""
    return datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")


def torch_version() -> str:
    """The installed torch's version (imports torch)."""
    import torch

    return torch.__version__


def stamp(*, torch: bool = False) -> dict[str, str]:
    """``{"date", "machine"}`` (and ``"torch"`` when asked) for a result's JSON, in that order."""
    return {"date": utc_date(), "machine": machine_description(), **({"torch": torch_version()} if torch else {})}
