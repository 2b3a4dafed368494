"""All-gather context-parallel attention: gather every rank's K/V once, reduce-scatter dK/dV.

Simpler than the ring, one collective each way, but it holds all ``degree`` K/V blocks at once, so it
suits small groups. The own block is computed while the gather is in flight.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from lightning_dhp.attention.blocks import AttentionProblem, backward_block, forward_block
from lightning_dhp.attention.kernels import accumulation_dtype
from lightning_dhp.attention.ring import empty_output

_all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


def _start_gather(k: torch.Tensor, v: torch.Tensor, degree: int, group: dist.ProcessGroup):
    """Start gathering every rank's stacked K/V: a ``(degree, 2, T, Hkv, D)`` tensor and its work."""
    gathered = torch.empty((degree, 2, *k.shape), dtype=k.dtype, device=k.device)
    work = _all_gather(gathered.flatten(0, 1), torch.stack([k, v]), group=group, async_op=True)
    return gathered, work


class AllGatherAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, problem: AttentionProblem, group: dist.ProcessGroup):
        layout = problem.layout
        gathered, work = _start_gather(k, v, layout.degree, group)
        out, lse = empty_output(q)
        forward_block(problem, layout.rank, q, k, v, out, lse, first=True)
        problem.zero_padding_rows(out)
        work.wait()
        for source in range(layout.degree):
            if source != layout.rank:
                forward_block(problem, source, q, *gathered[source], out, lse, first=False)
        out = out.to(q.dtype)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.problem, ctx.group = problem, group
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse = ctx.saved_tensors
        problem, group = ctx.problem, ctx.group
        layout = problem.layout
        dtype = accumulation_dtype(q.dtype)
        gathered, work = _start_gather(k, v, layout.degree, group)
        dq = torch.empty(q.shape, dtype=dtype, device=q.device)
        grads = torch.zeros((layout.degree, 2, *k.shape), dtype=dtype, device=k.device)
        backward_block(problem, layout.rank, dout, q, k, v, out, lse, dq, *grads[layout.rank], first=True)
        problem.zero_padding_rows(dq)
        work.wait()
        for source in range(layout.degree):
            if source != layout.rank:
                backward_block(problem, source, dout, q, *gathered[source], out, lse, dq, *grads[source], first=False)
        key_value_grads = torch.empty((2, *k.shape), dtype=dtype, device=k.device)
        _reduce_scatter(key_value_grads, grads.flatten(0, 1), group=group)
        return dq.to(q.dtype), key_value_grads[0].to(k.dtype), key_value_grads[1].to(v.dtype), None, None
