"""A DataLoader factory and a DataModule that wire the DHP sampler and packing for the common case."""

from __future__ import annotations

from collections.abc import Collection, Sequence
from typing import Any

from lightning.pytorch import LightningDataModule
from torch.utils.data import DataLoader

from lightning_dhp.errors import DHPConfigError
from lightning_dhp.lightning.collate import DHPPacking, ItemTransform
from lightning_dhp.lightning.sampler import (
    DHPBatchSampler,
    check_one_length_per_item,
    checked_lengths,
    checked_vision_patches,
)
from lightning_dhp.lightning.workers import start_worker_server


def dhp_dataloader(dataset: Any, lengths: Sequence[int], global_batch_size: int, *, shuffle: bool = True,
                   seed: int = 0, drop_last: bool = False, num_workers: int = 0,
                   token_fields: Collection[str] | None = None, item_transform: ItemTransform | None = None,
                   vision_patches: Sequence[int] | None = None) -> DataLoader:
    """A DataLoader that DHPStrategy turns into planned steps (use it in a custom DataModule).

    ``lengths[i]`` is the token count of ``dataset[i]`` (checked here, naming bad indices), and
    ``vision_patches[i]`` (optional; default: the dataset's ``vision_patches`` attribute, else none) the
    patches its vision tower encodes, so that the planner counts the vision work. ``token_fields`` names
    the per-token fields besides ``input_ids``/``labels`` (default: the dataset's ``token_fields``
    attribute, else none); every other field is per-sample. See :class:`DHPPacking` for ``item_transform``.
    """
    check_one_length_per_item(dataset, lengths)
    if token_fields is None:
        token_fields = getattr(dataset, "token_fields", ())
    if vision_patches is None:
        vision_patches = getattr(dataset, "vision_patches", None)
    sampler = DHPBatchSampler(lengths, global_batch_size, shuffle=shuffle, seed=seed, drop_last=drop_last,
                              vision_patches=vision_patches)
    return DataLoader(dataset, batch_sampler=sampler, num_workers=num_workers,
                      collate_fn=DHPPacking(token_fields, item_transform), persistent_workers=num_workers > 0)


class DHPDataModule(LightningDataModule):
    """Training data, and optional validation, test and predict data, for DHPStrategy.

    ``lengths[i]`` is the token count of ``train_dataset[i]``; the planner needs it before loading.
    Each other dataset takes its lengths from ``*_lengths`` or its own ``lengths`` attribute.
    ``vision_patches`` (optional) counts each training item's vision patches; every dataset may also
    carry its own in a ``vision_patches`` attribute. Validation, test and predict batches are not
    shuffled and keep the last short batch, so predictions come back in dataset order.
    ``token_fields`` and ``item_transform``: see :func:`dhp_dataloader`.
    """

    def __init__(self, train_dataset: Any, lengths: Sequence[int], global_batch_size: int, *,
                 val_dataset: Any = None, val_lengths: Sequence[int] | None = None,
                 test_dataset: Any = None, test_lengths: Sequence[int] | None = None,
                 predict_dataset: Any = None, predict_lengths: Sequence[int] | None = None,
                 num_workers: int = 0, shuffle: bool = True, seed: int = 0, drop_last: bool = False,
                 token_fields: Collection[str] | None = None, item_transform: ItemTransform | None = None,
                 vision_patches: Sequence[int] | None = None) -> None:
        super().__init__()
        self.global_batch_size, self.num_workers = global_batch_size, num_workers
        self.shuffle, self.seed, self.drop_last = shuffle, seed, drop_last
        self.packing_options = {"token_fields": token_fields, "item_transform": item_transform}
        self.vision_patches = vision_patches  # of the training items
        self.datasets = {"train": (train_dataset, lengths)}
        for stage, dataset, stage_lengths in (("val", val_dataset, val_lengths), ("test", test_dataset, test_lengths),
                                              ("predict", predict_dataset, predict_lengths)):
            if dataset is not None:
                stage_lengths = stage_lengths if stage_lengths is not None else getattr(dataset, "lengths", None)
                if stage_lengths is None:
                    raise DHPConfigError(f"{stage}_dataset needs {stage}_lengths (one token count per item) or a "
                                         "`lengths` attribute")
                self.datasets[stage] = (dataset, stage_lengths)
        for dataset, stage_lengths in self.datasets.values():  # bad lengths fail here, not when training starts
            check_one_length_per_item(dataset, stage_lengths)
            checked_lengths(stage_lengths)
        if vision_patches is not None:
            checked_vision_patches(vision_patches, len(lengths))

    def setup(self, stage: str) -> None:
        if self.num_workers > 0:  # Lightning sets up the data before the model: the workers' server starts now
            start_worker_server()

    def _loader(self, stage: str) -> Any:
        if stage not in self.datasets:
            return []
        from lightning_dhp.lightning.strategy import DHPStrategy

        strategy = self.trainer.strategy if self.trainer is not None else None
        if strategy is not None and not isinstance(strategy, DHPStrategy):
            raise DHPConfigError(
                f"DHPDataModule yields global batches for DHPStrategy to plan, but the Trainer uses "
                f"{type(strategy).__name__}; pass Trainer(strategy=DHPStrategy(...)) or strategy='dhp' "
                "(also on one device)")
        training = stage == "train"
        return dhp_dataloader(*self.datasets[stage], self.global_batch_size, shuffle=self.shuffle and training,
                              seed=self.seed, drop_last=self.drop_last and training, num_workers=self.num_workers,
                              vision_patches=self.vision_patches if training else None, **self.packing_options)

    def train_dataloader(self) -> Any:
        return self._loader("train")

    def val_dataloader(self) -> Any:
        return self._loader("val")

    def test_dataloader(self) -> Any:
        return self._loader("test")

    def predict_dataloader(self) -> Any:
        return self._loader("predict")
