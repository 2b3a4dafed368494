"""Local attention block kernels that return the log-sum-exp, and their exact backward.

Context-parallel attention splits every sequence's attention into blocks (local queries against one
rank's keys) and merges the partial results with their log-sum-exp. A kernel here computes one block:

- ``forward(q, k, v, causal=, scale=, mask=) -> (out, lse)`` with q ``(Lq, Hq, D)``, k/v
  ``(Lk, Hkv, D)`` (GQA: Hq a multiple of Hkv), out ``(Lq, Hq, D)``, lse ``(Lq, Hq)`` in the
  accumulation dtype. ``causal`` is only used for square blocks. ``mask`` (a :class:`BlockMask`)
  restricts which keys each query sees; rows that see no key get ``lse = -inf`` and ``out = 0``.
- ``backward(dout, q, k, v, out, lse, ...) -> (dq, dk, dv)``: given the *final* (merged) ``out`` and
  ``lse`` of the rows, each block's gradient is exact, so blocks never need their own partial results.

Kernels: CPU's fused flash kernel, CUDA's memory-efficient SDPA kernel, Ascend's
``npu_fusion_attention`` (``torch_npu`` is imported only for NPU tensors), and a pure-math fallback.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Protocol

import torch


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp32 for half precision inputs, the input dtype otherwise (float64 stays exact)."""
    return torch.promote_types(dtype, torch.float32)


@dataclass(eq=False)
class BlockMask:
    """Which keys each query of a block may attend (``allowed``, bool ``(Lq, Lk)``), with cached forms."""

    allowed: torch.Tensor
    _additive: dict[tuple[torch.dtype, torch.device], torch.Tensor] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        self.rows_without_keys = ~self.allowed.any(dim=1)

    def additive(self, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """``0`` where allowed, ``-inf`` elsewhere, as a ``(Lq, Lk)`` tensor of ``dtype``."""
        key = (dtype, device)
        if key not in self._additive:
            bias = torch.zeros(self.allowed.shape, dtype=dtype)
            self._additive[key] = bias.masked_fill_(~self.allowed, float("-inf")).to(device)
        return self._additive[key]


class AttentionKernel(Protocol):
    name: str

    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        *,
        causal: bool,
        scale: float,
        mask: BlockMask | None,
    ) -> tuple[torch.Tensor, torch.Tensor]: ...

    def backward(
        self,
        dout: torch.Tensor,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        out: torch.Tensor,
        lse: torch.Tensor,
        *,
        causal: bool,
        scale: float,
        mask: BlockMask | None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]: ...


def _heads_first(x: torch.Tensor) -> torch.Tensor:
    """``(L, H, D)`` -> ``(1, H, L, D)`` view, the batch-head-sequence layout of fused kernels."""
    return x.transpose(0, 1).unsqueeze(0)


def _rows_first(x: torch.Tensor) -> torch.Tensor:
    """``(1, H, L, ...)`` -> ``(L, H, ...)``."""
    return x.squeeze(0).transpose(0, 1)


def _finite_lse(lse: torch.Tensor) -> torch.Tensor:
    """Rows that saw no key have ``lse = -inf``; ``exp(score - lse)`` must stay 0 there, not NaN."""
    return lse.masked_fill(lse == float("-inf"), 0.0)


def _mark_rows_without_keys(out: torch.Tensor, lse: torch.Tensor, mask: BlockMask | None) -> None:
    # Fused kernels return lse = 0 for fully masked rows; the merge needs -inf there.
    if mask is not None:
        rows = mask.rows_without_keys.to(out.device)
        lse[rows] = float("-inf")
        out[rows] = 0


class MathKernel:
    """Explicit softmax in the accumulation dtype: any device, any dtype, O(Lq * Lk) memory."""

    name = "math"

    @staticmethod
    def _scores(q, k, scale, causal, mask):
        length_q, heads_q, dim = q.shape
        heads_kv = k.shape[1]
        acc = accumulation_dtype(q.dtype)
        grouped_q = q.to(acc).view(length_q, heads_kv, heads_q // heads_kv, dim)
        scores = torch.einsum("qhgd,khd->hgqk", grouped_q, k.to(acc)) * scale
        if causal:
            scores = scores + torch.full_like(scores[0, 0], float("-inf")).triu_(1)
        if mask is not None:
            scores = scores + mask.additive(acc, q.device)
        return scores

    def forward(self, q, k, v, *, causal, scale, mask):
        scores = self._scores(q, k, scale, causal, mask)
        lse = torch.logsumexp(scores, dim=-1)
        probs = torch.exp(scores - _finite_lse(lse).unsqueeze(-1))
        out = torch.einsum("hgqk,khd->qhgd", probs, v.to(probs.dtype)).flatten(1, 2)
        return out, lse.flatten(0, 1).transpose(0, 1)

    def backward(self, dout, q, k, v, out, lse, *, causal, scale, mask):
        length_q, _, dim = q.shape
        heads_kv = k.shape[1]
        scores = self._scores(q, k, scale, causal, mask)
        acc = scores.dtype
        grouped_lse = _finite_lse(lse).to(acc).transpose(0, 1).reshape(heads_kv, -1, length_q, 1)
        probs = torch.exp(scores - grouped_lse)
        grouped_dout = dout.to(acc).view(length_q, heads_kv, -1, dim)
        delta = (dout.to(acc) * out.to(acc)).sum(-1).transpose(0, 1).reshape(heads_kv, -1, length_q, 1)
        dv = torch.einsum("hgqk,qhgd->khd", probs, grouped_dout)
        dprobs = torch.einsum("qhgd,khd->hgqk", grouped_dout, v.to(acc))
        dscores = probs * (dprobs - delta) * scale
        dq = torch.einsum("hgqk,khd->qhgd", dscores, k.to(acc)).flatten(1, 2)
        dk = torch.einsum("hgqk,qhgd->khd", dscores, q.to(acc).view(length_q, heads_kv, -1, dim))
        return dq, dk, dv


class CPUFlashKernel:
    """``aten._scaled_dot_product_flash_attention_for_cpu`` (fp64/fp32/bf16/fp16, GQA native)."""

    name = "cpu_flash"

    def forward(self, q, k, v, *, causal, scale, mask):
        bias = None if mask is None else mask.additive(q.dtype, q.device)
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            _heads_first(q), _heads_first(k), _heads_first(v), 0.0, causal, attn_mask=bias, scale=scale
        )
        out, lse = _rows_first(out), _rows_first(lse)
        _mark_rows_without_keys(out, lse, mask)
        return out, lse

    def backward(self, dout, q, k, v, out, lse, *, causal, scale, mask):
        bias = None if mask is None else mask.additive(q.dtype, q.device)
        grads = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
            _heads_first(dout.to(q.dtype)),
            _heads_first(q),
            _heads_first(k),
            _heads_first(v),
            _heads_first(out.to(q.dtype)),
            _finite_lse(lse).transpose(0, 1).unsqueeze(0).contiguous(),
            0.0,
            causal,
            attn_mask=bias,
            scale=scale,
        )
        return tuple(_rows_first(grad) for grad in grads)


def _repeat_kv(x: torch.Tensor, groups: int) -> torch.Tensor:
    return x if groups == 1 else x.repeat_interleave(groups, dim=1)


def _sum_kv_groups(grad: torch.Tensor, groups: int) -> torch.Tensor:
    return grad if groups == 1 else grad.unflatten(1, (-1, groups)).sum(2)


class CUDAEfficientKernel:
    """CUDA's memory-efficient SDPA kernel (fp32/bf16/fp16, additive masks); GQA by repeating K/V."""

    name = "cuda_efficient"

    @staticmethod
    def _bias(mask, dtype, device):
        if mask is None:
            return None
        # The kernel wants the bias row stride aligned to 16 elements.
        length_q, length_k = mask.allowed.shape
        aligned = torch.empty(length_q, -(-length_k // 16) * 16, dtype=dtype, device=device)
        aligned = aligned[:, :length_k]
        aligned.copy_(mask.additive(dtype, device))
        return aligned.expand(1, 1, length_q, length_k)

    def forward(self, q, k, v, *, causal, scale, mask):
        groups = q.shape[1] // k.shape[1]
        out, lse, _, _ = torch.ops.aten._scaled_dot_product_efficient_attention(
            _heads_first(q),
            _heads_first(_repeat_kv(k, groups)),
            _heads_first(_repeat_kv(v, groups)),
            self._bias(mask, q.dtype, q.device),
            True,
            0.0,
            causal,
            scale=scale,
        )
        out, lse = _rows_first(out), _rows_first(lse[..., : q.shape[0]])
        _mark_rows_without_keys(out, lse, mask)
        return out, lse

    def backward(self, dout, q, k, v, out, lse, *, causal, scale, mask):
        groups = q.shape[1] // k.shape[1]
        length_q = q.shape[0]
        lse = _finite_lse(lse).float().transpose(0, 1).unsqueeze(0)
        if torch.version.hip is None:  # the kernel's lse has its rows padded to a multiple of 32
            lse = torch.nn.functional.pad(lse, (0, -(-length_q // 32) * 32 - length_q))
        bias = self._bias(mask, q.dtype, q.device)
        no_seed = torch.zeros((), dtype=torch.long, device=q.device)
        dq, dk, dv, _ = torch.ops.aten._scaled_dot_product_efficient_attention_backward(
            _heads_first(dout.to(q.dtype)),
            _heads_first(q),
            _heads_first(_repeat_kv(k, groups)),
            _heads_first(_repeat_kv(v, groups)),
            bias,
            _heads_first(out.to(q.dtype)),
            lse.contiguous(),
            no_seed,
            no_seed,
            0.0,
            [True, True, True, False],
            causal,
            scale=scale,
        )
        return (
            _rows_first(dq),
            _sum_kv_groups(_rows_first(dk), groups),
            _sum_kv_groups(_rows_first(dv), groups),
        )


class NPUFusionKernel:
    """Ascend ``torch_npu.npu_fusion_attention`` (fp32/bf16/fp16, GQA native).

    The kernel keeps softmax max and sum (replicated over 8 lanes) instead of the lse; the backward
    gets the final lse as the max with a sum of 1, which makes ``exp(score - max) / sum`` exact.
    """

    name = "npu_fusion"
    _causal_masks: dict[torch.device, torch.Tensor] = {}  # noqa: RUF012 (shared cache by design)

    @classmethod
    def _sparse_args(cls, causal, mask, device):
        if mask is not None:
            return {"atten_mask": (~mask.allowed).to(device), "sparse_mode": 0}
        if causal:  # sparse mode 2 (top-left causal) takes a compressed 2048 x 2048 mask
            if device not in cls._causal_masks:
                ones = torch.ones(2048, 2048, dtype=torch.bool, device=device)
                cls._causal_masks[device] = torch.triu(ones, diagonal=1)
            return {"atten_mask": cls._causal_masks[device], "sparse_mode": 2}
        return {"sparse_mode": 0}

    def forward(self, q, k, v, *, causal, scale, mask):
        import torch_npu

        out, softmax_max, softmax_sum, *_ = torch_npu.npu_fusion_attention(
            _heads_first(q),
            _heads_first(k),
            _heads_first(v),
            q.shape[1],
            "BNSD",
            scale=scale,
            **self._sparse_args(causal, mask, q.device),
        )
        lse = softmax_max[..., 0] + torch.log(softmax_sum[..., 0])
        out, lse = _rows_first(out), _rows_first(lse)
        _mark_rows_without_keys(out, lse, mask)
        return out, lse

    def backward(self, dout, q, k, v, out, lse, *, causal, scale, mask):
        import torch_npu

        softmax_max = (
            _finite_lse(lse)
            .float()
            .transpose(0, 1)
            .unsqueeze(0)
            .unsqueeze(-1)
            .expand(-1, -1, -1, 8)
            .contiguous()
        )
        dq, dk, dv, *_ = torch_npu.npu_fusion_attention_grad(
            _heads_first(q),
            _heads_first(k),
            _heads_first(v),
            _heads_first(dout.to(q.dtype)),
            q.shape[1],
            "BNSD",
            softmax_max=softmax_max,
            softmax_sum=torch.ones_like(softmax_max),
            attention_in=_heads_first(out.to(q.dtype)),
            scale_value=scale,
            **self._sparse_args(causal, mask, q.device),
        )
        return _rows_first(dq), _rows_first(dk), _rows_first(dv)


KERNELS: dict[str, AttentionKernel] = {
    kernel.name: kernel
    for kernel in (MathKernel(), CPUFlashKernel(), CUDAEfficientKernel(), NPUFusionKernel())
}
_FUSED_DTYPES = {
    "cpu": (torch.float64, torch.float32, torch.bfloat16, torch.float16),
    "cuda": (torch.float32, torch.bfloat16, torch.float16),
    "npu": (torch.float32, torch.bfloat16, torch.float16),
}
_FUSED_KERNEL = {"cpu": "cpu_flash", "cuda": "cuda_efficient", "npu": "npu_fusion"}


def select_kernel(device: torch.device, dtype: torch.dtype, name: str | None = None) -> AttentionKernel:
    """The kernel for ``name`` ("math", "cpu_flash", ...), or the device's fused kernel when it takes
    ``dtype``, falling back to math."""
    if name is not None:
        if name not in KERNELS:
            raise ValueError(f"unknown attention kernel {name!r}; choose one of {sorted(KERNELS)}")
        return KERNELS[name]
    if dtype in _FUSED_DTYPES.get(device.type, ()):
        return KERNELS[_FUSED_KERNEL[device.type]]
    return KERNELS["math"]


def default_scale(head_dim: int) -> float:
    return 1.0 / math.sqrt(head_dim)
