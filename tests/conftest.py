import os
import shutil
import tempfile

import pytest
from hypothesis import settings

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TORCH_DEVICE_BACKEND_AUTOLOAD", "0")
# Files that tests' rank processes write (they inherit the variables) go here, removed when the session ends:
# also the temporary folders of processes that die without cleaning up (a rank a test kills leaves its loader's
# stack folder, a killed forkserver its socket folder).
SESSION_TMP = tempfile.mkdtemp(prefix="dhp-tests-")
os.environ["DHP_TEST_TMP"] = SESSION_TMP
os.environ["TMPDIR"] = SESSION_TMP  # for the processes tests start; this one keeps its own (cached) folder

# Property tests draw the same examples on every run, so CI passes or fails on the code, not on the draw.
# Explore new draws with `pytest --hypothesis-profile=explore` (and pin what it finds as a plain test).
settings.register_profile("deterministic", derandomize=True)
settings.register_profile("explore", derandomize=False)
settings.load_profile("deterministic")

# The files that take longest, longest first (seconds on 2 cores with two workers: the chat example 300, the
# benchmarks' quick runs 200, then 50-150 each), start first, so pytest-xdist's two workers (pyproject's addopts)
# end together; the rest follow in pytest's order.
LONGEST_FIRST = ("test_hf_chat_example.py", "test_benchmarks_quick.py", "test_lightning_contract.py", "test_app.py",
                 "test_hf.py", "test_reliability.py", "test_sharding.py", "test_loader_workers.py",
                 "test_attention.py", "test_hf_example.py", "test_strategy.py", "test_chat.py")


def pytest_sessionfinish(session: pytest.Session) -> None:
    shutil.rmtree(SESSION_TMP, ignore_errors=True)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    def position(item: pytest.Item) -> int:
        name = item.path.name
        return LONGEST_FIRST.index(name) if name in LONGEST_FIRST else len(LONGEST_FIRST)

    items.sort(key=position)  # stable: every file keeps its own order


@pytest.fixture(scope="session", autouse=True)
def _kept_worlds():
    """Every run_distributed world of the session runs on the same rank processes (see kept_worlds)."""
    from lightning_dhp.testing import kept_worlds  # after the environment above is set

    with kept_worlds():
        yield
