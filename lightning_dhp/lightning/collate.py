"""Turn the dataset items of one group into this rank's packed, zigzag-sharded tensors."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from lightning_dhp.attention import ZigzagLayout

IGNORE_INDEX = -100


class DHPDataError(ValueError):
    """A dataset item that cannot be trained; the message names the dataset index and the fix."""


@dataclass
class DHPBatchInfo:
    """What a LightningModule needs to know about the micro-step it runs (``batch["dhp"]``).

    ``global_loss_tokens`` counts the labelled tokens of the whole global batch over all ranks and
    rounds; divide the summed token loss by it (see :func:`loss_share`) so that summing gradients
    across ranks gives exactly the gradient of the global mean loss.
    """

    layout: ZigzagLayout
    group_ranks: tuple[int, ...]
    sample_indices: tuple[int, ...]
    round_index: int
    num_rounds: int
    loss_tokens: int
    global_loss_tokens: int = 0
    extras: dict[str, Any] = field(default_factory=dict)

    @property
    def degree(self) -> int:
        return len(self.group_ranks)


def loss_share(loss_sum: torch.Tensor, batch: dict[str, Any]) -> torch.Tensor:
    """This rank's share of the global mean loss: its summed token loss over the batch's loss tokens."""
    return loss_sum / max(batch["dhp"].global_loss_tokens, 1)


def check_item(item: Any, index: int, declared_length: int) -> None:
    """Raise :class:`DHPDataError` naming ``index`` if ``item`` is not a trainable sample."""
    if not isinstance(item, dict) or "input_ids" not in item:
        keys = f" with keys {sorted(item)}" if isinstance(item, dict) else ""
        raise DHPDataError(f"dataset item {index} must be a dict with an 'input_ids' tensor, "
                           f"got {type(item).__name__}{keys}")
    input_ids = item["input_ids"]
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 1 or input_ids.dtype.is_floating_point \
            or input_ids.dtype == torch.bool or input_ids.is_complex():
        raise DHPDataError(f"dataset item {index}: 'input_ids' must be a 1-D integer tensor, got "
                           f"{getattr(input_ids, 'dtype', type(input_ids).__name__)} of shape "
                           f"{tuple(getattr(input_ids, 'shape', ()))}")
    if len(input_ids) != declared_length:
        raise DHPDataError(f"dataset item {index} has {len(input_ids)} tokens but lengths[{index}] = "
                           f"{declared_length}; make the lengths passed to the sampler match the dataset")
    if len(input_ids) == 0:
        raise DHPDataError(f"dataset item {index} is empty (0 tokens); remove it from the dataset")
    labels = item.get("labels")
    if labels is not None and (not isinstance(labels, torch.Tensor) or labels.shape != input_ids.shape):
        raise DHPDataError(f"dataset item {index}: 'labels' must be a tensor shaped like 'input_ids' "
                           f"{tuple(input_ids.shape)}, got {tuple(getattr(labels, 'shape', ()))}")


def shifted_labels(item: dict[str, Any]) -> torch.Tensor:
    """Next-token targets: position t predicts labels[t + 1]; the last position predicts nothing."""
    labels = item.get("labels", item["input_ids"]).long()
    return torch.cat([labels[1:], labels.new_full((1,), IGNORE_INDEX)])


def count_loss_tokens(items: Sequence[dict[str, Any]]) -> int:
    return sum(int((shifted_labels(item) != IGNORE_INDEX).sum()) for item in items)


def _is_per_token(key: str, items: Sequence[dict[str, Any]]) -> bool:
    return all(isinstance(item.get(key), torch.Tensor) and item[key].dim() >= 1
               and item[key].shape[0] == len(item["input_ids"]) for item in items)


def collate_group(items: Sequence[dict[str, Any]], layout: ZigzagLayout) -> dict[str, Any]:
    """This rank's rows of the packed group: labels shifted before sharding, padding labelled -100.

    Tensors whose first dimension equals the item's token count are per-token and sharded like
    ``input_ids`` (padding rows 0); every other field is per-sample and passed through as a list in
    group order.
    """
    batch: dict[str, Any] = {}
    for key in items[0]:
        if key == "labels":
            continue
        if key == "input_ids" or _is_per_token(key, items):
            batch[key] = layout.shard(torch.cat([item[key] for item in items]))
        else:
            batch[key] = [item.get(key) for item in items]
    batch["labels"] = layout.shard(torch.cat([shifted_labels(item) for item in items]), pad_value=IGNORE_INDEX)
    batch["position_ids"] = layout.position_ids
    return batch


def empty_batch(template: dict[str, Any]) -> tuple[dict[str, Any], ZigzagLayout]:
    """A batch of zero tokens with the fields of ``template``, for a rank idle in a round.

    Running the user's step on it keeps every rank's sequence of steps (and of logging collectives)
    identical, and its zero loss still reaches every parameter.
    """
    layout = ZigzagLayout([], 1, 0)
    batch: dict[str, Any] = {}
    for key, value in template.items():
        if key == "input_ids" or _is_per_token(key, [template]):
            batch[key] = value[:0]
        elif key != "labels":
            batch[key] = []
    batch["labels"] = template["input_ids"].new_empty(0).long()
    batch["position_ids"] = layout.position_ids
    return batch, layout
