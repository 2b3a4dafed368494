"""The planner's public surface: import purity (numpy only) and its small helpers."""

from __future__ import annotations

import subprocess
import sys

import pytest

from lightning_dhp.planner import divisors


def test_the_planner_and_the_simulator_import_neither_torch_nor_lightning():
    code = (
        "import sys; import lightning_dhp.planner, lightning_dhp.simulate; "
        "print(sorted(name for name in ('torch', 'lightning', 'pytorch_lightning') if name in sys.modules))"
    )
    completed = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert completed.stdout.strip() == "[]"


@pytest.mark.parametrize(
    ("number", "expected"), [(1, [1]), (7, [1, 7]), (12, [1, 2, 3, 4, 6, 12]), (64, [1, 2, 4, 8, 16, 32, 64])]
)
def test_divisors_are_every_exact_divisor_ascending(number, expected):
    assert divisors(number) == expected
    assert divisors(number) == [d for d in range(1, number + 1) if number % d == 0]
