"""Local attention block kernels that return the log-sum-exp, and their exact backward.

Context-parallel attention splits every sequence's attention into blocks (local queries against one
rank's keys) and merges the partial results with their log-sum-exp. Two kinds of kernel compute them:

Sequence kernels (``varlen = False``) compute one block of one sequence, on the batch-head-sequence
views fused kernels read (strided views of the packed tensors):

- ``forward(q, k, v, causal=, scale=) -> (out, lse)``: q ``(1, Hq, Lq, D)``, k/v ``(1, Hkv, Lk, D)``
  (GQA: Hq a multiple of Hkv); out ``(1, Hq, Lq, D)``; lse ``(1, Hq, Lq)`` in the accumulation dtype.
  ``causal`` is only used for square blocks. Blocks are never empty: every row sees at least one key.
- ``backward(dout, q, k, v, out, lse, causal=, scale=) -> (dq, dk, dv)``: given the *final* (merged)
  ``out`` and ``lse`` of the rows, each block's gradient is exact, so no block keeps its partial result.

Varlen kernels (``varlen = True``) compute one block of *every* sequence of a pack in one call, on
packed contiguous rows and cumulative sequence lengths (:class:`VarlenBlock`): q ``(Tq, Hq, D)``,
k/v ``(Tk, Hkv, D)``, out ``(Tq, Hq, D)``, lse ``(Hq, Tq)`` in fp32. A pack of hundreds of short
sequences then costs one launch per block instead of hundreds.

Kernels: CPU's fused flash kernel, Ascend's ``npu_fusion_attention`` in its varlen layout (``torch_npu`` is
imported only for NPU tensors) and a pure-math fallback per sequence; on CUDA the flash kernel that ships with torch
(``cuda_flash``), the flash-attn package when it is installed (``flash_attn``), the memory-efficient
kernel (``cuda_efficient``: fp32, head sizes or GPUs flash does not take), all varlen, and the
memory-efficient SDPA kernel per sequence for ROCm. :func:`choose_kernel` is the pure rule that picks
one. The fused kernels accumulate half-precision inputs in fp32; the math kernel computes in fp32 or
fp64.
"""

from __future__ import annotations

import functools
import importlib.metadata
import importlib.util
import math
import warnings
from dataclasses import dataclass
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


@dataclass(frozen=True)
class VarlenBlock:
    """Sequence boundaries of one varlen call, on the device of its tensors.

    ``cu_seqlens_q/k`` are int32 ``(N + 1,)`` offsets into the packed query/key rows (every sequence
    non-empty); ``query_sequence`` and ``query_offset`` are int64 ``(Tq,)``: each query row's sequence
    and its row within that sequence (kernels that keep the lse per sequence need them).
    """

    cu_seqlens_q: torch.Tensor
    cu_seqlens_k: torch.Tensor
    cu_seqlens_q_host: tuple[int, ...]  # the same offsets on the host, for kernels that take them there
    cu_seqlens_k_host: tuple[int, ...]
    max_seqlen_q: int
    max_seqlen_k: int
    causal: bool
    query_sequence: torch.Tensor
    query_offset: torch.Tensor

    @property
    def num_sequences(self) -> int:
        return self.cu_seqlens_q.shape[0] - 1


class SequenceKernel(Protocol):
    name: str
    varlen: bool  # False

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


class VarlenKernel(Protocol):
    name: str
    varlen: bool  # True

    def forward(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block: VarlenBlock, *, scale: float
    ) -> tuple[torch.Tensor, torch.Tensor]: ...

    def backward(
        self,
        dout: torch.Tensor,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        out: torch.Tensor,
        lse: torch.Tensor,
        block: VarlenBlock,
        *,
        scale: float,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]: ...


AttentionKernel = SequenceKernel | VarlenKernel


class MathKernel:
    """Explicit softmax in the accumulation dtype: any device and dtype, O(Lq * Lk) memory."""

    name = "math"
    varlen = False

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
    varlen = False

    def forward(self, q, k, v, *, causal, scale):
        return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, causal, scale=scale)

    def backward(self, dout, q, k, v, out, lse, *, causal, scale):
        return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
            dout.to(q.dtype), q, k, v, out.to(q.dtype), lse, 0.0, causal, scale=scale
        )


_LSE_ALIGNMENT = 32  # the memory-efficient kernel pads each sequence's lse rows to a multiple of 32
_MASK_NONE, _MASK_CAUSAL_TOP_LEFT = 0, 1


def _repeat_kv(x: torch.Tensor, groups: int, dim: int) -> torch.Tensor:
    """K/V heads repeated for kernels without GQA: query head ``h`` reads key head ``h // groups``."""
    return x if groups == 1 else x.repeat_interleave(groups, dim=dim)


def _sum_kv_groups(grad: torch.Tensor, groups: int, dim: int) -> torch.Tensor:
    return grad if groups == 1 else grad.unflatten(dim, (-1, groups)).sum(dim + 1)


class CUDAEfficientPerSequenceKernel:
    """CUDA's memory-efficient SDPA kernel, one call per sequence (fp32/bf16/fp16); GQA by repeating
    K/V heads. The ROCm path, where the varlen kernels' layouts differ."""

    name = "cuda_efficient_per_sequence"
    varlen = False

    def forward(self, q, k, v, *, causal, scale):
        groups = q.shape[1] // k.shape[1]
        out, lse, _, _ = torch.ops.aten._scaled_dot_product_efficient_attention(
            q, _repeat_kv(k, groups, 1), _repeat_kv(v, groups, 1), None, True, 0.0, causal, scale=scale
        )
        return out, lse[..., : q.shape[2]]

    def backward(self, dout, q, k, v, out, lse, *, causal, scale):
        groups = q.shape[1] // k.shape[1]
        length_q = q.shape[2]
        lse = lse.float()
        if torch.version.hip is None:  # the kernel's lse has its rows padded to a multiple of 32
            lse = torch.nn.functional.pad(lse, (0, -(-length_q // _LSE_ALIGNMENT) * _LSE_ALIGNMENT - length_q))
        no_seed = torch.zeros((), dtype=torch.long, device=q.device)
        dq, dk, dv, _ = torch.ops.aten._scaled_dot_product_efficient_attention_backward(
            dout.to(q.dtype),
            q,
            _repeat_kv(k, groups, 1),
            _repeat_kv(v, groups, 1),
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
        return dq, _sum_kv_groups(dk, groups, 1), _sum_kv_groups(dv, groups, 1)


class CUDAFlashKernel:
    """torch's own FlashAttention-2 varlen kernel (what ``torch.nn.attention.varlen`` calls):
    fp16/bf16, sm80+, GQA native, lse ``(Hq, Tq)`` in fp32."""

    name = "cuda_flash"
    varlen = True

    def forward(self, q, k, v, block, *, scale):
        out, lse, *_ = torch.ops.aten._flash_attention_forward(
            q,
            k,
            v,
            block.cu_seqlens_q,
            block.cu_seqlens_k,
            block.max_seqlen_q,
            block.max_seqlen_k,
            0.0,
            block.causal,
            False,
            scale=scale,
        )
        return out, lse

    def backward(self, dout, q, k, v, out, lse, block, *, scale):
        # No dropout: the philox state is never read (torch.nn.attention.varlen passes zeros too).
        rng_state = torch.zeros(2, dtype=torch.uint64, device=q.device)
        unused = torch.empty(0, device=q.device)
        return torch.ops.aten._flash_attention_backward(
            dout,
            q,
            k,
            v,
            out,
            lse,
            block.cu_seqlens_q,
            block.cu_seqlens_k,
            block.max_seqlen_q,
            block.max_seqlen_k,
            0.0,
            block.causal,
            rng_state,
            unused,
            scale=scale,
        )


def lse_from_per_sequence(lse: torch.Tensor, block: VarlenBlock) -> torch.Tensor:
    """The memory-efficient kernel's per-sequence lse ``(N, H, padded)`` -> packed ``(H, Tq)``."""
    return lse[block.query_sequence, :, block.query_offset].t()


def lse_to_per_sequence(lse: torch.Tensor, block: VarlenBlock) -> torch.Tensor:
    """Packed lse ``(H, Tq)`` -> the memory-efficient kernel's ``(N, H, padded)`` (padding rows 0)."""
    padded = -(-block.max_seqlen_q // _LSE_ALIGNMENT) * _LSE_ALIGNMENT
    per_sequence = lse.new_zeros(block.num_sequences, lse.shape[0], padded, dtype=torch.float32)
    per_sequence[block.query_sequence, :, block.query_offset] = lse.t().float()
    return per_sequence


class CUDAEfficientKernel:
    """CUDA's memory-efficient (CUTLASS) kernel in its varlen form: fp32/fp16/bf16, sm50+, any head
    size the GEMMs align to; GQA by repeating K/V heads. Its lse is kept per sequence, padded."""

    name = "cuda_efficient"
    varlen = True

    def forward(self, q, k, v, block, *, scale):
        groups = q.shape[1] // k.shape[1]
        out, lse, *_ = torch.ops.aten._efficient_attention_forward(
            q.unsqueeze(0),
            _repeat_kv(k, groups, 1).unsqueeze(0),
            _repeat_kv(v, groups, 1).unsqueeze(0),
            None,
            block.cu_seqlens_q,
            block.cu_seqlens_k,
            block.max_seqlen_q,
            block.max_seqlen_k,
            0.0,
            _MASK_CAUSAL_TOP_LEFT if block.causal else _MASK_NONE,
            True,
            scale=scale,
        )
        return out[0], lse_from_per_sequence(lse, block)

    def backward(self, dout, q, k, v, out, lse, block, *, scale):
        groups = q.shape[1] // k.shape[1]
        no_seed = torch.zeros((), dtype=torch.long, device=q.device)
        dq, dk, dv, _ = torch.ops.aten._efficient_attention_backward(
            dout.unsqueeze(0),
            q.unsqueeze(0),
            _repeat_kv(k, groups, 1).unsqueeze(0),
            _repeat_kv(v, groups, 1).unsqueeze(0),
            None,
            out.unsqueeze(0),
            block.cu_seqlens_q,
            block.cu_seqlens_k,
            block.max_seqlen_q,
            block.max_seqlen_k,
            lse_to_per_sequence(lse, block),
            0.0,
            no_seed,
            no_seed,
            _MASK_CAUSAL_TOP_LEFT if block.causal else _MASK_NONE,
            False,
            scale=scale,
        )
        return dq[0], _sum_kv_groups(dk[0], groups, 1), _sum_kv_groups(dv[0], groups, 1)


# 2.7.0 is the first release whose private varlen functions return 4 values and take window_size_left/right.
FLASH_ATTN_MIN_VERSION = (2, 7, 0)


@functools.cache
def flash_attn_available() -> bool:
    """Whether the flash-attn package (>= 2.7.0, the varlen signature used here) is installed and its CUDA
    extension loads (a wheel built for another torch fails with an undefined symbol: then torch's own flash
    kernel is used, with one warning saying why)."""
    if importlib.util.find_spec("flash_attn") is None:
        return False
    try:
        version = importlib.metadata.version("flash-attn")
    except importlib.metadata.PackageNotFoundError:
        return False
    release = tuple(int(part) for part in version.split("+")[0].split(".")[:3] if part.isdigit())
    if release < FLASH_ATTN_MIN_VERSION:
        warnings.warn(f"flash-attn {version} is older than {'.'.join(map(str, FLASH_ATTN_MIN_VERSION))}, whose "
                      "varlen interface cp_attention calls; using torch's flash kernel instead", stacklevel=2)
        return False
    try:
        importlib.import_module("flash_attn.flash_attn_interface")
    except (ImportError, OSError) as error:
        warnings.warn(f"flash-attn {version} is installed but its CUDA extension does not load ({error}); using "
                      "torch's flash kernel instead. Reinstall flash-attn built for this torch", stacklevel=2)
        return False
    return True


class FlashAttnKernel:
    """The flash-attn package's varlen FlashAttention-2 (optional extra ``flash``; imported only when
    used): fp16/bf16, sm80-sm90, GQA native, lse ``(Hq, Tq)`` in fp32."""

    name = "flash_attn"
    varlen = True

    def forward(self, q, k, v, block, *, scale):
        from flash_attn.flash_attn_interface import _flash_attn_varlen_forward

        out, lse, _, _ = _flash_attn_varlen_forward(
            q,
            k,
            v,
            block.cu_seqlens_q,
            block.cu_seqlens_k,
            block.max_seqlen_q,
            block.max_seqlen_k,
            dropout_p=0.0,
            softmax_scale=scale,
            causal=block.causal,
        )
        return out, lse

    def backward(self, dout, q, k, v, out, lse, block, *, scale):
        from flash_attn.flash_attn_interface import _flash_attn_varlen_backward

        dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        _flash_attn_varlen_backward(
            dout,
            q,
            k,
            v,
            out,
            lse,
            dq,
            dk,
            dv,
            block.cu_seqlens_q,
            block.cu_seqlens_k,
            block.max_seqlen_q,
            block.max_seqlen_k,
            dropout_p=0.0,
            softmax_scale=scale,
            causal=block.causal,
            window_size_left=-1,
            window_size_right=-1,
            softcap=0.0,
            alibi_slopes=None,
            deterministic=False,
        )
        return dq, dk, dv


class NPUFusionKernel:
    """Ascend ``torch_npu.npu_fusion_attention`` in its varlen ``"TND"`` layout (fp32/bf16/fp16, GQA native):
    every sequence of a pack in one call, sequence ends given as cumulative host lengths
    (``actual_seq_qlen``/``actual_seq_kvlen``), causal blocks as sparse mode 3 with the operator's
    compressed 2048 x 2048 mask (the blocks DHP asks for causally are square per sequence, where its
    bottom-right causal equals the top-left one).

    The kernel keeps the softmax max and sum (``(T, N, 8)``, 8 equal lanes) instead of the lse; the backward
    gets the final lse as the max and a sum of 1, which makes ``exp(score - max) / sum`` exact.
    """

    name = "npu_fusion"
    varlen = True

    def __init__(self) -> None:
        self._causal_masks: dict[torch.device, torch.Tensor] = {}

    def _arguments(self, block: VarlenBlock, device: torch.device) -> dict:
        lengths = {"actual_seq_qlen": list(block.cu_seqlens_q_host[1:]),
                   "actual_seq_kvlen": list(block.cu_seqlens_k_host[1:])}
        if not block.causal:
            return {**lengths, "sparse_mode": 0}
        if device not in self._causal_masks:
            self._causal_masks[device] = torch.ones(2048, 2048, dtype=torch.bool, device=device).triu_(1)
        return {**lengths, "atten_mask": self._causal_masks[device], "sparse_mode": 3}

    def forward(self, q, k, v, block, *, scale):
        import torch_npu

        out, softmax_max, softmax_sum, *_ = torch_npu.npu_fusion_attention(
            q.contiguous(), k.contiguous(), v.contiguous(), q.shape[1], "TND", scale=scale,
            **self._arguments(block, q.device))
        return out, (softmax_max[..., 0] + torch.log(softmax_sum[..., 0])).t()

    def backward(self, dout, q, k, v, out, lse, block, *, scale):
        import torch_npu

        softmax_max = lse.to(accumulation_dtype(q.dtype)).t().unsqueeze(-1).expand(-1, -1, 8).contiguous()
        dq, dk, dv, *_ = torch_npu.npu_fusion_attention_grad(
            q.contiguous(), k.contiguous(), v.contiguous(), dout.to(q.dtype).contiguous(), q.shape[1], "TND",
            softmax_max=softmax_max, softmax_sum=torch.ones_like(softmax_max),
            attention_in=out.to(q.dtype).contiguous(), scale_value=scale, **self._arguments(block, q.device))
        return dq, dk, dv


KERNELS: dict[str, AttentionKernel] = {
    kernel.name: kernel
    for kernel in (
        MathKernel(),
        CPUFlashKernel(),
        CUDAFlashKernel(),
        FlashAttnKernel(),
        CUDAEfficientKernel(),
        CUDAEfficientPerSequenceKernel(),
        NPUFusionKernel(),
    )
}

_HALF = (torch.float16, torch.bfloat16)
_CPU_DTYPES = (torch.float64, torch.float32, torch.bfloat16, torch.float16)
_NPU_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def flash_applies(dtype: torch.dtype, head_dim: int | None, capability: tuple[int, int]) -> bool:
    """torch's FlashAttention-2 takes fp16/bf16 on sm80-sm121 with a head size up to 256 and a multiple
    of 8; sm86-89 and sm120-121 cannot train head sizes in (192, 224]."""
    if dtype not in _HALF or not (8, 0) <= capability <= (12, 1):
        return False
    if head_dim is None:
        return True
    small_shared_memory = (8, 6) <= capability <= (8, 9) or capability >= (12, 0)
    if small_shared_memory and 192 < head_dim <= 224:
        return False
    return head_dim % 8 == 0 and 0 < head_dim <= 256


def efficient_applies(dtype: torch.dtype, head_dim: int | None, capability: tuple[int, int]) -> bool:
    """The memory-efficient kernel takes fp32/fp16 on sm50-sm121 and bf16 from sm80, with head sizes
    aligned to its GEMMs (sm80+: 8 elements for fp16/bf16, 4 for fp32; sm7x: 8 for fp16)."""
    if dtype not in (torch.float32, *_HALF) or not (5, 0) <= capability <= (12, 1):
        return False
    if dtype == torch.bfloat16 and capability < (8, 0):
        return False
    if head_dim is None:
        return True
    if capability >= (8, 0):
        alignment = 8 if dtype in _HALF else 4
    else:
        alignment = 8 if capability >= (7, 0) and dtype in _HALF else 1
    return head_dim > 0 and head_dim % alignment == 0


def npu_fusion_applies(dtype: torch.dtype, head_dim: int | None) -> bool:
    """Ascend's FlashAttentionScore operator (``npu_fusion_attention``) takes fp32/bf16/fp16 and head sizes that
    are multiples of 16 up to 512 (the operator's limits as MindSpore's wrapper of it,
    ``mindspore.ops.speed_fusion_attention``, documents them)."""
    return dtype in _NPU_DTYPES and (head_dim is None or (head_dim % 16 == 0 and 0 < head_dim <= 512))


def choose_kernel(
    device_type: str,
    dtype: torch.dtype,
    head_dim: int | None = None,
    *,
    capability: tuple[int, int] | None = None,
    flash_attn_installed: bool = False,
    rocm: bool = False,
) -> str:
    """The name of the kernel for a device type, dtype, head size and (CUDA) compute capability.

    CUDA, fastest first: the flash-attn package where installed (sm80-sm90), torch's flash kernel,
    the memory-efficient kernel (fp32, head sizes or older GPUs flash does not take), math. ROCm keeps
    the per-sequence memory-efficient SDPA kernel. ``head_dim=None`` skips the head-size rules.
    """
    if device_type == "cpu":
        return "cpu_flash" if dtype in _CPU_DTYPES else "math"
    if device_type == "npu":
        return "npu_fusion" if npu_fusion_applies(dtype, head_dim) else "math"
    if device_type != "cuda":
        return "math"
    if rocm:
        return "cuda_efficient_per_sequence" if dtype in (torch.float32, *_HALF) else "math"
    if capability is None:
        raise ValueError("choose_kernel: a CUDA device needs its compute capability, e.g. (9, 0)")
    if flash_applies(dtype, head_dim, capability):
        return "flash_attn" if flash_attn_installed and (8, 0) <= capability < (10, 0) else "cuda_flash"
    if efficient_applies(dtype, head_dim, capability):
        return "cuda_efficient"
    return "math"


def select_kernel(
    device: torch.device, dtype: torch.dtype, name: str | None = None, *, head_dim: int | None = None
) -> AttentionKernel:
    """The kernel called ``name``, or else the one :func:`choose_kernel` picks for this device."""
    if name is not None:
        if name not in KERNELS:
            raise ValueError(f"unknown attention kernel {name!r}; choose one of {sorted(KERNELS)}")
        return KERNELS[name]
    is_cuda = device.type == "cuda"
    chosen = choose_kernel(
        device.type,
        dtype,
        head_dim,
        capability=torch.cuda.get_device_capability(device) if is_cuda else None,
        flash_attn_installed=is_cuda and flash_attn_available(),
        rocm=torch.version.hip is not None,
    )
    return KERNELS[chosen]
