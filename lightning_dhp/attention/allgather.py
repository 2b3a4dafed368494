"""All-gather context-parallel attention: gather every rank's K/V once, reduce-scatter dK/dV.

Simpler than the ring and a single collective each way; it holds all ``degree`` K/V blocks at once, so
it suits small groups. The own block is computed while the gather is in flight.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from lightning_dhp.attention.blocks import AttentionProblem, backward_block, forward_block
from lightning_dhp.attention.kernels import accumulation_dtype

_all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


def _start_gather(key_values: torch.Tensor, degree: int, group: dist.ProcessGroup):
    gathered = torch.empty(
        (degree * 2, *key_values.shape[1:]), dtype=key_values.dtype, device=key_values.device
    )
    work = _all_gather(gathered, key_values, group=group, async_op=True)
    return gathered.view(degree, *key_values.shape), work


class AllGatherAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, problem: AttentionProblem, group: dist.ProcessGroup):
        layout = problem.layout
        gathered, work = _start_gather(torch.stack([k, v]), layout.degree, group)
        out = torch.zeros(q.shape, dtype=accumulation_dtype(q.dtype), device=q.device)
        lse = torch.full(q.shape[:2], float("-inf"), dtype=out.dtype, device=q.device)
        forward_block(
            problem.kernel, problem.calls(layout.rank), q, k, v, problem.scale, out, lse, first=True
        )
        work.wait()
        for source in range(layout.degree):
            if source != layout.rank:
                forward_block(
                    problem.kernel,
                    problem.calls(source),
                    q,
                    gathered[source, 0],
                    gathered[source, 1],
                    problem.scale,
                    out,
                    lse,
                    first=False,
                )
        out = out.to(q.dtype)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.problem, ctx.group = problem, group
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse = ctx.saved_tensors
        problem, group = ctx.problem, ctx.group
        layout = problem.layout
        acc = accumulation_dtype(q.dtype)
        gathered, work = _start_gather(torch.stack([k, v]), layout.degree, group)
        dq = torch.zeros(q.shape, dtype=acc, device=q.device)
        grads = torch.zeros((layout.degree, 2, *k.shape), dtype=acc, device=k.device)
        own = grads[layout.rank]
        backward_block(
            problem.kernel,
            problem.calls(layout.rank),
            dout,
            q,
            k,
            v,
            out,
            lse,
            problem.scale,
            dq,
            own[0],
            own[1],
        )
        work.wait()
        for source in range(layout.degree):
            if source != layout.rank:
                backward_block(
                    problem.kernel,
                    problem.calls(source),
                    dout,
                    q,
                    gathered[source, 0],
                    gathered[source, 1],
                    out,
                    lse,
                    problem.scale,
                    dq,
                    grads[source, 0],
                    grads[source, 1],
                )
        key_value_grads = torch.empty((2, *k.shape), dtype=acc, device=k.device)
        _reduce_scatter(key_value_grads, grads.flatten(0, 1), group=group)
        return dq.to(q.dtype), key_value_grads[0].to(k.dtype), key_value_grads[1].to(v.dtype), None, None
