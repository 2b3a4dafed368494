"""Logging under DHP: ``self.log`` inside a step takes a share of the global batch.

A DHP step runs the user's step once per round on every rank, each on a part of the global batch.
:class:`LoggedShares` captures every ``self.log`` call of the step, sums each value over rounds,
and, once the strategy has summed the sums over ranks, logs each name once with the global value
and the global batch size, so Lightning shows what single-device training on the whole global batch
shows (``on_step`` and ``on_epoch``, epoch means weighted by global batch sizes).
"""

from __future__ import annotations

import inspect
import numbers
import zlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from lightning.pytorch import LightningModule
from lightning.pytorch.utilities import rank_zero_warn


class _AlreadySummed:
    """The ``sync_dist_group`` of published values: the strategy's ``reduce`` leaves them as they are
    (every rank holds the same global value), and Lightning does not warn that they are unsynced."""

    def __repr__(self) -> str:
        return "ALREADY_SUMMED"


ALREADY_SUMMED = _AlreadySummed()


class LoggedShares:
    """The values one step logged, summed over its rounds, with the options of their first call."""

    def __init__(self) -> None:
        self._sums: dict[str, torch.Tensor] = {}
        self._options: dict[str, dict[str, Any]] = {}
        self._warned_batch_size: set[str] = set()

    @contextmanager
    def capture(self, module: LightningModule) -> Iterator[None]:
        """Route ``module.log`` (and so ``log_dict``) here while the block runs.

        Values Lightning aggregates itself (torchmetrics ``Metric`` objects) and ``rank_zero_only``
        values go straight through: they are not shares.
        """
        real_log = module.log
        signature = inspect.signature(real_log)

        def log(name: str, value: Any, *args: Any, **kwargs: Any) -> None:
            options = signature.bind(name, value, *args, **kwargs).arguments
            if options.get("rank_zero_only") or not isinstance(value, (torch.Tensor, numbers.Number)):
                real_log(name, value, *args, **kwargs)
                return
            del options["name"], options["value"]
            if options.pop("batch_size", None) is not None:
                self._warn_batch_size(name)
            self.add(name, value, **options)

        module.log = log  # an instance attribute shadows the method for this block only
        try:
            yield
        finally:
            del module.log

    def add(self, name: str, value: torch.Tensor | float, **options: Any) -> None:
        value = torch.as_tensor(value.detach() if isinstance(value, torch.Tensor) else value,
                                dtype=None if isinstance(value, torch.Tensor) else torch.get_default_dtype())
        if name in self._sums:
            self._sums[name] = self._sums[name] + value.to(self._sums[name])
        else:
            self._sums[name] = value
            self._options[name] = options

    def _warn_batch_size(self, name: str) -> None:
        if name not in self._warned_batch_size:
            self._warned_batch_size.add(name)
            rank_zero_warn(
                f"self.log({name!r}, ..., batch_size=...) inside a DHP step: the batch_size is ignored. A value "
                "logged in a DHP step is this rank's share of the global batch; DHPStrategy sums the shares over "
                "rounds and ranks and logs the sum once, weighted by the global batch size, so on-step and "
                "epoch values equal single-device training on the whole global batch. Drop batch_size (and "
                "sync_dist, which changes nothing either)")

    def digest(self) -> int:
        """A number equal on ranks that logged the same names with the same dtypes (in any order)."""
        names = sorted(f"{name}:{value.dtype}:{tuple(value.shape)}" for name, value in self._sums.items())
        return zlib.crc32("\n".join(names).encode())

    def __len__(self) -> int:
        return len(self._sums)

    def sum_over_ranks(self, all_reduce: Callable[[torch.Tensor], None], device: torch.device) -> None:
        """Sum every value over ranks: one ``all_reduce`` (in place, sum) per dtype, in name order."""
        by_dtype: dict[torch.dtype, list[str]] = {}
        for name in sorted(self._sums):
            by_dtype.setdefault(self._sums[name].dtype, []).append(name)
        for dtype in sorted(by_dtype, key=str):
            names = by_dtype[dtype]
            flat = torch.cat([self._sums[name].reshape(-1).to(device) for name in names])
            all_reduce(flat)
            offset = 0
            for name in names:
                numel = self._sums[name].numel()
                self._sums[name] = flat[offset:offset + numel].view_as(self._sums[name])
                offset += numel

    def publish(self, module: LightningModule, global_batch_size: int) -> None:
        """Log every summed value once, weighted by the global batch size."""
        for name, value in self._sums.items():
            module.log(name, value, **{**self._options[name], "sync_dist": True, "sync_dist_group": ALREADY_SUMMED,
                                       "batch_size": global_batch_size})
        self._sums.clear()
        self._options.clear()
