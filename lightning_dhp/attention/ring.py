"""Ring pass-KV context-parallel attention (also the degree-1 local path, which sends nothing).

Forward: ``degree`` steps; each step first starts sending the current K/V to the next rank and
receiving the previous rank's, then computes on the current block, so the transfer hides behind the
compute. Backward: the same K/V ring, plus a second ring carrying each block's dK/dV accumulator (in
fp32 or better) from rank to rank until it arrives back at its owner.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.distributed as dist

from lightning_dhp.attention.blocks import AttentionProblem, backward_block, forward_block
from lightning_dhp.attention.kernels import accumulation_dtype

_KEY_VALUE_TAG = 0
_GRAD_TAG = 1


class RingExchange:
    """Point-to-point ring over the global ``ranks`` (in ring order) of ``group``."""

    def __init__(self, group: dist.ProcessGroup, ranks: Sequence[int], position: int) -> None:
        self.group = group
        self.next_rank = ranks[(position + 1) % len(ranks)]
        self.previous_rank = ranks[(position - 1) % len(ranks)]

    def start(self, tensor: torch.Tensor, tag: int) -> Callable[[], torch.Tensor]:
        """Send ``tensor`` to the next rank and receive the previous rank's; the returned call waits."""
        received = torch.empty_like(tensor)
        requests = dist.batch_isend_irecv(
            [
                dist.P2POp(dist.isend, tensor, self.next_rank, self.group, tag),
                dist.P2POp(dist.irecv, received, self.previous_rank, self.group, tag),
            ]
        )

        def wait() -> torch.Tensor:
            for request in requests:
                request.wait()
            return received

        return wait


def empty_output(q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Accumulators in the accumulation dtype: out ``(T, Hq, D)`` and lse ``(1, Hq, T)``."""
    dtype = accumulation_dtype(q.dtype)
    return (
        torch.empty(q.shape, dtype=dtype, device=q.device),
        torch.empty(1, q.shape[1], q.shape[0], dtype=dtype, device=q.device),
    )


class RingAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, problem: AttentionProblem, exchange: RingExchange | None):
        layout = problem.layout
        degree = layout.degree
        out, lse = empty_output(q)
        key_values = torch.stack([k, v]) if degree > 1 else (k, v)
        for step in range(degree):
            receive = exchange.start(key_values, _KEY_VALUE_TAG) if step + 1 < degree else None
            source = (layout.rank - step) % degree
            forward_block(problem, source, q, key_values[0], key_values[1], out, lse, first=step == 0)
            if step == 0:
                problem.zero_padding_rows(out)
            if receive is not None:
                key_values = receive()
        out = out.to(q.dtype)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.problem, ctx.exchange = problem, exchange
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse = ctx.saved_tensors
        problem, exchange = ctx.problem, ctx.exchange
        layout = problem.layout
        degree = layout.degree
        dtype = accumulation_dtype(q.dtype)
        dq = torch.empty(q.shape, dtype=dtype, device=q.device)
        key_values = torch.stack([k, v]) if degree > 1 else (k, v)
        receive_grads = None
        for step in range(degree):
            receive = exchange.start(key_values, _KEY_VALUE_TAG) if step + 1 < degree else None
            source = (layout.rank - step) % degree
            # The own block covers every real row; a visiting block may cover only part of its keys.
            make = torch.empty if step == 0 else torch.zeros
            grads = make((2, *k.shape), dtype=dtype, device=k.device)
            backward_block(
                problem,
                source,
                dout,
                q,
                key_values[0],
                key_values[1],
                out,
                lse,
                dq,
                grads[0],
                grads[1],
                first=step == 0,
            )
            if step == 0:
                problem.zero_padding_rows(dq, grads[0], grads[1])
            if receive_grads is not None:
                grads += receive_grads()
            if degree > 1:
                # After the last step the accumulator travels one hop further: back to its owner.
                receive_grads = exchange.start(grads, _GRAD_TAG)
            if receive is not None:
                key_values = receive()
        if receive_grads is not None:
            grads = receive_grads()
        return dq.to(q.dtype), grads[0].to(k.dtype), grads[1].to(v.dtype), None, None
