"""The HF example end to end: a tiny Qwen3-VL-architecture model (DeepStack, interleaved M-RoPE) from a
config learns video digits under DHP on 4 CPU processes (held-out answer accuracy well above chance)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from lightning_dhp.testing import launch_environment

REPO = Path(__file__).resolve().parents[1]
ACCURACY_FLOOR = 0.3  # chance is 0.1


@pytest.mark.timeout(600)  # 4 processes for 100 steps: 2-3 minutes on a shared 2-core machine
def test_a_tiny_qwen3_vl_learns_video_digits_under_dhp_on_four_processes(tmp_path):
    env = launch_environment()
    command = [sys.executable, str(REPO / "examples" / "hf_vlm_finetune.py"), "trainer.devices=4",
               "hf_model=qwen3_vl_tiny", "trainer.max_steps=100", "data.num_eval=40",
               f"hydra.run.dir={tmp_path / 'run'}"]
    result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=540)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["devices"] == 4 and summary["steps"] == 100
    assert summary["accuracy_before"] < 0.2 and summary["accuracy_after"] >= ACCURACY_FLOOR, summary
    assert summary["plan"]["groups_by_degree"].get("2", 0) > 0, "the longer videos must run context-parallel"
