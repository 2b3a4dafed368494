"""Which local queries attend which keys of one visiting rank, and running those blocks.

Rank ``r`` holds chunks ``r`` and ``2c-1-r`` of every sequence; the keys visiting from rank ``s`` hold
chunks ``s`` and ``2c-1-s``. Under causal attention (docs/design.md, Attention):

- ``s == r``: local queries against local keys, causal (the two chunks keep their global order);
- ``s < r``: all local queries against the head chunk of the visiting keys, no mask;
- ``s > r``: the tail chunk of the local queries against all visiting keys, no mask.

Non-causal attention pairs all local queries with all visiting keys. Padding rows sit at the end of
each sequence, so a rank's real rows of a sequence are a prefix of its local rows; every block is cut
to those prefixes. That masks padded keys without a mask tensor, never runs an empty block (no row
ever has an lse of -inf to guard), and leaves padding queries out of every block: the own block
(``s == r``) covers exactly the real query rows, so callers write it first and zero the rest.

Sequence kernels get one call per sequence and block, on views of the packed rows. On CPU that beats
one call on a padded batch (see benchmarks/attention_bench.py) and packing short sequences into masked
tiles (measured while building this: 512 sequences of 8-64 tokens took 108 ms with a call per sequence
against 135-400 ms with 128-512-row tiles). Varlen kernels (CUDA) get one call per block for the whole
pack: the block's rows are gathered into contiguous packed tensors with cumulative sequence lengths
(:class:`PackedBlock`; no copy where they already are one contiguous range) and scattered back.
"""

from __future__ import annotations

import functools
import itertools
from dataclasses import dataclass

import torch

from lightning_dhp.attention.kernels import AttentionKernel, VarlenBlock, heads_first
from lightning_dhp.attention.layout import ZigzagLayout


@dataclass(frozen=True)
class BlockCall:
    """One kernel call: local query rows ``[q_start, q_stop)`` against visiting key rows
    ``[k_start, k_stop)``; ``causal`` only on square blocks of the own rank."""

    q_start: int
    q_stop: int
    k_start: int
    k_stop: int
    causal: bool = False


def real_prefix_lens(layout: ZigzagLayout, rank: int) -> list[int]:
    """Real (non-padding) local rows of each sequence on ``rank`` of the layout's group."""
    if layout.degree == 1:
        return list(layout.seq_lens)
    chunks = 2 * layout.degree
    prefixes = []
    for length, padded in zip(layout.seq_lens, layout.padded_lens, strict=True):
        chunk = padded // chunks
        head = min(max(length - rank * chunk, 0), chunk)
        tail = min(max(length - (chunks - 1 - rank) * chunk, 0), chunk)
        prefixes.append(head + tail)
    return prefixes


@functools.lru_cache(maxsize=256)
def block_calls(layout: ZigzagLayout, source: int, causal: bool) -> tuple[BlockCall, ...]:
    """The kernel calls of this rank's queries against the keys of group rank ``source``.

    Cached: every attention layer of a micro-step asks for the same calls.
    """
    query_rows = real_prefix_lens(layout, layout.rank)
    key_rows = real_prefix_lens(layout, source)
    starts = layout.local_cu_seqlens.tolist()
    calls = []
    for start, stop, real_queries, real_keys in zip(starts, starts[1:], query_rows, key_rows, strict=False):
        half = (stop - start) // 2
        if source == layout.rank:
            call = BlockCall(start, start + real_queries, start, start + real_queries, causal=causal)
        elif not causal:
            call = BlockCall(start, start + real_queries, start, start + real_keys)
        elif source < layout.rank:
            call = BlockCall(start, start + real_queries, start, start + min(real_keys, half))
        else:
            call = BlockCall(start + half, start + max(real_queries, half), start, start + real_keys)
        if call.q_stop > call.q_start and call.k_stop > call.k_start:
            calls.append(call)
    return tuple(calls)


@dataclass(frozen=True)
class AttentionProblem:
    """What a context-parallel attention call computes, apart from its tensors and its group."""

    layout: ZigzagLayout
    causal: bool
    scale: float
    kernel: AttentionKernel

    def calls(self, source: int) -> tuple[BlockCall, ...]:
        return block_calls(self.layout, source, self.causal)

    def zero_padding_rows(self, *tensors: torch.Tensor) -> None:
        """Zero the padding rows (dim 0) of tensors whose real rows the own block wrote (a masked fill: no
        host sync, unlike assigning through a boolean index)."""
        padding = _padding_rows(self.layout, tensors[0].device)
        if padding is not None:
            for tensor in tensors:
                tensor.masked_fill_(padding.view(-1, *[1] * (tensor.dim() - 1)), 0)


@functools.lru_cache(maxsize=256)
def _padding_rows(layout: ZigzagLayout, device: torch.device) -> torch.Tensor | None:
    """The layout's padding rows as a mask on ``device``, None when it has none. Cached per layout and device:
    every attention layer of a micro-step asks, and each would otherwise copy the mask to the device."""
    padding = ~layout.valid
    return padding.to(device) if bool(padding.any()) else None


Rows = slice | torch.Tensor  # local rows of a packed block: one range, or indices where it has gaps


@dataclass(frozen=True)
class PackedBlock:
    """The calls of one block as one varlen call: the local query and key rows taking part (packed
    in call order) and their sequence boundaries, on one device."""

    query_rows: Rows
    key_rows: Rows
    varlen: VarlenBlock


def _packed_rows(ranges: list[tuple[int, int]], device: torch.device) -> Rows:
    if all(stop == start for (_, stop), (start, _) in itertools.pairwise(ranges)):
        return slice(ranges[0][0], ranges[-1][1])
    return torch.cat([torch.arange(start, stop) for start, stop in ranges]).to(device)


@functools.lru_cache(maxsize=256)
def packed_block(layout: ZigzagLayout, source: int, causal: bool, device: torch.device) -> PackedBlock | None:
    """The block against ``source``'s keys as one varlen call, or None when it has no rows.

    Cached per device: every attention layer of a micro-step asks for the same block.
    """
    calls = block_calls(layout, source, causal)
    if not calls:
        return None
    query_lens = [call.q_stop - call.q_start for call in calls]
    key_lens = [call.k_stop - call.k_start for call in calls]
    query_sequence = torch.repeat_interleave(torch.arange(len(calls)), torch.tensor(query_lens))
    query_offsets, key_offsets = (0, *itertools.accumulate(query_lens)), (0, *itertools.accumulate(key_lens))
    starts = torch.tensor(query_offsets[:-1])
    varlen = VarlenBlock(
        cu_seqlens_q=torch.tensor(query_offsets, dtype=torch.int32, device=device),
        cu_seqlens_k=torch.tensor(key_offsets, dtype=torch.int32, device=device),
        cu_seqlens_q_host=query_offsets,
        cu_seqlens_k_host=key_offsets,
        max_seqlen_q=max(query_lens),
        max_seqlen_k=max(key_lens),
        causal=calls[0].causal,  # only the own block is causal, and all its calls are
        query_sequence=query_sequence.to(device),
        query_offset=(torch.arange(len(query_sequence)) - starts[query_sequence]).to(device),
    )
    return PackedBlock(
        _packed_rows([(call.q_start, call.q_stop) for call in calls], device),
        _packed_rows([(call.k_start, call.k_stop) for call in calls], device),
        varlen,
    )


def _read(x: torch.Tensor, rows: Rows) -> torch.Tensor:
    """``x``'s rows (dim 0): a view for a range, a copy for indices."""
    return x[rows] if isinstance(rows, slice) else x.index_select(0, rows)


def _write(x: torch.Tensor, rows: Rows, values: torch.Tensor, *, add: bool) -> None:
    if isinstance(rows, slice):
        if add:
            x[rows].add_(values)
        else:
            x[rows].copy_(values)
    elif add:
        x.index_add_(0, rows, values.to(x.dtype))
    else:
        x.index_copy_(0, rows, values.to(x.dtype))


def merge_(out: torch.Tensor, lse: torch.Tensor, block_out: torch.Tensor, block_lse: torch.Tensor) -> None:
    """Fold a block's ``(block_out, block_lse)`` into the running ``(out, lse)`` in place (fp32+):
    ``out <- out - sigmoid(lse_b - lse) * (out - out_b)``, ``lse <- logaddexp(lse, lse_b)``.
    Works on any layout where lse is out without its last (head_dim) axis."""
    out.sub_(torch.sigmoid(block_lse - lse).unsqueeze(-1) * (out - block_out))
    lse.copy_(torch.logaddexp(lse, block_lse))


def forward_block(
    problem: AttentionProblem,
    source: int,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    *,
    first: bool,
) -> None:
    """Merge the block against ``source``'s keys into ``(out, lse)``; ``first`` writes instead (the
    calls of a block touch disjoint rows). Packed rows ``(T, H, D)``, except lse ``(1, H, T)``."""
    if problem.kernel.varlen:
        _forward_packed(problem, source, q, k, v, out, lse, first=first)
        return
    q, k, v, out = (heads_first(x) for x in (q, k, v, out))
    for call in problem.calls(source):
        rows = (2, call.q_start, call.q_stop - call.q_start)
        keys = (2, call.k_start, call.k_stop - call.k_start)
        block_out, block_lse = problem.kernel.forward(
            q.narrow(*rows), k.narrow(*keys), v.narrow(*keys), causal=call.causal, scale=problem.scale
        )
        if first:
            out.narrow(*rows).copy_(block_out)
            lse.narrow(*rows).copy_(block_lse)
        else:
            merge_(out.narrow(*rows), lse.narrow(*rows), block_out, block_lse)


def _forward_packed(problem, source, q, k, v, out, lse, *, first):
    block = packed_block(problem.layout, source, problem.causal, q.device)
    if block is None:
        return
    rows, keys = block.query_rows, block.key_rows
    block_out, block_lse = problem.kernel.forward(
        _read(q, rows).contiguous(),
        _read(k, keys).contiguous(),
        _read(v, keys).contiguous(),
        block.varlen,
        scale=problem.scale,
    )
    lse_by_row = lse[0].t()  # (T, H) view of the accumulator
    if first:
        _write(out, rows, block_out, add=False)
        _write(lse_by_row, rows, block_lse.t(), add=False)
        return
    out_rows, lse_rows = _read(out, rows), _read(lse_by_row, rows)
    merge_(out_rows, lse_rows, block_out, block_lse.t())
    if not isinstance(rows, slice):  # merged into copies: write them back
        _write(out, rows, out_rows, add=False)
        _write(lse_by_row, rows, lse_rows, add=False)


def backward_block(
    problem: AttentionProblem,
    source: int,
    dout: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    dq: torch.Tensor,
    dk: torch.Tensor,
    dv: torch.Tensor,
    *,
    first: bool,
) -> None:
    """Add the block's gradients (exact, given the final ``out`` and ``lse``) into dq, dk, dv;
    ``first`` writes instead. Packed rows ``(T, H, D)``, except lse ``(1, H, T)``."""
    if problem.kernel.varlen:
        _backward_packed(problem, source, dout, q, k, v, out, lse, dq, dk, dv, first=first)
        return
    dout, q, k, v, out, dq, dk, dv = (heads_first(x) for x in (dout, q, k, v, out, dq, dk, dv))
    for call in problem.calls(source):
        rows = (2, call.q_start, call.q_stop - call.q_start)
        keys = (2, call.k_start, call.k_stop - call.k_start)
        grads = problem.kernel.backward(
            dout.narrow(*rows),
            q.narrow(*rows),
            k.narrow(*keys),
            v.narrow(*keys),
            out.narrow(*rows),
            lse.narrow(*rows),
            causal=call.causal,
            scale=problem.scale,
        )
        for accumulator, index, grad in zip((dq, dk, dv), (rows, keys, keys), grads, strict=True):
            if first:
                accumulator.narrow(*index).copy_(grad)
            else:
                accumulator.narrow(*index).add_(grad)


def _backward_packed(problem, source, dout, q, k, v, out, lse, dq, dk, dv, *, first):
    block = packed_block(problem.layout, source, problem.causal, q.device)
    if block is None:
        return
    rows, keys = block.query_rows, block.key_rows
    grads = problem.kernel.backward(
        _read(dout, rows).to(q.dtype).contiguous(),
        _read(q, rows).contiguous(),
        _read(k, keys).contiguous(),
        _read(v, keys).contiguous(),
        _read(out, rows).to(q.dtype).contiguous(),
        _read(lse[0].t(), rows).t().contiguous(),
        block.varlen,
        scale=problem.scale,
    )
    for accumulator, index, grad in zip((dq, dk, dv), (rows, keys, keys), grads, strict=True):
        _write(accumulator, index, grad, add=not first)
