"""Local attention block kernels that return the log-sum-exp, and their exact backward.

Context-parallel attention splits every sequence's attention into blocks (local queries against one
rank's keys) and merges the partial results with their log-sum-exp. A kernel computes one block of one
sequence:

- ``forward(q, k, v, causal=, scale=) -> (out, lse)``: q ``(Lq, Hq, D)``, k/v ``(Lk, Hkv, D)`` (GQA:
  Hq a multiple of Hkv); out ``(Lq, Hq, D)``; lse ``(Hq, Lq)`` in the accumulation dtype. ``causal``
  is only used for square blocks. Blocks are never empty, so every row sees at least one key.
- ``backward(dout, q, k, v, out, lse, causal=, scale=) -> (dq, dk, dv)``: given the *final* (merged)
  ``out`` and ``lse`` of the rows, each block's gradient is exact, so no block keeps its partial result.

Kernels: CPU's fused flash kernel, CUDA's memory-efficient SDPA kernel, Ascend's
``npu_fusion_attention`` (``torch_npu`` is imported only for NPU tensors), and a pure-math fallback.
The fused kernels accumulate half-precision inputs in fp32; the math kernel computes in fp32 or fp64.
"""

from __future__ import annotations

import math
from typing import Protocol

import torch


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp32 for half-precision inputs, the input dtype otherwise (float64 stays exact)."""
    return torch.promote_types(dtype, torch.float32)


def default_scale(head_dim: int) -> float:
    return 1.0 / math.sqrt(head_dim)


class AttentionKernel(Protocol):
    name: str

    def forward(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool, scale: float
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
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]: ...


def _heads_first(x: torch.Tensor) -> torch.Tensor:
    """``(L, H, D)`` -> ``(1, H, L, D)`` view, the batch-head-sequence layout of fused kernels."""
    return x.transpose(0, 1).unsqueeze(0)


def _contiguous_heads_first(x: torch.Tensor) -> torch.Tensor:
    """``(L, H, D)`` -> contiguous ``(1, H, L, D)``: the layout Ascend's BNSD kernels read."""
    return _heads_first(x).contiguous()


def _rows_first(x: torch.Tensor) -> torch.Tensor:
    """``(1, H, L, D)`` -> ``(L, H, D)`` view."""
    return x.squeeze(0).transpose(0, 1)


class MathKernel:
    """Explicit softmax in the accumulation dtype: any device and dtype, O(Lq * Lk) memory."""

    name = "math"

    @staticmethod
    def _grouped(x: torch.Tensor, heads_kv: int) -> torch.Tensor:
        """``(L, Hq, D)`` -> ``(L, Hkv, Hq // Hkv, D)`` in the accumulation dtype."""
        return x.to(accumulation_dtype(x.dtype)).unflatten(1, (heads_kv, -1))

    def _probabilities(self, q, k, lse, causal, scale):
        """Softmax probabilities ``(Hkv, G, Lq, Lk)``; with ``lse`` given, normalised by it."""
        scores = torch.einsum("qhgd,khd->hgqk", self._grouped(q, k.shape[1]), k.to(accumulation_dtype(k.dtype)))
        scores = scores * scale
        if causal:
            scores = scores.masked_fill(torch.ones_like(scores[0, 0], dtype=torch.bool).triu_(1), float("-inf"))
        known = lse is not None
        lse = lse.to(scores.dtype).unflatten(0, (k.shape[1], -1)) if known else torch.logsumexp(scores, -1)
        return torch.exp(scores - lse.unsqueeze(-1)), lse.flatten(0, 1)

    def forward(self, q, k, v, *, causal, scale):
        probs, lse = self._probabilities(q, k, None, causal, scale)
        out = torch.einsum("hgqk,khd->qhgd", probs, v.to(probs.dtype)).flatten(1, 2)
        return out, lse

    def backward(self, dout, q, k, v, out, lse, *, causal, scale):
        heads_kv = k.shape[1]
        probs, _ = self._probabilities(q, k, lse, causal, scale)
        grouped_dout = self._grouped(dout, heads_kv)
        # delta = rowsum(dout * out), the softmax backward's correction term.
        delta = (grouped_dout * self._grouped(out, heads_kv)).sum(-1).permute(1, 2, 0).unsqueeze(-1)
        dv = torch.einsum("hgqk,qhgd->khd", probs, grouped_dout)
        dprobs = torch.einsum("qhgd,khd->hgqk", grouped_dout, v.to(probs.dtype))
        dscores = probs * (dprobs - delta) * scale
        dq = torch.einsum("hgqk,khd->qhgd", dscores, k.to(probs.dtype)).flatten(1, 2)
        dk = torch.einsum("hgqk,qhgd->khd", dscores, self._grouped(q, heads_kv))
        return dq, dk, dv


class CPUFlashKernel:
    """``aten._scaled_dot_product_flash_attention_for_cpu`` (fp64/fp32/bf16/fp16, GQA native)."""

    name = "cpu_flash"

    def forward(self, q, k, v, *, causal, scale):
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            _heads_first(q), _heads_first(k), _heads_first(v), 0.0, causal, scale=scale
        )
        return _rows_first(out), lse.squeeze(0)

    def backward(self, dout, q, k, v, out, lse, *, causal, scale):
        grads = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
            _heads_first(dout.to(q.dtype)),
            _heads_first(q),
            _heads_first(k),
            _heads_first(v),
            _heads_first(out.to(q.dtype)),
            lse.unsqueeze(0),
            0.0,
            causal,
            scale=scale,
        )
        return tuple(_rows_first(grad) for grad in grads)


def _repeat_kv(x: torch.Tensor, groups: int) -> torch.Tensor:
    return x if groups == 1 else x.repeat_interleave(groups, dim=1)


def _sum_kv_groups(grad: torch.Tensor, groups: int) -> torch.Tensor:
    return grad if groups == 1 else grad.unflatten(1, (-1, groups)).sum(2)


class CUDAEfficientKernel:
    """CUDA's memory-efficient SDPA kernel (fp32/bf16/fp16); GQA by repeating K/V heads."""

    name = "cuda_efficient"

    def forward(self, q, k, v, *, causal, scale):
        groups = q.shape[1] // k.shape[1]
        out, lse, _, _ = torch.ops.aten._scaled_dot_product_efficient_attention(
            _heads_first(q),
            _heads_first(_repeat_kv(k, groups)),
            _heads_first(_repeat_kv(v, groups)),
            None,
            True,
            0.0,
            causal,
            scale=scale,
        )
        return _rows_first(out), lse[0, :, : q.shape[0]]

    def backward(self, dout, q, k, v, out, lse, *, causal, scale):
        groups = q.shape[1] // k.shape[1]
        length_q = q.shape[0]
        lse = lse.float().unsqueeze(0)
        if torch.version.hip is None:  # the kernel's lse has its rows padded to a multiple of 32
            lse = torch.nn.functional.pad(lse, (0, -(-length_q // 32) * 32 - length_q))
        no_seed = torch.zeros((), dtype=torch.long, device=q.device)
        dq, dk, dv, _ = torch.ops.aten._scaled_dot_product_efficient_attention_backward(
            _heads_first(dout.to(q.dtype)),
            _heads_first(q),
            _heads_first(_repeat_kv(k, groups)),
            _heads_first(_repeat_kv(v, groups)),
            None,
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

    The kernel keeps the softmax max and sum (replicated over 8 lanes) instead of the lse; the backward
    gets the final lse as the max and a sum of 1, which makes ``exp(score - max) / sum`` exact.
    """

    name = "npu_fusion"

    def __init__(self) -> None:
        self._causal_masks: dict[torch.device, torch.Tensor] = {}

    def _sparse_args(self, causal: bool, device: torch.device) -> dict:
        if not causal:
            return {"sparse_mode": 0}
        # Sparse mode 2 (causal from the top-left corner) takes a compressed 2048 x 2048 mask.
        if device not in self._causal_masks:
            self._causal_masks[device] = torch.ones(2048, 2048, dtype=torch.bool, device=device).triu_(1)
        return {"atten_mask": self._causal_masks[device], "sparse_mode": 2}

    def forward(self, q, k, v, *, causal, scale):
        import torch_npu

        out, softmax_max, softmax_sum, *_ = torch_npu.npu_fusion_attention(
            _contiguous_heads_first(q),
            _contiguous_heads_first(k),
            _contiguous_heads_first(v),
            q.shape[1],
            "BNSD",
            scale=scale,
            **self._sparse_args(causal, q.device),
        )
        lse = softmax_max[0, ..., 0] + torch.log(softmax_sum[0, ..., 0])
        return _rows_first(out), lse

    def backward(self, dout, q, k, v, out, lse, *, causal, scale):
        import torch_npu

        softmax_max = lse.float()[None, :, :, None].expand(-1, -1, -1, 8).contiguous()
        dq, dk, dv, *_ = torch_npu.npu_fusion_attention_grad(
            _contiguous_heads_first(q),
            _contiguous_heads_first(k),
            _contiguous_heads_first(v),
            _contiguous_heads_first(dout.to(q.dtype)),
            q.shape[1],
            "BNSD",
            softmax_max=softmax_max,
            softmax_sum=torch.ones_like(softmax_max),
            attention_in=_contiguous_heads_first(out.to(q.dtype)),
            scale_value=scale,
            **self._sparse_args(causal, q.device),
        )
        return _rows_first(dq), _rows_first(dk), _rows_first(dv)


KERNELS: dict[str, AttentionKernel] = {
    kernel.name: kernel for kernel in (MathKernel(), CPUFlashKernel(), CUDAEfficientKernel(), NPUFusionKernel())
}
_FUSED = {
    "cpu": ("cpu_flash", (torch.float64, torch.float32, torch.bfloat16, torch.float16)),
    "cuda": ("cuda_efficient", (torch.float32, torch.bfloat16, torch.float16)),
    "npu": ("npu_fusion", (torch.float32, torch.bfloat16, torch.float16)),
}


def select_kernel(device: torch.device, dtype: torch.dtype, name: str | None = None) -> AttentionKernel:
    """The kernel called ``name``, or else the device's fused kernel when it takes ``dtype``, or math."""
    if name is not None:
        if name not in KERNELS:
            raise ValueError(f"unknown attention kernel {name!r}; choose one of {sorted(KERNELS)}")
        return KERNELS[name]
    fused_name, dtypes = _FUSED.get(device.type, ("math", ()))
    return KERNELS[fused_name] if dtype in dtypes else KERNELS["math"]
