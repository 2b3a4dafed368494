"""Predictions under DHP: one output per sample of the global batch, whoever computed its shards.

``predict_step`` returns, per round, a tensor with one row per local token (this rank's rows of the
group's packed samples), a list with one entry per sample of the group, a dict of those, or None.
Tensors are per-token by definition, lists per-sample, so no shape coincidence decides a kind.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

import torch

from lightning_dhp.attention import ZigzagLayout
from lightning_dhp.errors import DHPConfigError
from lightning_dhp.lightning.batch import DHPBatchInfo

# DHPBatchSampler never drops predict samples (predict loaders keep the last short batch), which
# Lightning cannot check on a custom batch sampler and warns about.
warnings.filterwarnings("ignore", message="You are using a custom batch sampler `DHPBatchSampler` for prediction")
# DHPStrategy.predict_step hands prediction writers each step's indices itself.
warnings.filterwarnings("ignore",
                        message="Couldn't infer the batch indices fetched from your dataloader: `DHPDataLoader`")

# (round index, group ranks, rank in group, sequence lengths, dataset indices, output moved to the CPU)
Piece = tuple[int, tuple[int, ...], int, tuple[int, ...], tuple[int, ...], Any]


def piece_of(info: DHPBatchInfo, output: Any) -> Piece | None:
    """What this rank contributes of one round's output (``None``: idle or nothing returned)."""
    if output is None or not info.sample_indices:
        return None
    _check_kinds(output, info)
    return (info.round_index, info.group_ranks, info.layout.rank, info.layout.seq_lens, info.sample_indices,
            _to_cpu(output))


def assemble(pieces: Sequence[Piece], sample_ids: Sequence[int]) -> list[Any]:
    """One output per sample of the global batch, in the batch's order (``None`` where none came back).

    ``pieces`` come from every rank; a group's per-token shards are unsharded with its layout and cut
    per sample, its per-sample lists are taken from its first rank.
    """
    groups: dict[tuple[int, tuple[int, ...]], dict[int, Piece]] = {}
    for piece in pieces:
        groups.setdefault((piece[0], piece[1]), {})[piece[2]] = piece
    by_index: dict[int, Any] = {}
    for (_, ranks), members in groups.items():
        first = members[min(members)]
        seq_lens, indices = first[3], first[4]
        parts = [members[rank][5] if rank in members else None for rank in range(len(ranks))]
        for position, output in enumerate(_per_sample(parts, seq_lens)):
            by_index[indices[position]] = output
    return [by_index.get(index) for index in sample_ids]


def _per_sample(parts: list[Any], seq_lens: tuple[int, ...]) -> list[Any]:
    """Split the group's outputs (one per rank, in group order) into one output per sample."""
    first = next(part for part in parts if part is not None)
    if isinstance(first, dict):
        per_key = {key: _per_sample([part[key] for part in parts], seq_lens) for key in first}
        return [{key: values[position] for key, values in per_key.items()} for position in range(len(seq_lens))]
    if isinstance(first, torch.Tensor):
        whole = ZigzagLayout(seq_lens, len(parts), 0).unshard(parts)
        return list(whole.split(list(seq_lens)))
    return list(first)


def _check_kinds(output: Any, info: DHPBatchInfo) -> None:
    if isinstance(output, dict):
        for value in output.values():
            _check_kinds(value, info)
    elif isinstance(output, torch.Tensor):
        if output.dim() == 0 or output.shape[0] != info.layout.num_local_tokens:
            raise DHPConfigError(
                f"predict_step returned a tensor of shape {tuple(output.shape)}; under DHP a tensor must have one "
                f"row per local token ({info.layout.num_local_tokens} here). Return per-sample values as a list "
                f"with one entry per sample of the group ({len(info.sample_indices)} here)")
    elif isinstance(output, (list, tuple)):
        if len(output) != len(info.sample_indices):
            raise DHPConfigError(
                f"predict_step returned a list of {len(output)} values; a per-sample list needs one entry per "
                f"sample of the group ({len(info.sample_indices)} here)")
    else:
        raise DHPConfigError(f"predict_step returned {type(output).__name__}; return a per-token tensor, a "
                             "per-sample list, a dict of those, or None")


def _to_cpu(output: Any) -> Any:
    if isinstance(output, dict):
        return {key: _to_cpu(value) for key, value in output.items()}
    if isinstance(output, torch.Tensor):
        return output.detach().cpu()
    return [value.detach().cpu() if isinstance(value, torch.Tensor) else value for value in output]

