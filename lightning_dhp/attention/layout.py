"""Zigzag split of a packed variable-length batch over a context-parallel group.

Each sequence is padded at its end to a multiple of ``2 * degree`` and cut into ``2 * degree`` equal
chunks; rank ``r`` keeps chunks ``r`` and ``2 * degree - 1 - r``. Pairing an early chunk with a late
one gives every rank the same share of causal attention work, for every degree.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from lightning_dhp.planner.cost_model import padded_lengths


class ZigzagLayout:
    """The rows of a packed batch that one rank of a ``degree``-way context-parallel group holds.

    Local rows keep the packed order: for every sequence, its head chunk then its tail chunk.
    Zero-length sequences take no rows; at degree 1 nothing is padded.
    """

    def __init__(self, seq_lens: Sequence[int] | torch.Tensor, degree: int, rank: int) -> None:
        if isinstance(seq_lens, torch.Tensor):
            seq_lens = seq_lens.tolist()
        self.seq_lens: tuple[int, ...] = tuple(int(length) for length in seq_lens)
        self.degree = int(degree)
        self.rank = int(rank)
        if self.degree < 1:
            raise ValueError(f"ZigzagLayout: degree must be >= 1, got {degree}")
        if not 0 <= self.rank < self.degree:
            raise ValueError(
                f"ZigzagLayout: rank {rank} is outside the group of degree {degree}; "
                f"pass the rank's position in its group, 0 <= rank < {degree}"
            )
        for index, length in enumerate(self.seq_lens):
            if length < 0:
                raise ValueError(f"ZigzagLayout: sequence {index} has negative length {length}; lengths must be >= 0")

        lens = torch.tensor(self.seq_lens, dtype=torch.long)
        padded = torch.from_numpy(padded_lengths(np.array(self.seq_lens, dtype=np.int64), self.degree))
        self.padded_lens: tuple[int, ...] = tuple(padded.tolist())
        local_lens = padded // self.degree
        self.local_cu_seqlens: torch.Tensor = torch.nn.functional.pad(local_lens.cumsum(0), (1, 0))
        self.num_local_tokens = int(self.local_cu_seqlens[-1])

        self.sequence_ids: torch.Tensor = torch.repeat_interleave(torch.arange(len(self.seq_lens)), local_lens)
        offset = torch.arange(self.num_local_tokens) - self.local_cu_seqlens[self.sequence_ids]
        chunk = (padded // (2 * self.degree))[self.sequence_ids]
        # Degree 1 keeps chunks 0 and 1, i.e. the whole sequence: both branches give ``offset``.
        head_start = self.rank * chunk
        tail_start = (2 * self.degree - 1 - self.rank) * chunk
        self.position_ids: torch.Tensor = torch.where(offset < chunk, head_start + offset, tail_start + offset - chunk)
        self.valid: torch.Tensor = self.position_ids < lens[self.sequence_ids]
        sequence_starts = torch.nn.functional.pad(lens.cumsum(0), (1, 0))
        # Row of the packed unpadded batch for each local row; padding rows point one past the end.
        self._source_rows = torch.where(
            self.valid, sequence_starts[self.sequence_ids] + self.position_ids, int(sequence_starts[-1])
        )

    @property
    def num_tokens(self) -> int:
        """Rows of the packed unpadded batch, ``sum(seq_lens)``."""
        return sum(self.seq_lens)

    def __repr__(self) -> str:
        return f"ZigzagLayout(seq_lens={list(self.seq_lens)}, degree={self.degree}, rank={self.rank})"

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, ZigzagLayout):
            return NotImplemented
        return (self.seq_lens, self.degree, self.rank) == (other.seq_lens, other.degree, other.rank)

    def __hash__(self) -> int:
        return hash((self.seq_lens, self.degree, self.rank))

    def __reduce__(self) -> tuple:
        # Rebuilding is cheaper to ship than the index tensors.
        return ZigzagLayout, (self.seq_lens, self.degree, self.rank)

    def shard(self, x: torch.Tensor, pad_value: float | int | bool = 0) -> torch.Tensor:
        """This rank's rows of the packed unpadded ``x`` (``sum(seq_lens)`` rows), padding set to
        ``pad_value``. Differentiable."""
        if x.shape[0] != self.num_tokens:
            raise ValueError(
                f"ZigzagLayout.shard: x has {x.shape[0]} rows but the layout's sequences hold "
                f"sum(seq_lens) = {self.num_tokens}; pass the packed, unpadded batch"
            )
        padding_row = x.new_full((1, *x.shape[1:]), pad_value)
        return torch.cat([x, padding_row])[self._source_rows.to(x.device)]

    def unshard(self, parts: Sequence[torch.Tensor]) -> torch.Tensor:
        """The packed unpadded tensor rebuilt from every rank's shard (``parts[r]`` from rank ``r``)."""
        if len(parts) != self.degree:
            raise ValueError(
                f"ZigzagLayout.unshard: got {len(parts)} shards for a group of degree {self.degree}; "
                "pass one shard per rank, in rank order"
            )
        values, rows = [], []
        for rank, part in enumerate(parts):
            layout = self if rank == self.rank else ZigzagLayout(self.seq_lens, self.degree, rank)
            if part.shape[0] != layout.num_local_tokens:
                raise ValueError(
                    f"ZigzagLayout.unshard: shard {rank} has {part.shape[0]} rows, its layout holds "
                    f"{layout.num_local_tokens}; pass each rank's unmodified shard"
                )
            valid = layout.valid.to(part.device)
            values.append(part[valid])
            rows.append(layout._source_rows.to(part.device)[valid])
        order = torch.argsort(torch.cat(rows))
        return torch.cat(values)[order]
