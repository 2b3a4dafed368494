"""benchmarks/gpu_check.py's dry run: the GPU check's code paths on CPU (seconds), through the one command
the GPU machine runs (benchmarks/gpu_check.sh)."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", REPO / "benchmarks" / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    yield module
    del sys.modules[spec.name]


def test_dry_run_checks_times_and_reports(gpu_check, tmp_path):
    command = ["bash", str(REPO / "benchmarks" / "gpu_check.sh"), "run", "--dry-run"]
    path = os.pathsep.join([str(Path(sys.executable).parent), os.environ["PATH"]])  # this test's python
    result = subprocess.run(command, env={**os.environ, "OUT": str(tmp_path), "PATH": path}, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert report["mode"] == "dry-run" and report["passed"]
    assert any("NCCL" in line for line in report["not_shown"])
    assert report["environment"]["torch"] and report["environment"]["device"] == "cpu"
    rows = report["correctness"]
    sizes = gpu_check.DRY_RUN
    expected = len(gpu_check.DTYPES) * len(sizes.head_dims) * 2 * 2 * len(sizes.degrees)  # 2 masks, 2 kernels
    assert len(rows) == expected and all(row["passed"] for row in rows)
    assert {row["degree"] for row in rows} == set(sizes.degrees)
    assert {row["dtype"] for row in rows} == {"float32", "float16", "bfloat16"}
    lengths = rows[0]["lengths"]
    assert 0 in lengths and any(0 < length < 2 * max(sizes.degrees) for length in lengths)
    assert all(set(row["errors"]) == {"out", "dq", "dk", "dv"} for row in rows)
    assert len(report["timing"]) == 2
    for pack in report["timing"].values():
        assert set(pack["timings"]) == {"cpu_flash", "math"}
        assert all(len(t["seconds"]) == sizes.repeats and t["min_s"] <= t["median_s"] for t in pack["timings"].values())
        assert pack["per_sequence_over_varlen"]["cpu_flash"] > 0
    job = report["main_job"]
    assert not job["ran"] and "trainer=cpu trainer.devices=1" in job["command"]


def test_a_kernel_outside_the_tolerance_fails_the_check(gpu_check, monkeypatch):
    monkeypatch.setattr(gpu_check, "DTYPES", (gpu_check.torch.float32,))
    monkeypatch.setitem(gpu_check.TOLERANCE, gpu_check.torch.float32, 1e-12)
    rows = gpu_check.check_kernels(gpu_check.DRY_RUN)
    # fp32 kernels are about 1e-7 from the float64 reference: every row misses 1e-12, on its errors.
    assert rows and not any(row["passed"] for row in rows)
    assert all(max(row["errors"].values()) > 1e-12 for row in rows)


def test_a_step_that_raises_is_recorded_and_the_json_keeps_the_other_steps(gpu_check, tmp_path, monkeypatch):
    def broken(sizes):
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    monkeypatch.setattr(gpu_check, "time_packs", broken)
    out = tmp_path / "gpu.json"
    assert gpu_check.main(["--dry-run", "--out", str(out)]) == 1
    report = json.loads(out.read_text())
    assert not report["passed"] and "illegal memory access" in report["timing"]["error"]
    assert report["correctness"] and all(row["passed"] for row in report["correctness"])
    assert report["main_job"]["ran"] is False
