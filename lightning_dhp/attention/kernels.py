"""Local attention block kernels that return the log-sum-exp, and their exact backward.

Context-parallel attention splits every sequence's attention into blocks (local queries against one
rank's keys) and merges the partial results with their log-sum-exp. A kernel computes one block of one
sequence, on the batch-head-sequence views fused kernels read (strided views of the packed tensors):

- ``forward(q, k, v, causal=, scale=) -> (out, lse)``: q ``(1, Hq, Lq, D)``, k/v ``(1, Hkv, Lk, D)``
  (GQA: Hq a multiple of Hkv); out ``(1, Hq, Lq, D)``; lse ``(1, Hq, Lq)`` in the accumulation dtype.
  ``causal`` is only used for square blocks. Blocks are never empty: every row sees at least one key.
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


def heads_first(x: torch.Tensor) -> torch.Tensor:
    """Packed rows ``(T, H, D)`` -> ``(1, H, T, D)`` view (also ``(T, H)`` -> ``(1, H, T)``)."""
    return x.transpose(0, 1).unsqueeze(0)


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


class MathKernel:
    """Explicit softmax in the accumulation dtype: any device and dtype, O(Lq * Lk) memory."""

    name = "math"

    @staticmethod
    def _unbatched(x: torch.Tensor) -> torch.Tensor:
        """``(1, H, L, ...)`` -> ``(H, L, ...)`` in the accumulation dtype."""
        return x[0].to(accumulation_dtype(x.dtype))

    def _grouped(self, x: torch.Tensor, heads_kv: int) -> torch.Tensor:
        """Query-head tensors ``(1, Hq, L, ...)`` -> ``(Hkv, Hq // Hkv, L, ...)``."""
        return self._unbatched(x).unflatten(0, (heads_kv, -1))

    def _probabilities(self, q, k, lse, causal, scale):
        """Softmax probabilities ``(Hkv, G, Lq, Lk)`` and lse ``(Hkv, G, Lq)``; normalised by ``lse``
        when it is given (the backward), else by their own."""
        heads_kv = k.shape[1]
        scores = torch.einsum("hgqd,hkd->hgqk", self._grouped(q, heads_kv), self._unbatched(k))
        scores = scores * scale
        if causal:
            scores = scores.masked_fill(torch.ones_like(scores[0, 0], dtype=torch.bool).triu_(1), float("-inf"))
        lse = torch.logsumexp(scores, -1) if lse is None else self._grouped(lse, heads_kv)
        return torch.exp(scores - lse.unsqueeze(-1)), lse

    def forward(self, q, k, v, *, causal, scale):
        probs, lse = self._probabilities(q, k, None, causal, scale)
        out = torch.einsum("hgqk,hkd->hgqd", probs, self._unbatched(v))
        return out.flatten(0, 1).unsqueeze(0), lse.flatten(0, 1).unsqueeze(0)

    def backward(self, dout, q, k, v, out, lse, *, causal, scale):
        heads_kv = k.shape[1]
        probs, _ = self._probabilities(q, k, lse, causal, scale)
        grouped_dout = self._grouped(dout, heads_kv)
        # delta = rowsum(dout * out), the softmax backward's correction term.
        delta = (grouped_dout * self._grouped(out, heads_kv)).sum(-1, keepdim=True)
        dv = torch.einsum("hgqk,hgqd->hkd", probs, grouped_dout)
        dprobs = torch.einsum("hgqd,hkd->hgqk", grouped_dout, self._unbatched(v))
        dscores = probs * (dprobs - delta) * scale
        dq = torch.einsum("hgqk,hkd->hgqd", dscores, self._unbatched(k)).flatten(0, 1)
        dk = torch.einsum("hgqk,hgqd->hkd", dscores, self._grouped(q, heads_kv))
        return dq.unsqueeze(0), dk.unsqueeze(0), dv.unsqueeze(0)


class CPUFlashKernel:
    """``aten._scaled_dot_product_flash_attention_for_cpu`` (fp64/fp32/bf16/fp16, GQA native)."""

    name = "cpu_flash"

    def forward(self, q, k, v, *, causal, scale):
        return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, causal, scale=scale)

    def backward(self, dout, q, k, v, out, lse, *, causal, scale):
        return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
            dout.to(q.dtype), q, k, v, out.to(q.dtype), lse, 0.0, causal, scale=scale
        )


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
            q, _repeat_kv(k, groups), _repeat_kv(v, groups), None, True, 0.0, causal, scale=scale
        )
        return out, lse[..., : q.shape[2]]

    def backward(self, dout, q, k, v, out, lse, *, causal, scale):
        groups = q.shape[1] // k.shape[1]
        length_q = q.shape[2]
        lse = lse.float()
        if torch.version.hip is None:  # the kernel's lse has its rows padded to a multiple of 32
            lse = torch.nn.functional.pad(lse, (0, -(-length_q // 32) * 32 - length_q))
        no_seed = torch.zeros((), dtype=torch.long, device=q.device)
        dq, dk, dv, _ = torch.ops.aten._scaled_dot_product_efficient_attention_backward(
            dout.to(q.dtype),
            q,
            _repeat_kv(k, groups),
            _repeat_kv(v, groups),
            None,
            out.to(q.dtype),
            lse.contiguous(),
            no_seed,
            no_seed,
            0.0,
            [True, True, True, False],
            causal,
            scale=scale,
        )
        return dq, _sum_kv_groups(dk, groups), _sum_kv_groups(dv, groups)


class NPUFusionKernel:
    """Ascend ``torch_npu.npu_fusion_attention`` (fp32/bf16/fp16, GQA native), BNSD layout.

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
            q.contiguous(),
            k.contiguous(),
            v.contiguous(),
            q.shape[1],
            "BNSD",
            scale=scale,
            **self._sparse_args(causal, q.device),
        )
        return out, softmax_max[..., 0] + torch.log(softmax_sum[..., 0])

    def backward(self, dout, q, k, v, out, lse, *, causal, scale):
        import torch_npu

        softmax_max = lse.float().unsqueeze(-1).expand(-1, -1, -1, 8).contiguous()
        dq, dk, dv, *_ = torch_npu.npu_fusion_attention_grad(
            q.contiguous(),
            k.contiguous(),
            v.contiguous(),
            dout.to(q.dtype).contiguous(),
            q.shape[1],
            "BNSD",
            softmax_max=softmax_max,
            softmax_sum=torch.ones_like(softmax_max),
            attention_in=out.to(q.dtype).contiguous(),
            scale_value=scale,
            **self._sparse_args(causal, q.device),
        )
        return dq, dk, dv


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
