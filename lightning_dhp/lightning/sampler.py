"""Global batches of sample indices, identical on every rank, resumable mid-epoch."""

from __future__ import annotations

import numbers
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

from lightning_dhp.errors import DHPConfigError, DHPDataError


class DHPBatchSampler:
    """Yields global batches (lists of dataset indices), the same on every rank.

    Unlike a DistributedSampler it does not split batches across ranks: the DHP planner decides,
    per batch, which rank runs which samples. Deterministic in ``(seed, epoch)``; with ``drop_last``
    the final short batch of an epoch is skipped, otherwise every sample is yielded exactly once per
    epoch. ``state_dict``/``load_state_dict`` save the position inside the epoch so that a resumed
    run continues with exactly the batches the uninterrupted run would have seen.

    ``lengths`` and ``vision_patches`` (optional) are what the planner knows of every sample: its
    tokens, and the vision patches its vision tower encodes (images and video frames, before merging).
    """

    def __init__(self, lengths: Sequence[int], global_batch_size: int, *, shuffle: bool = True,
                 seed: int = 0, drop_last: bool = False, vision_patches: Sequence[int] | None = None) -> None:
        if global_batch_size < 1:
            raise DHPConfigError(f"global_batch_size must be >= 1, got {global_batch_size}")
        self.lengths = checked_lengths(lengths)
        self.vision_patches = None if vision_patches is None else checked_vision_patches(vision_patches,
                                                                                          len(self.lengths))
        self.global_batch_size = global_batch_size
        self.shuffle = shuffle
        self.seed = seed
        self.drop_last = drop_last
        self.epoch = 0
        self._batches_consumed = 0  # in the current epoch, by the running iterator
        self.resume_position = 0  # the batch the next iteration starts at (non-zero after a resume)

    def __len__(self) -> int:
        full, rest = divmod(len(self.lengths), self.global_batch_size)
        return full if self.drop_last or rest == 0 else full + 1

    def set_epoch(self, epoch: int) -> None:
        """Called by Lightning at the start of every epoch; changes the shuffle order."""
        if epoch != self.epoch:
            self.resume_position = 0
        self.epoch = epoch

    def _order(self) -> np.ndarray:
        if not self.shuffle:
            return np.arange(len(self.lengths))
        return np.random.default_rng([self.seed, self.epoch]).permutation(len(self.lengths))

    def batches(self) -> list[list[int]]:
        """All global batches of the current epoch, in order."""
        order = self._order().tolist()
        return [order[start:start + self.global_batch_size] for start in
                range(0, len(self) * self.global_batch_size, self.global_batch_size)]

    def __iter__(self) -> Iterator[list[int]]:
        start, self.resume_position = self.resume_position, 0
        for position, batch in enumerate(self.batches()[start:], start=start):
            self._batches_consumed = position + 1
            yield batch

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "batches_consumed": self._batches_consumed, "seed": self.seed,
                "num_samples": len(self.lengths), "global_batch_size": self.global_batch_size}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state["num_samples"] != len(self.lengths):
            raise DHPConfigError(
                f"cannot resume: the checkpoint's sampler saw {state['num_samples']} samples, this dataset "
                f"has {len(self.lengths)}; resume with the same dataset")
        if state["global_batch_size"] != self.global_batch_size:
            raise DHPConfigError(
                f"cannot resume: the checkpoint used global_batch_size={state['global_batch_size']}, this run "
                f"uses {self.global_batch_size}; resume with the same global batch size")
        self.seed = state["seed"]
        self.epoch = state["epoch"]
        self._batches_consumed = state["batches_consumed"]
        self.resume_position = state["batches_consumed"]  # == len(self): the epoch is done


def check_one_length_per_item(dataset: Any, lengths: Sequence[int]) -> None:
    """A :class:`DHPDataError` unless ``lengths`` holds one token count per item of ``dataset``."""
    if len(lengths) != len(dataset):
        raise DHPDataError(f"lengths has {len(lengths)} entries but the dataset has {len(dataset)} items; pass one "
                           "token count per item, in dataset order")


def checked_lengths(lengths: Sequence[int]) -> list[int]:
    """``lengths`` as ints, or a :class:`DHPDataError` naming the dataset indices that cannot be trained.

    Checked when the DataLoader is built, so a bad length never waits for its batch to come up.
    """
    if len(lengths) == 0:
        raise DHPDataError("lengths is empty: the dataset has no samples to batch")
    values = _whole_numbers(lengths, "lengths", "token counts")
    bad = [index for index, length in enumerate(values) if length < 1]
    if bad:
        shown = ", ".join(f"lengths[{index}] = {values[index]}" for index in bad[:5])
        more = f" and {len(bad) - 5} more" if len(bad) > 5 else ""
        raise DHPDataError(f"dataset items {bad[:5]}{more} have no tokens to train ({shown}); every length must "
                           "be >= 1: remove those items or fix their lengths")
    return values


def checked_vision_patches(vision_patches: Sequence[int], num_samples: int) -> list[int]:
    """One count >= 0 of vision patches per sample, or a :class:`DHPDataError` naming the dataset indices."""
    if len(vision_patches) != num_samples:
        raise DHPDataError(f"vision_patches has {len(vision_patches)} entries but there are {num_samples} lengths; "
                           "pass one patch count per dataset item (0 for text), in dataset order")
    values = _whole_numbers(vision_patches, "vision_patches", "vision patch counts")
    negative = [index for index, patches in enumerate(values) if patches < 0]
    if negative:
        shown = ", ".join(f"vision_patches[{index}] = {values[index]}" for index in negative[:5])
        raise DHPDataError(f"dataset items {negative[:5]} have negative vision patch counts ({shown}); a count is "
                           "the patches the vision tower encodes for the item, 0 for text")
    return values


def _whole_numbers(values: Sequence[Any], name: str, what: str) -> list[int]:
    values = list(values)
    not_integers = [index for index, value in enumerate(values) if not _is_whole_number(value)]
    if not_integers:
        shown = ", ".join(f"{name}[{index}] = {values[index]!r}" for index in not_integers[:5])
        raise DHPDataError(f"{what} must be whole numbers; dataset items {not_integers[:5]} have {shown}")
    return [int(value) for value in values]


def _is_whole_number(value: Any) -> bool:
    if isinstance(value, (bool, np.bool_)):
        return False
    return isinstance(value, (numbers.Integral, np.integer)) or (isinstance(value, numbers.Real)
                                                               and float(value).is_integer())
