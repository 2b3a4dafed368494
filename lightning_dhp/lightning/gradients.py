"""Gradients of a DHP step: early rounds kept aside, then summed over the world in the last round.

Every rank's loss is its share of the global mean, so the *sum* of the ranks' gradients is the
single-device gradient of the global batch. The sum runs during and right after each backward of the
last round of a global batch, before anything reads the gradients (clipping, the optimizer, user
hooks), unless Lightning is accumulating (``block_backward_sync``). In automatic optimization
Lightning zeroes gradients between ``training_step`` and its backward, so the backward of earlier
rounds, which the strategy runs inside ``training_step``, writes into gradients kept aside.

The last round may run several backwards (manual optimization: one per optimizer, or a loss in parts):
each sums only what it adds. A gradient an earlier backward of the round already summed is set aside
during the next one and added back after that one's sum, so nothing is summed twice, whatever the
optimizers stepped or zeroed in between. The common single backward pays nothing for this.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.distributed as dist
from torch import nn

_IN_FLIGHT = 2  # buckets reduced at once: bounds the extra memory to two buckets


class GradientSync:
    """Replicated parameters: keeps early rounds' gradients aside and sums gradients over a group.

    Parameters are cut into buckets of about ``bucket_bytes`` in reverse order (the order backward
    produces their gradients). During the last round's backward a bucket's all-reduce starts as soon
    as it and every earlier bucket have their gradients, so communication overlaps the rest of the
    backward; buckets always start in the same order on every rank. ``bucket_bytes=None`` is one flat
    all-reduce after the backward. ``group`` ``None`` is one process: summing is a no-op.
    :class:`~lightning_dhp.lightning.sharding.ShardedGradientSync` is the FSDP2 counterpart.
    """

    def __init__(self, module: nn.Module, group: dist.ProcessGroup | None, bucket_bytes: int | None = 25 << 20) -> None:
        self.module = module
        self.group = group
        self.enabled = True  # False while Lightning accumulates gradients over global batches
        self._aside: dict[nn.Parameter, torch.Tensor] = {}  # early rounds' gradients (automatic optimization)
        self._summed: dict[nn.Parameter, weakref.ref] = {}  # gradients summed by this round's earlier backwards
        self._summed_aside: dict[nn.Parameter, torch.Tensor] = {}  # those, set aside during this backward
        self._buckets = _buckets(self.parameters(), bucket_bytes)
        self._positions = {p: position for position, p in enumerate(p for bucket in self._buckets for p in bucket)}
        self._counts: list[torch.Tensor] = []  # per bucket summed: how many ranks had each parameter's gradient
        self._zero_filled: list[nn.Parameter] = []  # parameters without a gradient here, given the sum
        self._ready: list[set[nn.Parameter]] = []
        self._in_flight: list[tuple[list[nn.Parameter], torch.Tensor, dist.Work]] = []
        self._launched = 0
        self._armed = False
        self._hooks = [p.register_post_accumulate_grad_hook(lambda p, index=index: self._on_gradient(p, index))
                       for index, bucket in enumerate(self._buckets) for p in bucket
                       if group is not None and bucket_bytes is not None]

    def close(self) -> None:
        """Remove the gradient hooks (at teardown)."""
        for hook in self._hooks:
            hook.remove()
        self._hooks = []

    def parameters(self) -> list[nn.Parameter]:
        return [p for p in self.module.parameters() if p.requires_grad]

    @contextmanager
    def early_backward(self) -> Iterator[None]:
        """A backward run inside this block adds to the kept-aside gradients, not to ``p.grad``."""
        params = self.parameters()
        outer = [p.grad for p in params]
        for p in params:
            p.grad = self._aside.get(p)
        try:
            yield
        finally:
            self._aside = {p: p.grad for p in params if p.grad is not None}
            for p, grad in zip(params, outer, strict=True):
                p.grad = grad

    def new_step(self) -> None:
        """A global batch starts: no gradient has been summed in it yet."""
        self._summed = {}

    def before_backward(self, last_round: bool) -> None:
        """Arm the bucket hooks for a backward of the last round (when its sum is due), with the gradients
        an earlier backward of the round summed already set aside."""
        self._armed = last_round and self.enabled and self.group is not None
        self._ready = [set() for _ in self._buckets]
        self._launched = 0
        if self._armed and self._summed:
            for p, summed in self._summed.items():
                if p.grad is not None and p.grad is summed():
                    self._summed_aside[p], p.grad = p.grad, None

    def finish_backward(self, only_if_any: bool = False) -> None:
        """After the last round's backward: reduce the buckets not started yet, wait for all, and leave
        every gradient summed (kept-aside gradients included).

        ``only_if_any`` (a skipped step): sum only gradients accumulated earlier, if there are any, so
        parameters without gradients keep none. Every rank ran the same backwards, so all agree.
        """
        self._armed = False
        params = self.parameters()
        if only_if_any and all(p.grad is None for p in params) and not self._aside:
            return
        if not self.enabled or self.group is None:
            self._merge_aside(params)
            return
        while self._launched < len(self._buckets):
            self._launch(self._buckets[self._launched])
        while self._in_flight:
            self._complete_oldest()
        self._drop_gradients_no_rank_had()

    def discard(self) -> None:
        """Forget kept-aside gradients (the step was skipped)."""
        self._aside = {}

    def _on_gradient(self, p: nn.Parameter, index: int) -> None:
        if not self._armed:
            return
        if index < self._launched:
            raise RuntimeError(
                "a parameter received a second gradient in one backward after its bucket's all-reduce started "
                "(a weight shared by two reentrant-checkpointed blocks?); pass DHPStrategy(gradient_bucket_mb=None) "
                "to sum gradients after the backward instead")
        self._ready[index].add(p)
        while self._launched < len(self._buckets) and \
                len(self._ready[self._launched]) == len(self._buckets[self._launched]):
            self._launch(self._buckets[self._launched])

    def _launch(self, bucket: list[nn.Parameter]) -> None:
        """Start one bucket's all-reduce: kept-aside gradients added, missing gradients as zeros, and one
        count per parameter of the ranks that had a gradient for it."""
        self._merge_aside(bucket)
        had_gradient = [p.grad is not None for p in bucket]
        flat = torch.cat([*(p.grad.reshape(-1) if p.grad is not None else p.new_zeros(p.numel()) for p in bucket),
                          torch.tensor(had_gradient, dtype=bucket[0].dtype, device=bucket[0].device)])
        self._in_flight.append((bucket, flat, dist.all_reduce(flat, group=self.group, async_op=True)))
        self._launched += 1
        while len(self._in_flight) > _IN_FLIGHT:
            self._complete_oldest()

    def _complete_oldest(self) -> None:
        bucket, flat, work = self._in_flight.pop(0)
        work.wait()
        offset = 0
        for p in bucket:
            summed = flat[offset:offset + p.numel()].view_as(p)
            offset += p.numel()
            earlier = self._summed_aside.pop(p, None)
            if earlier is not None:
                p.grad = earlier.add_(summed)
            elif p.grad is not None:
                p.grad.copy_(summed)
            else:
                p.grad = summed.clone()
                self._zero_filled.append(p)
            self._summed[p] = weakref.ref(p.grad)
        self._counts.append(flat[offset:])

    def _drop_gradients_no_rank_had(self) -> None:
        """A parameter no rank differentiated keeps no gradient, as on one device (Adam leaves a parameter
        without a gradient alone, but moves one whose gradient is zero). One host sync per backward."""
        if self._zero_filled:
            counts = torch.cat(self._counts).tolist()
            for p in self._zero_filled:
                if counts[self._positions[p]] == 0:
                    p.grad = None
        self._counts, self._zero_filled = [], []

    def _merge_aside(self, params: list[nn.Parameter]) -> None:
        for p in params:
            aside = self._aside.pop(p, None)
            if aside is not None:
                p.grad = aside if p.grad is None else p.grad.add_(aside)


def _buckets(params: list[nn.Parameter], bucket_bytes: int | None) -> list[list[nn.Parameter]]:
    """Parameters in reverse order, cut at ``bucket_bytes`` and wherever dtype or device changes."""
    buckets: list[list[nn.Parameter]] = []
    size = 0
    for p in reversed(params):
        previous = buckets[-1][-1] if buckets else None
        if previous is None or (p.dtype, p.device) != (previous.dtype, previous.device) or \
                (bucket_bytes is not None and size + p.numel() * p.element_size() > bucket_bytes):
            buckets.append([])
            size = 0
        buckets[-1].append(p)
        size += p.numel() * p.element_size()
    return buckets
