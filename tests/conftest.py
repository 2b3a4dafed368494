import os

import pytest
from hypothesis import settings

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TORCH_DEVICE_BACKEND_AUTOLOAD", "0")

# Property tests draw the same examples on every run, so CI passes or fails on the code, not on the draw.
# Explore new draws with `pytest --hypothesis-profile=explore` (and pin what it finds as a plain test).
settings.register_profile("deterministic", derandomize=True)
settings.register_profile("explore", derandomize=False)
settings.load_profile("deterministic")


@pytest.fixture(scope="session", autouse=True)
def _kept_worlds():
    """Every run_distributed world of the session runs on the same rank processes (see kept_worlds)."""
    from lightning_dhp.testing import kept_worlds  # after the environment above is set

    with kept_worlds():
        yield
