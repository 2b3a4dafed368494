"""``cp_attention``: the one entry point models call for (context-parallel) packed attention."""

from __future__ import annotations

import functools
from collections.abc import Sequence

import torch
import torch.distributed as dist

from lightning_dhp.attention.allgather import AllGatherAttention
from lightning_dhp.attention.blocks import AttentionProblem
from lightning_dhp.attention.kernels import default_scale, select_kernel
from lightning_dhp.attention.layout import ZigzagLayout
from lightning_dhp.attention.ring import RingAttention, RingExchange
from lightning_dhp.distributed.context import CP_IMPLEMENTATIONS, current_cp_context, missing_context_reason


@functools.lru_cache(maxsize=16)
def _single_sequence_layout(num_tokens: int) -> ZigzagLayout:
    return ZigzagLayout([num_tokens], 1, 0)


@torch.compiler.disable
def cp_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    layout: ZigzagLayout | None = None,
    group: dist.ProcessGroup | None = None,
    *,
    causal: bool = True,
    scale: float | None = None,
    implementation: str | None = None,
    ranks: Sequence[int] | None = None,
    kernel: str | None = None,
) -> torch.Tensor:
    """Attention of packed sequences, context-parallel over ``layout.degree`` ranks.

    q ``(T_local, Hq, D)`` and k/v ``(T_local, Hkv, D)`` hold this rank's rows of ``layout`` (GQA:
    Hq a multiple of Hkv). Returns ``(T_local, Hq, D)`` in q's dtype; attention never crosses sequence
    boundaries, padded keys are never attended, and padding rows come out as 0 and pass no gradient.
    Under autocast, q, k and v are first cast to its lower-precision dtype, as
    ``F.scaled_dot_product_attention`` takes them (a float32 RoPE makes q and k float32 while v stays bf16).

    Without ``layout`` the current :class:`~lightning_dhp.distributed.CPContext` supplies layout, group,
    ranks and implementation; with no context all rows form one sequence on this rank (unless the
    strategy requires a context, then this raises). At degree > 1, ``group`` is the ring's process
    group; with the WORLD group and ``ranks`` (global ranks in ring order) the ring runs group-free.
    ``implementation`` is "ring" (default) or "allgather"; ``kernel`` forces a local kernel ("math",
    "cpu_flash", "cuda_flash", "flash_attn", "cuda_efficient", "cuda_efficient_per_sequence", "npu_fusion").

    Under ``torch.compile`` it runs eagerly and the model's other layers compile around it: its layout
    and process group change with every round's plan, so a traced graph would recompile for each.
    """
    q, k, v = _follow_autocast(q, k, v)
    _check_shapes(q, k, v)
    if layout is None:
        context = current_cp_context()
        if context is not None:
            layout = context.layout
            group = context.group if group is None else group
            ranks = context.ranks if ranks is None else ranks
            implementation = context.implementation if implementation is None else implementation
        else:
            reason = missing_context_reason()
            if reason is not None:
                raise RuntimeError(reason)
            layout = _single_sequence_layout(q.shape[0])
    implementation = "ring" if implementation is None else implementation
    if implementation not in CP_IMPLEMENTATIONS:
        raise ValueError(f"cp_attention: unknown implementation {implementation!r}; use one of {CP_IMPLEMENTATIONS}")
    if q.shape[0] != layout.num_local_tokens:
        raise ValueError(
            f"cp_attention: q, k, v have {q.shape[0]} rows but {layout} holds {layout.num_local_tokens} "
            "local rows; shard the packed batch with layout.shard(x)"
        )
    problem = AttentionProblem(
        layout,
        causal,
        default_scale(q.shape[-1]) if scale is None else float(scale),
        select_kernel(q.device, q.dtype, kernel, head_dim=q.shape[-1]),
    )
    if layout.degree == 1:
        return RingAttention.apply(q, k, v, problem, None)
    group, ranks = _check_group(layout, group, ranks, implementation)
    if implementation == "allgather":
        return AllGatherAttention.apply(q, k, v, problem, group)
    return RingAttention.apply(q, k, v, problem, RingExchange(group, ranks, layout.rank))


def _follow_autocast(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """q, k and v in the autocast dtype of their device type when autocast is on there (float64 stays, as
    autocast leaves it); otherwise as they are."""
    device_type = q.device.type
    if not torch.amp.is_autocast_available(device_type) or not torch.is_autocast_enabled(device_type):
        return q, k, v
    dtype = torch.get_autocast_dtype(device_type)
    return tuple(x.to(dtype) if x.is_floating_point() and x.dtype != torch.float64 else x for x in (q, k, v))


def _check_shapes(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    for name, tensor in (("q", q), ("k", k), ("v", v)):
        if tensor.dim() != 3:
            raise ValueError(
                f"cp_attention: {name} has shape {tuple(tensor.shape)}; expected (T_local, heads, head_dim) "
                "rows of the packed batch"
            )
    if k.shape != v.shape:
        raise ValueError(f"cp_attention: k has shape {tuple(k.shape)} but v has {tuple(v.shape)}; they must match")
    if q.shape[0] != k.shape[0] or q.shape[2] != k.shape[2]:
        raise ValueError(
            f"cp_attention: q has shape {tuple(q.shape)} and k {tuple(k.shape)}; they need the same number "
            "of rows and the same head_dim"
        )
    if k.shape[1] == 0 or q.shape[1] % k.shape[1] != 0:
        raise ValueError(
            f"cp_attention: q has {q.shape[1]} heads and k/v {k.shape[1]}; for grouped-query attention the "
            "query heads must be a multiple of the key/value heads"
        )
    if not (q.dtype == k.dtype == v.dtype) or not (q.device == k.device == v.device):
        raise ValueError(
            "cp_attention: q, k, v must share dtype and device, got "
            f"{q.dtype}/{q.device}, {k.dtype}/{k.device}, {v.dtype}/{v.device}"
        )
    if not q.is_floating_point():
        raise ValueError(f"cp_attention: q, k, v must be floating point, got {q.dtype}")


def _check_group(
    layout: ZigzagLayout, group: dist.ProcessGroup | None, ranks: Sequence[int] | None, implementation: str
) -> tuple[dist.ProcessGroup, tuple[int, ...]]:
    """The group and the ring's global ranks, checked against the layout without communicating."""
    degree = layout.degree
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError(
            f"cp_attention: {layout} spans {degree} ranks but torch.distributed is not initialised; "
            "call init_process_group first or use a degree-1 layout"
        )
    if group is None:
        raise ValueError(
            f"cp_attention: {layout} spans {degree} ranks and needs their process group: pass group= (or the "
            "WORLD group with ranks=) or run inside a CPContext"
        )
    group_ranks = tuple(dist.get_process_group_ranks(group))
    is_world = group_ranks == tuple(range(dist.get_world_size()))
    ranks = group_ranks if ranks is None else tuple(int(rank) for rank in ranks)
    if ranks != group_ranks and not is_world:
        raise ValueError(
            f"cp_attention: ranks={list(ranks)} differ from the group's ranks {list(group_ranks)}; pass the "
            "group's ranks in group order, or the WORLD group for a group-free ring"
        )
    if len(ranks) != degree:
        raise ValueError(
            f"cp_attention: {layout} has degree {degree} but the ring has {len(ranks)} ranks {list(ranks)}; "
            f"build the layout with degree={len(ranks)} or pass the group (or ranks) of {degree} ranks"
        )
    if len(set(ranks)) != degree or not all(0 <= rank < dist.get_world_size() for rank in ranks):
        raise ValueError(
            f"cp_attention: ranks={list(ranks)} must be {degree} distinct global ranks below the world size "
            f"{dist.get_world_size()}"
        )
    if ranks[layout.rank] != dist.get_rank():
        raise ValueError(
            f"cp_attention: this process is global rank {dist.get_rank()} but the layout's rank "
            f"{layout.rank} is global rank {ranks[layout.rank]} of ranks {list(ranks)}; build the layout "
            "with this process's position in the ring"
        )
    if implementation == "allgather" and ranks != group_ranks:
        raise ValueError(
            "cp_attention: implementation='allgather' runs collectives over its group, but "
            f"ranks={list(ranks)} is only part of the WORLD group; pass the subgroup of these ranks or use "
            "implementation='ring'"
        )
    return group, ranks
