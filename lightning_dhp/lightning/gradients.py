"""Gradients of a DHP step: early rounds kept aside, then one sum over the world per optimizer step.

Every rank's loss is its share of the global mean, so the *sum* of the ranks' gradients is the
single-device gradient of the global batch. The sum runs once, at the end of the backward of the
last round of a global batch, before anything reads the gradients (clipping, the optimizer, user
hooks), unless Lightning is accumulating (``block_backward_sync``). In automatic optimization
Lightning zeroes gradients between ``training_step`` and its backward, so the backward of earlier
rounds, which the strategy runs inside ``training_step``, writes into gradients kept aside.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.distributed as dist
from torch import nn


class GradientSync:
    """Replicated parameters: keeps early rounds' gradients aside and sums gradients over a process group.

    :class:`~lightning_dhp.lightning.sharding.ShardedGradientSync` is its FSDP2 counterpart (same methods).

    ``group`` ``None`` is one process: summing is a no-op.
    """

    def __init__(self, module: nn.Module, group: dist.ProcessGroup | None) -> None:
        self.module = module
        self.group = group
        self.enabled = True  # False while Lightning accumulates gradients over global batches
        self._aside: list[torch.Tensor | None] | None = None

    def parameters(self) -> list[nn.Parameter]:
        return [p for p in self.module.parameters() if p.requires_grad]

    @contextmanager
    def early_backward(self) -> Iterator[None]:
        """A backward run inside this block adds to the kept-aside gradients, not to ``p.grad``."""
        params = self.parameters()
        outer = [p.grad for p in params]
        for p, aside in zip(params, self._aside or [None] * len(params), strict=True):
            p.grad = aside
        try:
            yield
        finally:
            self._aside = [p.grad for p in params]
            for p, grad in zip(params, outer, strict=True):
                p.grad = grad

    def before_backward(self, last_round: bool) -> None:
        """Nothing to prepare: the sum runs after the last round's backward."""

    def finish_backward(self, only_if_any: bool = False) -> None:
        """After the last round's backward: add the kept-aside gradients, then sum over the group.

        ``only_if_any`` (a skipped step): sum only gradients accumulated earlier, if there are any, so
        parameters without gradients keep none. Every rank ran the same backwards, so all agree.
        """
        params = self.parameters()
        if only_if_any and all(p.grad is None for p in params):
            return
        if self._aside is not None:
            for p, aside in zip(params, self._aside, strict=True):
                if aside is not None:
                    p.grad = aside if p.grad is None else p.grad.add_(aside)
            self._aside = None
        if self.enabled:
            self.sum_over_group(params)

    def discard(self) -> None:
        """Forget kept-aside gradients (the step was skipped)."""
        self._aside = None

    def sum_over_group(self, params: list[nn.Parameter]) -> None:
        """Sum every gradient over the group: one flat all-reduce per dtype and device.

        A rank whose rounds never touched a parameter contributes zeros, so every rank launches the
        same collectives.
        """
        if self.group is None:
            return
        buckets: dict[tuple[torch.dtype, torch.device], list[torch.Tensor]] = {}
        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            buckets.setdefault((p.grad.dtype, p.grad.device), []).append(p.grad)
        for grads in buckets.values():
            flat = torch.cat([g.reshape(-1) for g in grads])
            dist.all_reduce(flat, group=self.group)
            offset = 0
            for g in grads:
                g.copy_(flat[offset:offset + g.numel()].view_as(g))
                offset += g.numel()
