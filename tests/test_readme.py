"""The README's "Using it" script runs as written, on the 2 CPU processes it asks for."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

from lightning_dhp.testing import launch_environment

REPO = Path(__file__).resolve().parents[1]


def test_the_readme_example_trains_as_written(tmp_path):
    readme = (REPO / "README.md").read_text()
    section = readme[readme.index("## Using it"):]
    script = re.search(r"```python\n(.*?)```", section, re.DOTALL).group(1)
    (tmp_path / "train.py").write_text(script)
    env = launch_environment(PYTHONPATH=str(REPO))
    result = subprocess.run([sys.executable, "train.py"], cwd=tmp_path, env=env, capture_output=True, text=True,
                            timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "`Trainer.fit` stopped: `max_steps=5` reached" in result.stderr
