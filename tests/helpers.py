"""What the strategy tests share: the tiny LM's data, a CPU trainer, ranks launched as by torchrun, and the checks
"parameters equal the reference", "within bf16 rounding" and "the same error on every rank"."""

from __future__ import annotations

import math
import os
import tempfile
from collections.abc import Callable, Mapping
from functools import cache
from pathlib import Path

import torch
import torch.distributed as dist
from lightning.pytorch import Trainer
from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

from lightning_dhp import DHPStrategy
from lightning_dhp.data import LengthFileError, shared_data_dir
from lightning_dhp.lightning import DHPBatchSampler, DHPDataModule, DHPPlanReport
from tests.tiny_lm import TokenDataset, reference_training, reference_two_optimizers

REPO = Path(__file__).resolve().parents[1]
LENGTHS = [37, 5, 9, 2, 16, 23, 4, 11, 30, 6, 3, 14, 1, 19, 8, 27, 12, 7, 21, 10, 2, 33, 5, 13]
GLOBAL_BATCH = 6
STEPS = 3
# float64 training under DHP against the single-device oracle: equal up to summation order
EXACT_RTOL, EXACT_ATOL = 1e-9, 1e-12


def global_batches(epochs: int, global_batch: int = GLOBAL_BATCH) -> list[list[int]]:
    """The sampler's global batches (dataset indices) of LENGTHS over ``epochs`` epochs, seed 0."""
    sampler = DHPBatchSampler(LENGTHS, global_batch, seed=0)
    batches = []
    for epoch in range(epochs):
        sampler.set_epoch(epoch)
        batches += sampler.batches()
    return batches


BATCHES = global_batches(epochs=2)


@cache
def single_device_training(steps: int = STEPS, **options) -> dict:
    """``reference_training`` of the tiny LM on BATCHES (``options``: its keywords), computed once per options
    for the whole session: callers only read it."""
    return reference_training(LENGTHS, BATCHES, steps, **options)


@cache
def single_device_two_optimizers() -> dict:
    """``reference_two_optimizers`` on BATCHES for STEPS steps, computed once (callers only read it)."""
    return reference_two_optimizers(LENGTHS, BATCHES, STEPS)


def tokens_for_full_degree(lengths: list[int], world_size: int) -> int:
    """A device capacity at which the longest sample runs on all ``world_size`` processes (degree 3 on 3)."""
    return 2 * -(-max(lengths) // (2 * world_size))  # zigzag: 2 chunks a rank


def cpu_trainer(world_size: int, strategy: DHPStrategy | str, steps: int = STEPS, **kwargs) -> Trainer:
    """A quiet Lightning trainer on ``world_size`` CPU processes for ``steps`` optimizer steps."""
    options = {"max_steps": steps, "logger": False, "enable_checkpointing": False, "enable_progress_bar": False,
               "enable_model_summary": False, "num_sanity_val_steps": 0, **kwargs}
    return Trainer(accelerator="cpu", devices=world_size, strategy=strategy, **options)


def token_data(global_batch: int = GLOBAL_BATCH) -> DHPDataModule:
    """The tiny LM's training data (LENGTHS, seed 0) with validation samples of the same lengths (seed 1)."""
    return DHPDataModule(TokenDataset(LENGTHS), LENGTHS, global_batch, seed=0,
                         val_dataset=TokenDataset(LENGTHS, seed=1), val_lengths=LENGTHS)


def plan_report() -> DHPPlanReport:
    """A plan recorder whose end-of-training files go to a fresh folder of the session's temporary folder
    (conftest's ``DHP_TEST_TMP``, removed at the end of the session), not the working directory."""
    folder = tempfile.mkdtemp(prefix="dhp-plans-", dir=os.environ.get("DHP_TEST_TMP"))
    return DHPPlanReport(dirpath=folder, log_metrics=False)


def as_torchrun_rank(rank: int) -> None:
    """Make Lightning in this spawned process see one rank of an external (torchrun-like) launch."""
    os.environ.update(LOCAL_RANK=str(rank), NODE_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT="1")


def assert_parameters_match(actual: Mapping[str, torch.Tensor], reference: Mapping[str, torch.Tensor], *,
                            rtol: float = EXACT_RTOL, atol: float = EXACT_ATOL) -> None:
    """Every parameter of ``reference`` is in ``actual``, of the same shape and dtype, within ``atol + rtol *
    |reference|`` elementwise (by default: float64 exactness up to summation order). A failure names every
    missing parameter, or the worst parameter, its largest error and how many parameters are off."""
    missing = sorted(reference.keys() - actual.keys())
    assert not missing, f"missing parameters {missing} (have {sorted(actual)})"
    off = []
    for name, expected in reference.items():
        value = actual[name]
        assert value.shape == expected.shape and value.dtype == expected.dtype, \
            f"parameter {name}: {value.dtype}{tuple(value.shape)}, expected {expected.dtype}{tuple(expected.shape)}"
        difference = (value.double() - expected.double()).abs()
        excess = float((difference - atol - rtol * expected.double().abs()).max()) if value.numel() else 0.0
        if not excess <= 0:  # NaN is off too
            off.append((math.inf if math.isnan(excess) else excess, name, float(difference.max())))
    if off:
        _, worst, error = max(off)
        raise AssertionError(f"{len(off)} of {len(reference)} parameters differ from the reference beyond "
                             f"rtol={rtol:g}, atol={atol:g}; worst: {worst} (max abs error {error:.3g}); "
                             f"all: {sorted(name for _, name, _ in off)}")


def assert_within_bf16_rounding(params: dict, expected: dict, initial: dict, share: float = 0.02) -> None:
    """``params`` against single-device bf16-mixed training from ``initial`` to ``expected``. bf16 rounds
    differently once samples are packed, split over ranks or sharded, so each parameter may differ by a small
    share of its update (measured on the tiny LM: at most 0.7%, as much as bf16-mixed differs from float32
    training; losing the shortest sample of every batch, or a learning rate 10% off, moves every parameter by
    7% or more)."""
    for name, value in expected.items():
        update = float((value - initial[name]).norm())
        difference = float((params[name] - value).norm())
        assert params[name].dtype == value.dtype, f"parameter {name}: {params[name].dtype}, expected {value.dtype}"
        assert difference <= share * update, f"parameter {name}: off by {difference / update:.1%} of its update"


def assert_bf16_mixed_runs_match_single_device(runs: list[dict]) -> None:
    """Every run (``params`` after STEPS steps, ``autocast``: whether each step ran under bf16 autocast) against
    single-device bf16-mixed training of the tiny LM (see :func:`assert_within_bf16_rounding`)."""
    expected = single_device_training(precision="bf16-mixed")
    initial = single_device_training(0, precision="bf16-mixed")
    for run in runs:
        assert run["autocast"] and all(run["autocast"])
        assert_within_bf16_rounding(run["params"], expected, initial)


def load_weights_from_rank_zero(module: torch.nn.Module, weights_of_model: Callable[[], dict]) -> None:
    """Load the state dict ``weights_of_model()`` builds (``module.model``'s, as from a pretrained checkpoint),
    built and read on rank 0 only, into every rank's (sharded) ``module``."""
    weights = {f"model.{name}": value for name, value in weights_of_model().items()} if dist.get_rank() == 0 else {}
    set_model_state_dict(module, weights, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))


def same_error_on_every_rank(reports: list[dict], scenario: str) -> tuple[str, str]:
    """The one (type, message) every rank reported for ``scenario``; fails if ranks disagree."""
    errors = {report[scenario] for report in reports}
    assert len(errors) == 1, f"ranks disagree: {errors}"
    return errors.pop()


def error_of(run: Callable[[], object]) -> tuple[str, str]:
    """("ok", "") if ``run()`` returns, else the type and message of what it raised (to compare ranks)."""
    try:
        run()
    except Exception as error:
        return type(error).__name__, str(error)
    return "ok", ""


def shared_data_available() -> bool:
    """Whether ``../shared/data`` (or ``$DHP_DATA_DIR``) is here: tests of the real length files skip without it."""
    try:
        shared_data_dir()
    except LengthFileError:
        return False
    return True
