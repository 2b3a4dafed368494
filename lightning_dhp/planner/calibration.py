"""Calibrate a CostModel on the current device by timing real forward+backward work.

One device cannot time a ring, so calibration measures degree-1 packs of samples (attention +
linear work + per-step overhead) and fits ``a``, ``b`` and the overhead; the ring terms come from
``base`` (set them from the interconnect, or fit them from multi-device measurements with
:meth:`CostModel.fit`). Pass ``run_step`` to time your own model; the built-in workload is a stack
of pre-norm transformer layers (causal attention per sample + 4x MLP). torch is imported lazily,
so the planner stays importable without it.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence

from lightning_dhp.planner.cost_model import CostModel, FitReport

DEFAULT_PACKS: tuple[tuple[int, ...], ...] = (
    (256,),
    (512,),
    (1024,),
    (2048,),
    (4096,),
    (256, 256, 256, 256),
    (1024, 1024),
    (512, 1536),
    (2048, 1024, 512),
    (128,) * 16,
)


def transformer_step(
    hidden: int = 256, heads: int = 4, layers: int = 2, device: str | None = None, dtype: str = "float32"
) -> Callable[[Sequence[int]], None]:
    """A ``run_step(lengths)`` doing forward+backward of ``layers`` transformer layers on a pack."""
    import torch
    import torch.nn.functional as F

    torch_device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    torch_dtype = getattr(torch, dtype)
    generator = torch.Generator().manual_seed(0)

    def parameter(*shape: int) -> torch.Tensor:
        weight = torch.randn(*shape, generator=generator) / shape[0] ** 0.5
        return weight.to(torch_device, torch_dtype).requires_grad_()

    weights = [
        (
            parameter(hidden, 3 * hidden),
            parameter(hidden, hidden),
            parameter(hidden, 4 * hidden),
            parameter(4 * hidden, hidden),
        )
        for _ in range(layers)
    ]
    head_dim = hidden // heads

    def run_step(lengths: Sequence[int]) -> None:
        x = torch.randn(sum(lengths), hidden, device=torch_device, dtype=torch_dtype, requires_grad=True)
        for qkv_weight, out_weight, up_weight, down_weight in weights:
            q, k, v = (F.layer_norm(x, (hidden,)) @ qkv_weight).split(hidden, dim=-1)
            outputs, start = [], 0
            for length in lengths:

                def heads_first(t: torch.Tensor, begin: int = start, size: int = length) -> torch.Tensor:
                    return t[begin : begin + size].view(size, heads, head_dim).transpose(0, 1)

                attended = F.scaled_dot_product_attention(
                    heads_first(q), heads_first(k), heads_first(v), is_causal=True
                )
                outputs.append(attended.transpose(0, 1).reshape(length, hidden))
                start += length
            x = x + torch.cat(outputs) @ out_weight
            x = x + F.gelu(F.layer_norm(x, (hidden,)) @ up_weight) @ down_weight
        x.float().square().mean().backward()
        _synchronize(torch_device)

    return run_step


def _synchronize(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "npu":
        torch.npu.synchronize(device)  # type: ignore[attr-defined]


def calibrate(
    run_step: Callable[[Sequence[int]], None] | None = None,
    packs: Sequence[Sequence[int]] = DEFAULT_PACKS,
    *,
    repeats: int = 3,
    warmup: int = 1,
    base: CostModel | None = None,
    timer: Callable[[], float] = time.perf_counter,
) -> tuple[CostModel, FitReport, list[tuple[list[int], int, float]]]:
    """Time ``run_step`` on every pack (median of ``repeats`` after ``warmup``) and fit a model.

    Returns the fitted model, its fit error and the raw ``(lengths, 1, seconds)`` measurements.
    ``run_step`` must finish its device work before returning (synchronise).
    """
    if len(packs) < 3:
        raise ValueError(f"calibrate needs at least 3 packs of lengths, got {len(packs)}")
    step = run_step or transformer_step()
    measurements = []
    for pack in packs:
        lengths = [int(length) for length in pack]
        for _ in range(warmup):
            step(lengths)
        seconds = []
        for _ in range(repeats):
            start = timer()
            step(lengths)
            seconds.append(timer() - start)
        measurements.append((lengths, 1, statistics.median(seconds)))
    model, report = CostModel.fit(measurements, base=base)
    return model, report, measurements
