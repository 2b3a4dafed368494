"""Bad input under DHPStrategy: the same clear error on every rank, never a hang.

Each scenario runs on 2 gloo ranks (one spawn for all of them) and reports the error each rank saw.
"""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import DataLoader

from lightning_dhp import DHPStrategy, cp_attention
from lightning_dhp.lightning import DHPDataModule, dhp_dataloader
from lightning_dhp.testing import run_distributed
from tests.helpers import GLOBAL_BATCH, LENGTHS, as_torchrun_rank, cpu_trainer, error_of, same_error_on_every_rank
from tests.tiny_lm import LMTask, TokenDataset


class BrokenItems(TokenDataset):
    """Items 1-3 and 5 of the first (unshuffled) batch are broken, each in its own way."""

    def __getitem__(self, index: int) -> dict:
        tokens = super().__getitem__(index)["input_ids"]
        broken = {1: {"input_ids": tokens.float()},
                  2: {"input_ids": tokens, "labels": tokens[:-1]},
                  3: {"input_ids": tokens[:-1]},
                  5: {"tokens": tokens}}
        return broken.get(index, {"input_ids": tokens})


class AttentionOutsideBatch(LMTask):
    def on_train_start(self) -> None:
        q = torch.zeros(4, 4, 4, dtype=torch.float64)
        cp_attention(q, q, q)


def _fit_and_report(task, data, strategy) -> tuple[str, str] | tuple[str, int]:
    """Fit and return ("ok", skipped samples) or (error type, message)."""
    data_kwargs = {"train_dataloaders": data} if isinstance(data, DataLoader) else {"datamodule": data}
    try:
        cpu_trainer(2, strategy).fit(task, **data_kwargs)
    except Exception as error:
        return type(error).__name__, str(error)
    return "ok", strategy.skipped_samples


def _scenarios(rank: int, world_size: int) -> dict:
    as_torchrun_rank(rank)
    data = DHPDataModule(TokenDataset(LENGTHS), LENGTHS, GLOBAL_BATCH)
    broken = DHPDataModule(BrokenItems(LENGTHS), LENGTHS, GLOBAL_BATCH, shuffle=False)
    other_lengths = LENGTHS if rank == 0 else [length + 1 for length in LENGTHS]
    return {
        "too_long": _fit_and_report(LMTask(), data, DHPStrategy(tokens_per_device=8)),
        "bad_items": _fit_and_report(LMTask(), broken, DHPStrategy(tokens_per_device=20)),
        "skip_bad_items": _fit_and_report(LMTask(), broken, DHPStrategy(tokens_per_device=20, skip_bad_samples=True)),
        "attention_outside_batch": _fit_and_report(AttentionOutsideBatch(), data, DHPStrategy(tokens_per_device=20)),
        "plain_dataloader": _fit_and_report(LMTask(), DataLoader(TokenDataset(LENGTHS)), DHPStrategy(20)),
        "plan_mismatch": _fit_and_report(
            LMTask(), DHPDataModule(TokenDataset(other_lengths), other_lengths, GLOBAL_BATCH), DHPStrategy(20)),
        "wrong_lengths": error_of(lambda: dhp_dataloader(TokenDataset(LENGTHS), [*LENGTHS, 1], GLOBAL_BATCH)),
        "datamodule_without_dhp": _fit_and_report(LMTask(), data, "ddp"),
    }


@pytest.fixture(scope="module")
def reports() -> list[dict]:
    return run_distributed(_scenarios, 2, timeout_s=240)


@pytest.mark.parametrize(("scenario", "kind", "fragments"), [
    ("too_long", "PlanError", ["dataset sample 0", "37", "tokens_per_device"]),
    ("bad_items", "DHPDataError", ["dataset item 5", "'input_ids' tensor", "dataset item 3", "lengths[3] = 2",
                                   "dataset item 1", "integer tensor", "dataset item 2", "'labels'",
                                   "skip_bad_samples=True"]),
    ("attention_outside_batch", "RuntimeError", ["outside a DHP batch", "training_step"]),
    ("plain_dataloader", "DHPConfigError", ["DHPBatchSampler", "DHPDataModule"]),
    ("plan_mismatch", "DHPRankMismatchError", ["global batch 0", "ranks [1] differ from rank 0"]),
    ("wrong_lengths", "DHPDataError", [f"lengths has {len(LENGTHS) + 1} entries", f"{len(LENGTHS)} items"]),
    ("datamodule_without_dhp", "DHPConfigError", ["strategy=DHPStrategy", "DDPStrategy"]),
])
def test_bad_input_gives_the_same_clear_error_on_every_rank(reports, scenario, kind, fragments):
    seen_kind, message = same_error_on_every_rank(reports, scenario)
    assert seen_kind == kind, message
    for fragment in fragments:
        assert fragment in message


def test_bad_samples_can_be_skipped_and_counted(reports):
    assert all(report["skip_bad_items"] == ("ok", 4) for report in reports)
