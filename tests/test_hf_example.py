"""The HF example runs end to end: a tiny Qwen3-VL-architecture model (DeepStack, interleaved M-RoPE) from a
config, fine-tuned on video digits under DHP on 2 CPU processes for a few steps, writes its summary.

A smoke run, not a learning run: that DHP trains these models exactly as one device would is asserted by the
float64 tests (``tests/test_hf.py``), and that the example's recipe learns by ``tests/test_hf_chat_example.py``."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from lightning_dhp.testing import launch_environment

REPO = Path(__file__).resolve().parents[1]
STEPS = 4


@pytest.mark.timeout(300)
def test_the_tiny_qwen3_vl_example_runs_end_to_end_under_dhp(tmp_path):
    command = [sys.executable, str(REPO / "examples" / "hf_vlm_finetune.py"), "trainer.devices=2",
               "hf_model=qwen3_vl_tiny", f"trainer.max_steps={STEPS}", "data.num_images=96", "data.num_videos=96",
               "data.num_eval=8", f"hydra.run.dir={tmp_path / 'run'}"]
    result = subprocess.run(command, cwd=tmp_path, env=launch_environment(), capture_output=True, text=True,
                            timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]
    path = tmp_path / "run" / "summary.json"
    summary = json.loads(path.read_text())
    assert summary["devices"] == 2 and summary["steps"] == STEPS, summary
    assert 0 <= summary["accuracy_before"] <= 1 and 0 <= summary["accuracy_after"] <= 1, summary
    assert summary["plan"]["groups_by_degree"].get("2", 0) > 0, "the longer videos must run context-parallel"
    assert str(path) in result.stdout, "the example reports its results and where the summary is"
