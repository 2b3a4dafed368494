"""Profile a cost model of the user's own model: time forward+backward of degree-1 packs of several
lengths (and, when given, one ring step on groups of several degrees), fit, report the fit error.

The compute terms (attention per token pair, linear per token, per-step overhead) come from
:func:`~lightning_dhp.planner.calibrate` on the packs; the ring terms (per-step latency, bandwidth)
from a straight-line fit of ring-step time against the tokens each rank sends. Also here: the
built-in transformer workload that calibration and the cost-model benchmark time (a stack of
pre-norm layers with a pluggable attention).
"""

from __future__ import annotations

import dataclasses
import itertools
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from lightning_dhp.attention import ZigzagLayout, cp_attention
from lightning_dhp.planner import CostModel, FitReport, calibrate

Attention = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class ProfileReport:
    """How well the profiled model fits its own measurements (absolute percent errors)."""

    compute: FitReport  # of every pack and group fitted together when groups were timed
    ring: FitReport | None  # None unless ring steps were timed
    packs: list[tuple[list[int], int, float]]  # (lengths, 1, seconds) per degree-1 pack
    ring_steps: list[tuple[int, int, float]]  # (degree, tokens per rank, seconds) per ring step
    groups: list[tuple[list[int], int, float]]  # (lengths, degree, seconds) per timed group

    def summary(self) -> str:
        """One line for a log: the fit errors and how many timings they rest on."""
        if self.groups:
            ring = f" and groups of degree {sorted({degree for _, degree, _ in self.groups})}"
        elif self.ring:
            ring = f"; ring fit median {self.ring.median_abs_pct_error:.1f}% over {self.ring.num_measurements} steps"
        else:
            ring = "; ring terms not profiled (kept from the base model)"
        return (
            f"fit median {self.compute.median_abs_pct_error:.1f}%, p90 {self.compute.p90_abs_pct_error:.1f}% "
            f"over {self.compute.num_measurements} packs{ring}"
        )


def profile_packs(lengths: Sequence[int]) -> list[list[int]]:
    """Degree-1 packs that separate the fitted terms: every length alone (attention grows with L^2,
    linear work with L), and pairs of equal tokens split differently (same linear work, different
    attention), so the per-step overhead is identified too."""
    distinct = sorted({int(length) for length in lengths if int(length) >= 1})
    if len(distinct) < 2:
        raise ValueError(f"profiling needs at least 2 distinct sample lengths >= 1, got {list(lengths)}")
    packs = [[length] for length in distinct]
    packs += [[length // 2, length - length // 2] for length in distinct if length >= 2]
    packs += [[short, long] for short, long in itertools.pairwise(distinct)]
    return packs


def profile_cost_model(
    run_pack: Callable[[Sequence[int]], None],
    lengths: Sequence[int],
    *,
    run_group: Callable[[int, Sequence[int]], None] | None = None,
    group_degrees: Sequence[int] = (),
    ring_step: Callable[[int, int], None] | None = None,
    ring_degrees: Sequence[int] = (),
    ring_tokens: Sequence[int] = (1024, 4096, 16384),
    node_size: int | None = None,
    base: CostModel | None = None,
    repeats: int = 3,
    warmup: int = 1,
    timer: Callable[[], float] = time.perf_counter,
) -> tuple[CostModel, ProfileReport]:
    """Time the user's model and fit a :class:`CostModel`; returns it and its :class:`ProfileReport`.

    ``run_pack(lengths)`` runs forward+backward of one degree-1 pack of samples of those lengths and
    returns when the device is done (synchronise). ``lengths`` are sample lengths to build packs from
    (:func:`profile_packs`; use lengths from the real dataset, short to long). The ring terms come
    from one of:

    - ``run_group(degree, lengths)``: forward+backward of the same packs on a real group of each of
      ``group_degrees`` (every rank of the group calls it); everything is fitted at once by
      :meth:`CostModel.fit` (exposed ring latency and per-token cost, ``comm_overlap=0``). The
      accurate choice: it also sees what context parallelism costs beyond the transfer (more kernel
      calls, padding). On this project's CPU benchmark its held-out median error is 4.1%;
    - ``ring_step(degree, tokens_per_rank)``: one ring step of the whole model (every layer's K/V
      send and receive, forward and backward), timed at every ``ring_degrees`` x ``ring_tokens`` and
      fitted to a latency and bandwidths (:func:`fit_ring_steps`; degrees above ``node_size`` give
      the inter-node one). Cheaper, but blind to those extra costs (18% held-out median error on
      the CPU benchmark); ``comm_overlap`` stays ``base``'s.

    Terms the timings cannot identify keep ``base``'s values (default :meth:`CostModel.default`).
    """
    if run_group is not None and ring_step is not None:
        raise ValueError("pass run_group (whole groups, fitted together) or ring_step (ring steps alone), not both")
    base = base or CostModel.default()
    packs = profile_packs(lengths)
    model, compute, pack_times = calibrate(run_pack, packs, repeats=repeats, warmup=warmup, base=base, timer=timer)
    groups: list[tuple[list[int], int, float]] = []
    if run_group is not None and group_degrees:
        for degree in group_degrees:
            _check_degree(degree, "group_degrees")
            for pack in packs:
                seconds = _median_time(lambda d=degree, p=pack: run_group(d, p), repeats, warmup, timer)
                groups.append((list(pack), degree, seconds))
        model, compute = CostModel.fit(pack_times + groups, base=base)
        return model, ProfileReport(compute, None, pack_times, [], groups)
    if ring_step is None or not ring_degrees:
        return model, ProfileReport(compute, None, pack_times, [], [])
    steps = []
    for degree in ring_degrees:
        _check_degree(degree, "ring_degrees")
        for tokens in ring_tokens:
            steps.append((degree, int(tokens), _median_time(lambda d=degree, t=tokens: ring_step(d, t), repeats,
                                                            warmup, timer)))
    model, ring = fit_ring_steps(model, steps, node_size=node_size)
    return model, ProfileReport(compute, ring, pack_times, steps, [])


def fit_vision_term(
    model: CostModel,
    run_item: Callable[[int], None],
    items: Sequence[tuple[int, int, int]],
    *,
    repeats: int = 3,
    warmup: int = 1,
    timer: Callable[[], float] = time.perf_counter,
) -> tuple[CostModel, list[tuple[int, int, float]]]:
    """``model`` with ``vision_s_per_patch`` fitted to whole items timed alone at degree 1.

    ``items`` holds ``(index, tokens, vision_patches)``; ``run_item(index)`` runs forward+backward of that
    item. Each item's time beyond what ``model`` predicts for its tokens is its vision tower's; the
    coefficient is the median of that per patch (at least 0). Returns the model and ``(tokens, patches,
    seconds)`` per item.
    """
    timings = [(tokens, patches, _median_time(lambda i=index: run_item(i), repeats, warmup, timer))
               for index, tokens, patches in items]
    per_patch = [max(0.0, seconds - model.group_time([tokens], 1)) / patches for tokens, patches, seconds in timings]
    return dataclasses.replace(model, vision_s_per_patch=statistics.median(per_patch)), timings


def _check_degree(degree: object, name: str) -> None:
    if isinstance(degree, bool) or not isinstance(degree, int) or degree < 2:
        raise ValueError(f"{name} holds {degree!r}; a group of context parallelism needs a degree >= 2")


def _median_time(run: Callable[[], None], repeats: int, warmup: int, timer: Callable[[], float]) -> float:
    for _ in range(warmup):
        run()
    seconds = []
    for _ in range(repeats):
        start = timer()
        run()
        seconds.append(timer() - start)
    return statistics.median(seconds)


def fit_ring_steps(
    model: CostModel, steps: Sequence[tuple[int, int, float]], *, node_size: int | None = None
) -> tuple[CostModel, FitReport]:
    """``model`` with its ring latency and bandwidths fitted to ``(degree, tokens_per_rank, seconds)``.

    One step costs ``latency + kv_bytes_per_token x tokens / bandwidth``: a least-squares line per
    link kind (inside a node, across nodes), the latency shared. A link kind without timings keeps
    ``model``'s bandwidth.
    """
    if len({tokens for _, tokens, _ in steps}) < 2:
        raise ValueError("fitting ring steps needs timings at 2 or more token counts")
    crosses = np.array([node_size is not None and degree > node_size for degree, _, _ in steps])
    tokens = np.array([float(tokens) for _, tokens, _ in steps])
    seconds = np.array([seconds for _, _, seconds in steps])
    if not np.all(np.isfinite(seconds)) or np.any(seconds <= 0):
        raise ValueError("every timed ring step must take a finite number of seconds > 0")
    # columns: latency, tokens inside a node, tokens across nodes (relative error: divide by seconds)
    features = np.stack([np.ones_like(tokens), np.where(crosses, 0.0, tokens), np.where(crosses, tokens, 0.0)], 1)
    used = [column for column in range(3) if np.any(features[:, column] > 0)]
    solution, *_ = np.linalg.lstsq(features[:, used] / seconds[:, None], np.ones(len(seconds)), rcond=None)
    coefficients = dict(zip(used, np.maximum(solution, 0.0).tolist(), strict=True))
    kv = model.kv_bytes_per_token

    def bandwidth(column: int, default: float) -> float:
        slope = coefficients.get(column)
        if slope is None:
            return default
        return kv / slope if slope > 0 else 1e18  # no measurable per-token cost

    fitted = dataclasses.replace(
        model,
        ring_step_latency_s=coefficients[0],
        intra_node_bytes_per_s=bandwidth(1, model.intra_node_bytes_per_s),
        inter_node_bytes_per_s=bandwidth(2, model.inter_node_bytes_per_s),
    )
    link = np.where(crosses, fitted.inter_node_bytes_per_s, fitted.intra_node_bytes_per_s)
    predicted = fitted.ring_step_latency_s + kv * tokens / link
    errors = np.abs(predicted - seconds) / seconds * 100.0
    report = FitReport(
        median_abs_pct_error=float(np.median(errors)),
        p90_abs_pct_error=float(np.percentile(errors, 90)),
        max_abs_pct_error=float(errors.max()),
        num_measurements=len(steps),
    )
    return fitted, report


# -- the built-in workload --------------------------------------------------------------------------------


def transformer_weights(
    hidden: int, layers: int, *, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32, seed: int = 0
) -> list[tuple[torch.Tensor, ...]]:
    """Per layer (qkv, out, up, down) weights, seeded (the same on every rank), requiring grad."""
    generator = torch.Generator().manual_seed(seed)

    def parameter(*shape: int) -> torch.Tensor:
        weight = torch.randn(*shape, generator=generator) / shape[0] ** 0.5
        return weight.to(device, dtype).requires_grad_()

    return [
        (parameter(hidden, 3 * hidden), parameter(hidden, hidden), parameter(hidden, 4 * hidden),
         parameter(4 * hidden, hidden))
        for _ in range(layers)
    ]


def transformer_layers(
    x: torch.Tensor, weights: list[tuple[torch.Tensor, ...]], heads: int, attention: Attention
) -> torch.Tensor:
    """Pre-norm layers over packed tokens ``x`` (tokens, hidden): fused QKV, ``attention(q, k, v)`` on
    (tokens, heads, head_dim), output projection, 4x GELU MLP."""
    hidden = x.shape[-1]
    for qkv_weight, out_weight, up_weight, down_weight in weights:
        q, k, v = (F.layer_norm(x, (hidden,)) @ qkv_weight).view(x.shape[0], 3, heads, -1).unbind(1)
        x = x + attention(q, k, v).flatten(1) @ out_weight
        x = x + F.gelu(F.layer_norm(x, (hidden,)) @ up_weight) @ down_weight
    return x


def packed_causal_attention(lengths: Sequence[int]) -> Attention:
    """Causal attention of a degree-1 pack of ``lengths`` through ``cp_attention``: the kernel training runs
    (varlen where the device has one), in the inputs' dtype."""
    layout = ZigzagLayout(lengths, 1, 0)
    return lambda q, k, v: cp_attention(q, k, v, layout)


def transformer_step(
    hidden: int = 256, heads: int = 4, layers: int = 2, device: str | None = None, dtype: str = "float32"
) -> Callable[[Sequence[int]], None]:
    """A ``run_step(lengths)`` doing forward+backward of ``layers`` transformer layers on a pack, in ``dtype``
    (the training's compute dtype: its matmuls and attention kernel are what the cost model times)."""
    torch_device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    weights = transformer_weights(hidden, layers, device=torch_device, dtype=getattr(torch, dtype))

    def run_step(lengths: Sequence[int]) -> None:
        x = torch.randn(sum(lengths), hidden, device=torch_device, dtype=weights[0][0].dtype, requires_grad=True)
        out = transformer_layers(x, weights, heads, packed_causal_attention(lengths))
        out.float().square().mean().backward()
        synchronize(torch_device)

    return run_step


def compute_dtype(precision: str) -> str:
    """The dtype a Lightning precision setting computes in: ``"bf16-mixed"`` -> ``"bfloat16"``, ..."""
    if precision.startswith("bf16"):
        return "bfloat16"
    if precision.startswith("16"):
        return "float16"
    return "float64" if precision.startswith("64") else "float32"


def synchronize(device: torch.device) -> None:
    """Wait for ``device``'s queued work (CUDA, NPU); a no-op on CPU."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "npu":
        torch.npu.synchronize(device)  # type: ignore[attr-defined]
