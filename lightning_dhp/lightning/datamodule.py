"""A DataModule that wires the DHP sampler and DataLoader for the common case."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from lightning.pytorch import LightningDataModule
from torch.utils.data import DataLoader

from lightning_dhp.lightning.sampler import DHPBatchSampler


def _not_planned(_: Any) -> Any:
    raise RuntimeError("this DataLoader yields global batches for DHPStrategy to plan; train it with "
                       "Trainer(strategy=DHPStrategy(...)) or strategy='dhp'")


def dhp_dataloader(dataset: Any, lengths: Sequence[int], global_batch_size: int, *, shuffle: bool = True,
                   seed: int = 0, drop_last: bool = False, num_workers: int = 0) -> DataLoader:
    """A DataLoader that DHPStrategy turns into planned steps (use it in a custom DataModule)."""
    sampler = DHPBatchSampler(lengths, global_batch_size, shuffle=shuffle, seed=seed, drop_last=drop_last)
    return DataLoader(dataset, batch_sampler=sampler, num_workers=num_workers, collate_fn=_not_planned,
                      persistent_workers=num_workers > 0)


class DHPDataModule(LightningDataModule):
    """Training (and optional validation) data for DHPStrategy.

    ``lengths[i]`` is the token count of ``train_dataset[i]``; the planner needs it before loading.
    Validation batches are not shuffled and keep the last short batch.
    """

    def __init__(self, train_dataset: Any, lengths: Sequence[int], global_batch_size: int, *,
                 val_dataset: Any = None, val_lengths: Sequence[int] | None = None, num_workers: int = 0,
                 shuffle: bool = True, seed: int = 0, drop_last: bool = False) -> None:
        super().__init__()
        if len(lengths) != len(train_dataset):
            raise ValueError(f"lengths has {len(lengths)} entries but train_dataset has {len(train_dataset)} "
                             "items; pass one token count per item, in dataset order")
        if val_dataset is not None:
            val_lengths = val_lengths if val_lengths is not None else getattr(val_dataset, "lengths", None)
            if val_lengths is None or len(val_lengths) != len(val_dataset):
                raise ValueError("val_dataset needs val_lengths (one token count per item) or a `lengths` "
                                 "attribute of the same length")
        self.train_dataset, self.lengths = train_dataset, lengths
        self.val_dataset, self.val_lengths = val_dataset, val_lengths
        self.global_batch_size, self.num_workers = global_batch_size, num_workers
        self.shuffle, self.seed, self.drop_last = shuffle, seed, drop_last

    def _check_strategy(self) -> None:
        from lightning_dhp.lightning.strategy import DHPStrategy

        if self.trainer is not None and not isinstance(self.trainer.strategy, DHPStrategy):
            raise RuntimeError(
                f"DHPDataModule yields global batches for DHPStrategy to plan, but the Trainer uses "
                f"{type(self.trainer.strategy).__name__}; pass Trainer(strategy=DHPStrategy(...)) or "
                "strategy='dhp' (also on one device)")

    def train_dataloader(self) -> DataLoader:
        self._check_strategy()
        return dhp_dataloader(self.train_dataset, self.lengths, self.global_batch_size, shuffle=self.shuffle,
                              seed=self.seed, drop_last=self.drop_last, num_workers=self.num_workers)

    def val_dataloader(self) -> Any:
        if self.val_dataset is None:
            return []
        self._check_strategy()
        return dhp_dataloader(self.val_dataset, self.val_lengths, self.global_batch_size, shuffle=False,
                              num_workers=self.num_workers)
