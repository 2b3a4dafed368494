"""Turn the dataset items of one group into this rank's packed, zigzag-sharded tensors.

Field kinds are declared, never guessed from shapes: ``input_ids`` and ``labels`` are per-token,
so are the fields named in :attr:`DHPPacking.token_fields` (first dimension = the sample's tokens);
every other field is per-sample and arrives as a list in the group's packing order.
"""

from __future__ import annotations

import traceback
import warnings
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.utils.data import default_collate

from lightning_dhp.attention import ZigzagLayout
from lightning_dhp.errors import DHPConfigError, DHPDataError

IGNORE_INDEX = -100
ItemTransform = Callable[[dict[str, Any]], dict[str, Any]]


@dataclass(frozen=True)
class DHPPacking:
    """How DHPStrategy packs dataset items; pass it as a DHP DataLoader's ``collate_fn``.

    ``token_fields`` names the per-token fields besides ``input_ids``/``labels`` (sharded like
    ``input_ids``; ``position_ids`` among them replaces the in-sequence positions, otherwise an
    item's ``position_ids`` is ignored). ``item_transform``
    runs on every item right after loading, before any check (it must be picklable for
    ``num_workers > 0``); one with a ``transform_group(batch, layout)`` method also gets each group this
    rank packs, once planned (the Hugging Face families load there only the pixels this rank encodes).
    Calling it as a plain collate function raises: only the strategy packs.
    """

    token_fields: frozenset[str] = field(default_factory=frozenset)
    item_transform: ItemTransform | None = None

    def __init__(self, token_fields: Collection[str] = (), item_transform: ItemTransform | None = None) -> None:
        if isinstance(token_fields, str):
            raise DHPConfigError(f"token_fields takes a collection of field names, got the string {token_fields!r}; "
                                 f"write token_fields=[{token_fields!r}]")
        object.__setattr__(self, "token_fields", frozenset(token_fields) - {"input_ids", "labels"})
        object.__setattr__(self, "item_transform", item_transform)

    def __call__(self, items: Any) -> Any:
        raise DHPConfigError("this DataLoader yields global batches for DHPStrategy to plan; train it with "
                             "Trainer(strategy=DHPStrategy(...)) or strategy='dhp'")

    @classmethod
    def from_collate_fn(cls, collate_fn: Any) -> DHPPacking:
        """The packing of a DataLoader: its ``DHPPacking``, the default one for PyTorch's default collate,
        or a clear error for a custom ``collate_fn`` (which would be silently bypassed)."""
        if isinstance(collate_fn, DHPPacking):
            return collate_fn
        if collate_fn is None or collate_fn is default_collate:
            return cls()
        name = getattr(collate_fn, "__qualname__", type(collate_fn).__name__)
        raise DHPConfigError(
            f"the DataLoader's collate_fn {name} would be bypassed: DHPStrategy packs samples itself. Move "
            "per-sample processing into the dataset or pass collate_fn=DHPPacking(item_transform=..., "
            "token_fields=...), which runs your function on every item before packing")

    def load(self, dataset: Any, index: int, declared_length: int) -> dict[str, Any]:
        """Item ``index`` transformed and checked; :class:`DHPDataError` names the index when it is bad."""
        try:
            item = dataset[index]
            if self.item_transform is not None:
                item = self.item_transform(item)
        except DHPDataError:
            raise
        except Exception as failure:  # a crash in one rank's loader must not hang the others
            reason = traceback.format_exception_only(failure)[-1].strip()
            raise DHPDataError(f"loading dataset item {index} failed: {reason}") from failure
        self.check(item, index, declared_length)
        return item

    def check(self, item: Any, index: int, declared_length: int) -> None:
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
        labels = item.get("labels")
        if labels is not None and (not isinstance(labels, torch.Tensor) or labels.shape != input_ids.shape):
            raise DHPDataError(f"dataset item {index}: 'labels' must be a tensor shaped like 'input_ids' "
                               f"{tuple(input_ids.shape)}, got {tuple(getattr(labels, 'shape', ()))}")
        for name in sorted(self.token_fields):
            value = item.get(name)
            if not isinstance(value, torch.Tensor) or value.dim() < 1 or value.shape[0] != len(input_ids):
                got = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
                raise DHPDataError(
                    f"dataset item {index}: token field {name!r} must be a tensor with one row per token "
                    f"({len(input_ids)} rows), got {got}; fix the item or drop {name!r} from token_fields")

    def collate_group(self, items: Sequence[dict[str, Any]], layout: ZigzagLayout) -> dict[str, Any]:
        """This rank's rows of the packed group: labels shifted before sharding, padding labelled -100.

        Token fields are sharded like ``input_ids`` (padding rows 0); other fields become lists in
        group order.
        """
        batch: dict[str, Any] = {"position_ids": layout.position_ids}
        for key in items[0]:
            if key in ("labels", "position_ids") and key not in self.token_fields:
                continue
            if key == "input_ids" or key in self.token_fields:
                batch[key] = layout.shard(torch.cat([item[key] for item in items]))
            else:
                batch[key] = [item.get(key) for item in items]
                _warn_if_per_token(key, batch[key], items)
        batch["labels"] = layout.shard(torch.cat([shifted_labels(item) for item in items]), pad_value=IGNORE_INDEX)
        transform_group = getattr(self.item_transform, "transform_group", None)
        return batch if transform_group is None else transform_group(batch, layout)

    def empty_batch(self, template: dict[str, Any]) -> tuple[dict[str, Any], ZigzagLayout]:
        """A batch of zero tokens with the fields of ``template``, for a rank idle in a round.

        Running the user's step on it keeps every rank's sequence of steps (and of collectives)
        identical, and its zero loss still reaches every parameter.
        """
        layout = ZigzagLayout([], 1, 0)
        batch: dict[str, Any] = {"position_ids": layout.position_ids}
        for key, value in template.items():
            if key == "input_ids" or key in self.token_fields:
                batch[key] = value[:0]
            elif key not in ("labels", "position_ids"):
                batch[key] = []
        batch["labels"] = template["input_ids"].new_empty(0).long()
        return batch, layout


_WARNED_UNDECLARED: set[str] = set()  # undeclared per-token fields warned about, once per process


def _warn_if_per_token(key: str, values: list[Any], items: Sequence[dict[str, Any]]) -> None:
    """Warn once per field when an undeclared field has one row per token in every sample of a group of
    tokens: it arrives as a list of whole-sample tensors, which user code then tries to use as a tensor.
    ``attention_mask`` is left alone (packing replaces it)."""
    if key == "attention_mask" or key in _WARNED_UNDECLARED:
        return
    lengths = [len(item["input_ids"]) for item in items]
    if max(lengths) > 1 and all(isinstance(value, torch.Tensor) and value.dim() >= 1 and value.shape[0] == length
                                for value, length in zip(values, lengths, strict=True)):
        _WARNED_UNDECLARED.add(key)
        warnings.warn(
            f"field {key!r} has one row per token in every sample, but it is not declared per-token, so it "
            "arrives in the step as a list with one whole-sample tensor per sample (not sharded like input_ids). "
            f"If it is per-token, declare it: DHPDataModule(..., token_fields=[{key!r}]) (or dhp_dataloader / "
            "DHPPacking, or a token_fields attribute on the dataset); a per-sample field that happens to have "
            "as many rows as its sample has tokens can stay as it is", stacklevel=2)


def shifted_labels(item: dict[str, Any]) -> torch.Tensor:
    """Next-token targets: position t predicts labels[t + 1]; the last position predicts nothing."""
    labels = item.get("labels", item["input_ids"]).long()
    return torch.cat([labels[1:], labels.new_full((1,), IGNORE_INDEX)])


def count_loss_tokens(items: Sequence[dict[str, Any]]) -> int:
    return sum(int((shifted_labels(item) != IGNORE_INDEX).sum()) for item in items)
