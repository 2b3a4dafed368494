"""Which local queries attend which keys of one visiting rank, and running those blocks.

Rank ``r`` holds chunks ``r`` and ``2c-1-r`` of every sequence; the keys visiting from rank ``s`` hold
chunks ``s`` and ``2c-1-s``. Under causal attention (DESIGN.md section 5):

- ``s == r``: local queries against local keys, causal (the two chunks keep their global order);
- ``s < r``: all local queries against the head chunk of the visiting keys, no mask;
- ``s > r``: the tail chunk of the local queries against all visiting keys, no mask.

Non-causal attention pairs all local queries with all visiting keys. Padding rows sit at the end of
each sequence, so a rank's real rows of a sequence are a prefix of its local rows; blocks are cut to
those prefixes, which masks padded keys and leaves padding queries at ``out = 0``, ``lse = -inf``.

Blocks of short sequences are packed into masked tiles so a pack of many short sequences does not
pay one kernel call per sequence.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from lightning_dhp.attention.kernels import AttentionKernel, BlockMask
from lightning_dhp.attention.layout import ZigzagLayout

SMALL_BLOCK_ROWS = 64  # per-sequence blocks with at most this many query and key rows ...
TILE_ROWS = 256  # ... share masked kernel calls spanning at most this many rows


@dataclass(frozen=True)
class BlockCall:
    """One kernel call: local query rows ``[q_start, q_stop)`` against visiting key rows
    ``[k_start, k_stop)``, causal (square blocks only) or restricted by ``mask``."""

    q_start: int
    q_stop: int
    k_start: int
    k_stop: int
    causal: bool = False
    mask: BlockMask | None = None


def valid_prefix_lens(layout: ZigzagLayout, rank: int) -> list[int]:
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
    query_rows = valid_prefix_lens(layout, layout.rank)
    key_rows = valid_prefix_lens(layout, source)
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
    return tuple(_pack_small_calls(calls))


def _pack_small_calls(calls: list[BlockCall]) -> list[BlockCall]:
    packed: list[BlockCall] = []
    pending: list[BlockCall] = []

    def flush() -> None:
        if len(pending) == 1:
            packed.append(pending[0])
        elif pending:
            packed.append(_masked_tile(pending))
        pending.clear()

    for call in calls:
        if max(call.q_stop - call.q_start, call.k_stop - call.k_start) > SMALL_BLOCK_ROWS:
            flush()
            packed.append(call)
            continue
        if pending and max(call.q_stop - pending[0].q_start, call.k_stop - pending[0].k_start) > TILE_ROWS:
            flush()
        pending.append(call)
    flush()
    return packed


def _masked_tile(calls: list[BlockCall]) -> BlockCall:
    q_start, k_start = calls[0].q_start, calls[0].k_start
    allowed = torch.zeros(calls[-1].q_stop - q_start, calls[-1].k_stop - k_start, dtype=torch.bool)
    for call in calls:
        region = allowed[
            call.q_start - q_start : call.q_stop - q_start, call.k_start - k_start : call.k_stop - k_start
        ]
        region.fill_(True)
        if call.causal:
            region.tril_()
    return BlockCall(q_start, calls[-1].q_stop, k_start, calls[-1].k_stop, mask=BlockMask(allowed))


def merge_(out: torch.Tensor, lse: torch.Tensor, block_out: torch.Tensor, block_lse: torch.Tensor) -> None:
    """Fold a block's ``(block_out, block_lse)`` into the running ``(out, lse)`` in place.

    ``out <- out - sigmoid(lse_b - lse) * (out - out_b)``, ``lse <- logaddexp(lse, lse_b)``; a row with
    ``lse = lse_b = -inf`` (no key on either side) gets weight 0 instead of NaN.
    """
    weight = torch.sigmoid(block_lse - lse).nan_to_num_(0.0)
    out.sub_(weight.unsqueeze(-1) * (out - block_out))
    torch.logaddexp(lse, block_lse, out=lse)


def forward_block(
    kernel: AttentionKernel,
    calls: tuple[BlockCall, ...],
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: float,
    out: torch.Tensor,
    lse: torch.Tensor,
    *,
    first: bool,
) -> None:
    """Run ``calls`` and merge them into ``(out, lse)``; ``first`` overwrites instead (the calls of a
    block touch disjoint query rows)."""
    for call in calls:
        rows = slice(call.q_start, call.q_stop)
        keys = slice(call.k_start, call.k_stop)
        block_out, block_lse = kernel.forward(
            q[rows], k[keys], v[keys], causal=call.causal, scale=scale, mask=call.mask
        )
        if first:
            out[rows] = block_out
            lse[rows] = block_lse
        else:
            merge_(out[rows], lse[rows], block_out, block_lse)


def backward_block(
    kernel: AttentionKernel,
    calls: tuple[BlockCall, ...],
    dout: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    scale: float,
    dq: torch.Tensor,
    dk: torch.Tensor,
    dv: torch.Tensor,
) -> None:
    """Add the gradients of ``calls`` (exact, given the final ``out`` and ``lse``) into dq, dk, dv."""
    for call in calls:
        rows = slice(call.q_start, call.q_stop)
        keys = slice(call.k_start, call.k_stop)
        grad_q, grad_k, grad_v = kernel.backward(
            dout[rows],
            q[rows],
            k[keys],
            v[keys],
            out[rows],
            lse[rows],
            causal=call.causal,
            scale=scale,
            mask=call.mask,
        )
        dq[rows] += grad_q
        dk[keys] += grad_k
        dv[keys] += grad_v


@dataclass(frozen=True)
class AttentionProblem:
    """What a context-parallel attention call computes, apart from its tensors and its group."""

    layout: ZigzagLayout
    causal: bool
    scale: float
    kernel: AttentionKernel

    def calls(self, source: int) -> tuple[BlockCall, ...]:
        return block_calls(self.layout, source, self.causal)
