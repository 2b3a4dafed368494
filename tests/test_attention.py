"""cp_attention against a float64 oracle: dense masked attention per sequence, forward and gradients.

All degrees 1..8 run in one spawn of 8 gloo ranks: each partition of the 8 ranks into contiguous groups
(8 | 7+1 | 6+2 | 5+3 | 4+4 | 3+3+2) runs its groups side by side, for every configuration.
"""

from __future__ import annotations

import itertools
import sys
import warnings

import pytest
import torch
import torch.distributed as dist

from lightning_dhp.attention import ZigzagLayout, cp_attention
from lightning_dhp.attention.blocks import packed_block
from lightning_dhp.attention.kernels import (
    KERNELS,
    MathKernel,
    VarlenBlock,
    choose_kernel,
    heads_first,
    lse_from_per_sequence,
    lse_to_per_sequence,
)
from lightning_dhp.distributed.context import CPContext, cp_context, require_cp_context
from lightning_dhp.testing import run_distributed

WORLD_SIZE = 8
PARTITIONS = ((8,), (7, 1), (6, 2), (5, 3), (4, 4), (3, 3, 2))
# (implementation, group-free ring?, causal, local kernel (None: the device's fused one), dtype, heads)
CONFIGS = [
    (implementation, group_free, causal, kernel, torch.float64, (4, 2))
    for (implementation, group_free), causal, kernel in itertools.product(
        [("ring", False), ("ring", True), ("allgather", False)], [True, False], [None, "math"]
    )
] + [
    ("ring", True, True, None, torch.float32, (2, 2)),
    ("ring", True, False, None, torch.float32, (2, 2)),
    ("ring", True, True, None, torch.bfloat16, (4, 2)),
    ("allgather", False, True, None, torch.bfloat16, (4, 2)),
    # The varlen block path (one call per block, gathered rows), with a math kernel standing in for CUDA's.
    ("ring", False, True, "looped_math_varlen", torch.float64, (4, 2)),
    ("ring", True, False, "looped_math_varlen", torch.float64, (4, 2)),
    ("allgather", False, True, "looped_math_varlen", torch.float64, (4, 2)),
]
# bfloat16 (eps 2**-7): the oracle sees the same rounded inputs; what remains is the kernel rounding each
# block's output and gradients to bfloat16 before the fp32 merge, a few eps for a few blocks.
TOLERANCE = {torch.float64: 1e-10, torch.float32: 1e-5, torch.bfloat16: 2e-2}
HEAD_DIM = 4


class LoopedMathVarlen:
    """A varlen kernel made of the math kernel, one sequence at a time: the varlen block path of
    blocks.py (gather, one call per block, scatter and merge) runs on CPU as CUDA's kernels drive it."""

    name = "looped_math_varlen"
    varlen = True

    @staticmethod
    def _segments(block: VarlenBlock):
        bounds_q, bounds_k = block.cu_seqlens_q.tolist(), block.cu_seqlens_k.tolist()
        return [
            (slice(bounds_q[i], bounds_q[i + 1]), slice(bounds_k[i], bounds_k[i + 1]))
            for i in range(block.num_sequences)
        ]

    def forward(self, q, k, v, block, *, scale):
        outs, lses = [], []
        for rows, keys in self._segments(block):
            out, lse = MathKernel().forward(
                heads_first(q[rows]), heads_first(k[keys]), heads_first(v[keys]), causal=block.causal, scale=scale
            )
            outs.append(out[0].transpose(0, 1).to(q.dtype))
            lses.append(lse[0])
        return torch.cat(outs), torch.cat(lses, dim=1)

    def backward(self, dout, q, k, v, out, lse, block, *, scale):
        dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        for rows, keys in self._segments(block):
            grads = MathKernel().backward(
                *(heads_first(x[rows]) for x in (dout, q)),
                heads_first(k[keys]),
                heads_first(v[keys]),
                heads_first(out[rows]),
                lse[None, :, rows],
                causal=block.causal,
                scale=scale,
            )
            for target, index, grad in zip((dq, dk, dv), (rows, keys, keys), grads, strict=True):
                target[index] = grad[0].transpose(0, 1)
        return dq, dk, dv


def register_looped_math_varlen() -> None:
    KERNELS.setdefault(LoopedMathVarlen.name, LoopedMathVarlen())


def packed_lengths(degree: int, seed: int) -> list[int]:
    """A pack mixing long sequences, sequences shorter than 2 * degree and zero-length ones."""
    generator = torch.Generator().manual_seed(seed)
    long = torch.randint(2 * degree, 6 * degree + 9, (2,), generator=generator).tolist()
    short = torch.randint(1, 2 * degree, (3,), generator=generator).tolist()
    return [long[0], 0, *short[:2], 4 * degree, long[1], 0, short[2]]


def random_inputs(num_tokens: int, heads: tuple[int, int], dtype: torch.dtype, seed: int):
    """q, k, v and an upstream gradient for the packed batch (same on every rank of a group)."""
    generator = torch.Generator().manual_seed(seed)
    heads_q, heads_kv = heads
    shapes = [
        (num_tokens, heads_q, HEAD_DIM),
        (num_tokens, heads_kv, HEAD_DIM),
        (num_tokens, heads_kv, HEAD_DIM),
        (num_tokens, heads_q, HEAD_DIM),
    ]
    return [torch.randn(shape, generator=generator, dtype=torch.float64).to(dtype) for shape in shapes]


def dense_attention(q, k, v, seq_lens, causal, scale=None):
    """The oracle: float64 softmax attention of each sequence on its own, GQA by repeating k/v heads."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    groups = q.shape[1] // k.shape[1]
    outputs, start = [], 0
    for length in seq_lens:
        rows = slice(start, start + length)
        start += length
        scores = torch.einsum("qhd,khd->hqk", q[rows], k[rows].repeat_interleave(groups, 1)) * scale
        if causal:
            scores = scores.masked_fill(torch.ones(length, length, dtype=torch.bool).triu(1), float("-inf"))
        outputs.append(torch.einsum("hqk,khd->qhd", scores.softmax(-1), v[rows].repeat_interleave(groups, 1)))
    return torch.cat(outputs)


def oracle_with_grads(q, k, v, upstream, seq_lens, causal):
    """Oracle output and dq, dk, dv for ``upstream``, all in float64."""
    leaves = [x.detach().double().requires_grad_() for x in (q, k, v)]
    out = dense_attention(*leaves, seq_lens, causal)
    return (out.detach(), *torch.autograd.grad(out, leaves, upstream.double()))


def max_errors(layout, local_results, oracle_results) -> list[float]:
    """Worst error of each local result against the oracle's shard (padding rows must be exactly 0),
    relative to the oracle's largest magnitude where that exceeds 1."""
    errors = []
    for local, full in zip(local_results, oracle_results, strict=True):
        expected = layout.shard(full)
        scale = max(1.0, expected.abs().max().item()) if expected.numel() else 1.0
        errors.append((local.double() - expected).abs().max().item() / scale if local.numel() else 0.0)
    return errors


def run_case(layout, group, ranks, config, seed) -> list[float]:
    implementation, _, causal, kernel, dtype, heads = config
    q, k, v, upstream = random_inputs(sum(layout.seq_lens), heads, dtype, seed)
    local = [layout.shard(x).requires_grad_() for x in (q, k, v)]
    out = cp_attention(*local, layout, group, causal=causal, implementation=implementation, ranks=ranks, kernel=kernel)
    local_grads = torch.autograd.grad(out, local, layout.shard(upstream, pad_value=5.0))
    assert out.dtype == dtype
    return max_errors(layout, [out, *local_grads], oracle_with_grads(q, k, v, upstream, layout.seq_lens, causal))


def _check_all_degrees(rank: int, world_size: int) -> dict[str, list[float]]:
    register_looped_math_varlen()
    errors = {}
    for partition_index, partition in enumerate(PARTITIONS):
        starts = [sum(partition[:i]) for i in range(len(partition))]
        # new_group is collective over the world: every rank creates every group, in order.
        subgroups = [
            None
            if degree == 1
            else dist.group.WORLD
            if degree == world_size
            else dist.new_group(list(range(start, start + degree)))
            for start, degree in zip(starts, partition, strict=True)
        ]
        group_index = max(i for i, start in enumerate(starts) if start <= rank)
        degree, position = partition[group_index], rank - starts[group_index]
        subgroup = subgroups[group_index]
        ring_ranks = list(range(starts[group_index], starts[group_index] + degree))
        for config_index, config in enumerate(CONFIGS):
            implementation, group_free, causal, kernel, dtype, heads = config
            seed = 1000 * partition_index + 100 * group_index + config_index
            layout = ZigzagLayout(packed_lengths(degree, seed), degree, position)
            group, ranks = (dist.group.WORLD, ring_ranks) if group_free else (subgroup, None)
            name = (
                f"degree {degree} (partition {partition}) {implementation} group_free={group_free} "
                f"causal={causal} kernel={kernel} {dtype} heads={heads} lens={layout.seq_lens}"
            )
            errors[name] = run_case(layout, group, ranks, config, seed)
    return errors


def test_all_degrees_match_the_dense_oracle():
    results = run_distributed(_check_all_degrees, WORLD_SIZE, timeout_s=240)
    checked_degrees = set()
    for rank_errors in results:
        for name, (out_error, dq_error, dk_error, dv_error) in rank_errors.items():
            tolerance = next(TOLERANCE[dtype] for dtype in TOLERANCE if str(dtype) in name)
            assert max(out_error, dq_error, dk_error, dv_error) < tolerance, (
                f"{name}: out {out_error:.2e} dq {dq_error:.2e} dk {dk_error:.2e} dv {dv_error:.2e}"
            )
            checked_degrees.add(int(name.split()[1]))
    assert checked_degrees == set(range(1, 9))


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("kernel", [None, "math"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_local_packed_attention_matches_the_oracle(causal, kernel, dtype):
    seq_lens = [13, 0, 3, 1, 90, 2, 5, 70]
    layout = ZigzagLayout(seq_lens, 1, 0)
    q, k, v, upstream = random_inputs(sum(seq_lens), (4, 2), dtype, seed=7)
    local = [x.clone().requires_grad_() for x in (q, k, v)]
    out = cp_attention(*local, layout, causal=causal, kernel=kernel)
    grads = torch.autograd.grad(out, local, upstream)
    errors = max_errors(layout, [out, *grads], oracle_with_grads(q, k, v, upstream, seq_lens, causal))
    assert max(errors) < TOLERANCE[dtype], errors


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_accumulates_in_float32(dtype):
    seq_lens = [40, 7, 100]
    q, k, v, _ = random_inputs(sum(seq_lens), (2, 1), dtype, seed=3)
    out = cp_attention(q, k, v, ZigzagLayout(seq_lens, 1, 0))
    reference = dense_attention(q.double(), k.double(), v.double(), seq_lens, causal=True)
    assert out.dtype == dtype
    # One rounding of the output, not an accumulation of them: within a few ulps of the format.
    assert (out.double() - reference).abs().max().item() < 4 * torch.finfo(dtype).eps


def test_without_layout_or_context_all_rows_are_one_sequence():
    q, k, v, _ = random_inputs(30, (2, 2), torch.float64, seed=1)
    expected = dense_attention(q, k, v, [30], causal=False)
    assert (cp_attention(q, k, v, causal=False) - expected).abs().max() < 1e-12


def test_current_context_supplies_the_layout():
    seq_lens = [5, 9]
    q, k, v, _ = random_inputs(14, (2, 2), torch.float64, seed=2)
    context = CPContext(ZigzagLayout(seq_lens, 1, 0), None, (0,))
    with cp_context(context):
        out = cp_attention(q, k, v)
    assert (out - dense_attention(q, k, v, seq_lens, causal=True)).abs().max() < 1e-12


def test_required_context_raises_the_strategy_reason():
    q = torch.zeros(4, 1, 2)
    with (
        require_cp_context("attention outside a planned batch"),
        pytest.raises(RuntimeError, match="attention outside a planned batch"),
    ):
        cp_attention(q, q, q)


@pytest.mark.parametrize(
    ("shapes", "kwargs", "message"),
    [
        (
            ((6, 2, 4), (6, 2, 4), (6, 2, 4)),
            {"layout": ZigzagLayout([3, 4], 1, 0)},
            r"have 6 rows but ZigzagLayout\(seq_lens=\[3, 4\], degree=1, rank=0\) holds 7",
        ),
        (((6, 3, 4), (6, 2, 4), (6, 2, 4)), {}, "q has 3 heads and k/v 2"),
        (((6, 2, 4), (6, 2, 4), (6, 1, 4)), {}, r"k has shape \(6, 2, 4\) but v has \(6, 1, 4\)"),
        (((6, 2, 4), (5, 2, 4), (5, 2, 4)), {}, "same number of rows and the same head_dim"),
        (((6, 8), (6, 2, 4), (6, 2, 4)), {}, r"q has shape \(6, 8\); expected \(T_local, heads, head_dim\)"),
        (((6, 2, 4),) * 3, {"implementation": "ulysses"}, "unknown implementation 'ulysses'"),
        (((6, 2, 4),) * 3, {"kernel": "triton"}, "unknown attention kernel 'triton'"),
        (((4, 2, 4),) * 3, {"layout": ZigzagLayout([8], 2, 0)}, "torch.distributed is not initialised"),
    ],
)
def test_bad_input_is_rejected_with_the_offending_value(shapes, kwargs, message):
    q, k, v = (torch.zeros(shape) for shape in shapes)
    with pytest.raises((ValueError, RuntimeError), match=message):
        cp_attention(q, k, v, **kwargs)


def _bad_group_messages(rank: int, world_size: int) -> list[str]:
    pair = dist.new_group([0, 1])
    if rank == 2:
        return []
    attempts = [
        {"layout": ZigzagLayout([8], 2, rank)},  # no group
        {"layout": ZigzagLayout([6], 3, rank), "group": pair},  # degree 3 on a group of 2
        {"layout": ZigzagLayout([8], 2, 1 - rank), "group": pair},  # layout rank is the other process
        {"layout": ZigzagLayout([8], 2, rank), "group": pair, "ranks": [1, 0]},  # ranks out of group order
        {
            "layout": ZigzagLayout([8], 2, rank),
            "group": dist.group.WORLD,
            "ranks": [0, 1],
            "implementation": "allgather",
        },  # allgather over part of the world
        {"layout": ZigzagLayout([8], 2, rank), "group": dist.group.WORLD, "ranks": [0, 0]},
    ]
    messages = []
    for kwargs in attempts:
        x = torch.zeros(kwargs["layout"].num_local_tokens, 1, 2)
        try:
            cp_attention(x, x, x, **kwargs)
        except ValueError as error:
            messages.append(str(error))
        else:
            messages.append("no error")
    return messages


def test_bad_groups_are_rejected_before_any_communication():
    messages = run_distributed(_bad_group_messages, 3, timeout_s=180)[0]
    expected = [
        "spans 2 ranks and needs their process group",
        "has degree 3 but the ring has 2 ranks [0, 1]",
        "this process is global rank 0 but the layout's rank 1 is global rank 1",
        "ranks=[1, 0] differ from the group's ranks [0, 1]",
        "implementation='allgather' runs collectives over its group",
        "must be 2 distinct global ranks",
    ]
    for message, fragment in zip(messages, expected, strict=True):
        assert fragment in message, message


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_varlen_block_path_matches_the_oracle(monkeypatch, causal, dtype):
    monkeypatch.setitem(KERNELS, LoopedMathVarlen.name, LoopedMathVarlen())
    seq_lens = [13, 0, 3, 1, 90, 2, 5, 70]
    q, k, v, upstream = random_inputs(sum(seq_lens), (4, 2), dtype, seed=11)
    local = [x.clone().requires_grad_() for x in (q, k, v)]
    out = cp_attention(*local, ZigzagLayout(seq_lens, 1, 0), causal=causal, kernel=LoopedMathVarlen.name)
    grads = torch.autograd.grad(out, local, upstream)
    oracle = oracle_with_grads(q, k, v, upstream, seq_lens, causal)
    errors = max_errors(ZigzagLayout(seq_lens, 1, 0), [out, *grads], oracle)
    assert max(errors) < TOLERANCE[dtype], errors


def test_packed_block_gathers_rows_with_gaps_and_slices_a_contiguous_range():
    # Degree 2, rank 0 holds chunks 0 and 3 of each sequence, padded to a multiple of 4: lengths 5, 0, 4, 1
    # take local rows [0, 4), none, [4, 6), [6, 8), whose real prefixes are 2 (positions 0, 1), 2 (0, 3), 1 (0).
    own = packed_block(ZigzagLayout([5, 0, 4, 1], 2, 0), 0, True, torch.device("cpu"))
    assert isinstance(own.query_rows, torch.Tensor) and own.query_rows.tolist() == [0, 1, 4, 5, 6]
    assert own.varlen.cu_seqlens_q.dtype == torch.int32 and own.varlen.cu_seqlens_q.tolist() == [0, 2, 4, 5]
    assert own.varlen.query_sequence.tolist() == [0, 0, 1, 1, 2]
    assert own.varlen.query_offset.tolist() == [0, 1, 0, 1, 0]
    assert own.varlen.causal and own.varlen.max_seqlen_q == 2
    # Degree 1: every sequence's rows are one contiguous range, so no gather.
    whole = packed_block(ZigzagLayout([5, 0, 4], 1, 0), 0, False, torch.device("cpu"))
    assert whole.query_rows == slice(0, 9) and whole.key_rows == slice(0, 9) and not whole.varlen.causal
    assert packed_block(ZigzagLayout([0, 0], 1, 0), 0, True, torch.device("cpu")) is None


def test_efficient_kernel_lse_layout_round_trips():
    lens = [3, 40, 1]
    block = packed_block(ZigzagLayout(lens, 1, 0), 0, True, torch.device("cpu")).varlen
    packed = torch.randn(2, sum(lens))
    per_sequence = lse_to_per_sequence(packed, block)
    assert per_sequence.shape == (3, 2, 64)  # rows padded to a multiple of 32 of the longest
    assert torch.equal(per_sequence[1, :, :40], packed[:, 3:43]) and per_sequence[1, :, 40:].abs().sum() == 0
    assert torch.equal(per_sequence[2, :, 0], packed[:, 43])
    assert torch.equal(lse_from_per_sequence(per_sequence, block), packed)


A100, A10, H100, T4, B200, V100 = (8, 0), (8, 6), (9, 0), (7, 5), (10, 0), (7, 0)


@pytest.mark.parametrize(
    ("args", "kwargs", "expected"),
    [
        (("cpu", torch.float32, 64), {}, "cpu_flash"),
        (("cpu", torch.int32, 64), {}, "math"),
        (("npu", torch.bfloat16, 128), {}, "npu_fusion"),
        (("npu", torch.float64, 128), {}, "math"),
        (("npu", torch.bfloat16, 72), {}, "math"),  # FlashAttentionScore: head sizes multiples of 16
        (("npu", torch.float16, 512), {}, "npu_fusion"),
        (("npu", torch.float16, 576), {}, "math"),  # ... up to 512
        (("npu", torch.float32, None), {}, "npu_fusion"),
        (("mps", torch.float32, 64), {}, "math"),
        (("cuda", torch.bfloat16, 128), {"capability": H100}, "cuda_flash"),
        (("cuda", torch.float16, 64), {"capability": A100}, "cuda_flash"),
        (("cuda", torch.bfloat16, 128), {"capability": H100, "flash_attn_installed": True}, "flash_attn"),
        (("cuda", torch.bfloat16, 128), {"capability": B200, "flash_attn_installed": True}, "cuda_flash"),
        (("cuda", torch.float32, 128), {"capability": H100}, "cuda_efficient"),  # flash takes no fp32
        (("cuda", torch.float32, 128), {"capability": H100, "flash_attn_installed": True}, "cuda_efficient"),
        (("cuda", torch.float16, 64), {"capability": T4}, "cuda_efficient"),  # flash needs sm80
        (("cuda", torch.float16, 64), {"capability": V100}, "cuda_efficient"),
        (("cuda", torch.bfloat16, 64), {"capability": T4}, "math"),  # no bf16 before sm80
        (("cuda", torch.bfloat16, 320), {"capability": H100}, "cuda_efficient"),  # flash: head_dim <= 256
        (("cuda", torch.bfloat16, 200), {"capability": A10}, "cuda_efficient"),  # sm86 cannot train 192 < d <= 224
        (("cuda", torch.bfloat16, 200), {"capability": A100}, "cuda_flash"),
        (("cuda", torch.bfloat16, 4), {"capability": H100}, "math"),  # neither kernel's alignment
        (("cuda", torch.float32, 4), {"capability": H100}, "cuda_efficient"),
        (("cuda", torch.float32, 6), {"capability": H100}, "math"),
        (("cuda", torch.float32, 6), {"capability": T4}, "cuda_efficient"),  # no alignment without tensor cores
        (("cuda", torch.float64, 64), {"capability": H100}, "math"),
        (("cuda", torch.bfloat16, 64), {"capability": (5, 2)}, "math"),
        (("cuda", torch.bfloat16, 128), {"capability": H100, "rocm": True}, "cuda_efficient_per_sequence"),
        (("cuda", torch.bfloat16, None), {"capability": H100}, "cuda_flash"),
    ],
)
def test_kernel_choice(args, kwargs, expected):
    assert choose_kernel(*args, **kwargs) == expected


def test_kernel_choice_on_cuda_needs_the_capability():
    with pytest.raises(ValueError, match="needs its compute capability"):
        choose_kernel("cuda", torch.bfloat16, 64)


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize(("kernel", "backward"), [("cuda_flash", True), ("cuda_efficient", False)])
def test_cuda_kernels_call_the_aten_schemas(kernel, backward, causal):
    """On meta tensors (no GPU): the arguments fit the ops' schemas and the results come back in the
    packed shapes and dtypes. (torch's meta function of the efficient backward drops its ``out``
    argument, so that backward is only checked on a GPU, by benchmarks/gpu_check.py.)"""
    seq_lens = [5, 0, 3, 17]
    shapes = [(25, 4, 64), (25, 2, 64), (25, 2, 64)]
    q, k, v = (torch.empty(shape, device="meta", dtype=torch.bfloat16, requires_grad=True) for shape in shapes)
    out = cp_attention(q, k, v, ZigzagLayout(seq_lens, 1, 0), causal=causal, kernel=kernel)
    assert out.shape == q.shape and out.dtype == q.dtype
    if backward:
        grads = torch.autograd.grad(out, (q, k, v), torch.empty_like(out))
        assert [(g.shape, g.dtype) for g in grads] == [(x.shape, x.dtype) for x in (q, k, v)]


def _fake_flash_attn(root, version: str, interface: str) -> None:
    """A ``flash_attn`` package of ``version`` whose ``flash_attn_interface`` module runs ``interface``."""
    package = root / "flash_attn"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "flash_attn_interface.py").write_text(interface)
    metadata = root / f"flash_attn-{version}.dist-info"
    metadata.mkdir()
    (metadata / "METADATA").write_text(f"Metadata-Version: 2.1\nName: flash-attn\nVersion: {version}\n")


@pytest.mark.parametrize(("version", "interface", "available", "warning"), [
    ("2.7.4.post1", "", True, None),
    ("2.6.3", "", False, "older than 2.7.0"),
    ("2.8.3", "raise ImportError('flash_attn_2_cuda.so: undefined symbol: _ZN3c10')", False,
     "its CUDA extension does not load .*undefined symbol"),
])
def test_flash_attn_counts_as_available_only_when_new_enough_and_its_extension_loads(
        tmp_path, monkeypatch, version, interface, available, warning):
    from lightning_dhp.attention.kernels import flash_attn_available

    _fake_flash_attn(tmp_path, version, interface)
    monkeypatch.syspath_prepend(str(tmp_path))
    for name in ("flash_attn", "flash_attn.flash_attn_interface"):
        monkeypatch.delitem(sys.modules, name, raising=False)
    flash_attn_available.cache_clear()
    try:
        if warning is None:
            with warnings.catch_warnings():
                warnings.simplefilter("error")
                assert flash_attn_available() is available
        else:
            with pytest.warns(UserWarning, match=warning):
                assert flash_attn_available() is available
    finally:
        flash_attn_available.cache_clear()


def test_under_autocast_cp_attention_takes_q_k_v_in_the_autocast_dtype_as_sdpa_does():
    """A float32 RoPE gives float32 q and k while v leaves its projection in bf16: cp_attention casts all three
    to the autocast dtype (float64 stays), instead of refusing the mix."""
    generator = torch.Generator().manual_seed(0)
    q, k = torch.randn(7, 4, 8, generator=generator), torch.randn(7, 2, 8, generator=generator)
    v = torch.randn(7, 2, 8, generator=generator).bfloat16()
    layout = ZigzagLayout([3, 4], 1, 0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = cp_attention(q, k, v, layout)
        first = [x[None, :3].transpose(1, 2) for x in (q, k, v)]  # the first sequence, (1, heads, 3, 8)
        sdpa = torch.nn.functional.scaled_dot_product_attention(*first, is_causal=True, enable_gqa=True)
        assert cp_attention(q.double(), k.double(), v.double(), layout).dtype == torch.float64
    assert out.dtype == sdpa.dtype == torch.bfloat16
    torch.testing.assert_close(out, cp_attention(q.bfloat16(), k.bfloat16(), v, layout), rtol=0, atol=0)
    torch.testing.assert_close(out[:3].float(), sdpa[0].transpose(0, 1).float(), rtol=2e-2, atol=2e-2)
    with pytest.raises(ValueError, match="must share dtype"):  # outside autocast the mix is still refused
        cp_attention(q, k, v, layout)


class DocumentedTorchNPU:
    """``torch_npu``'s FlashAttentionScore ops as documented for the varlen ``"TND"`` layout (torch_npu API
    reference, ``npu_fusion_attention`` / ``npu_fusion_attention_grad``), computed in float64 math on CPU: the
    stub checks what the documentation requires (cumulative host lengths ending at T, the head count, the
    compressed 2048 x 2048 mask for sparse mode 3) and returns the documented shapes (softmax max and sum
    ``(T, N, 8)``)."""

    def __init__(self) -> None:
        self.calls: list[dict] = []

    def _check(self, query, key, head_num, input_layout, atten_mask, actual_seq_qlen, actual_seq_kvlen, sparse_mode):
        assert input_layout == "TND" and head_num == query.shape[1] and query.shape[1] % key.shape[1] == 0
        for lengths, rows in ((actual_seq_qlen, len(query)), (actual_seq_kvlen, len(key))):
            assert isinstance(lengths, list) and all(type(n) is int for n in lengths), "host int lists"
            assert lengths == sorted(lengths) and lengths[-1] == rows, "cumulative lengths ending at T"
        assert len(actual_seq_qlen) == len(actual_seq_kvlen)
        if sparse_mode == 3:
            assert atten_mask.shape == (2048, 2048) and atten_mask.dtype == torch.bool
            assert torch.equal(atten_mask, torch.ones(2048, 2048, dtype=torch.bool).triu(1))
        else:
            assert sparse_mode == 0 and atten_mask is None
        self.calls.append({"sparse_mode": sparse_mode, "sequences": len(actual_seq_qlen)})

    @staticmethod
    def _scores(query, key, scale, q_rows, k_rows, sparse_mode):
        groups = query.shape[1] // key.shape[1]
        q, k = query[q_rows].transpose(0, 1), key[k_rows].repeat_interleave(groups, 1).transpose(0, 1)
        scores = scale * q @ k.transpose(1, 2)
        if sparse_mode == 3:  # bottom-right causal
            lq, lk = scores.shape[1:]
            allowed = torch.arange(lk)[None, :] <= torch.arange(lq)[:, None] + (lk - lq)
            scores = scores.masked_fill(~allowed, float("-inf"))
        return scores  # (N, Lq, Lk)

    @staticmethod
    def _segments(actual_seq_qlen, actual_seq_kvlen):
        return zip(itertools.pairwise([0, *actual_seq_qlen]), itertools.pairwise([0, *actual_seq_kvlen]), strict=True)

    def npu_fusion_attention(self, query, key, value, head_num, input_layout, pse=None, padding_mask=None,
                             atten_mask=None, scale=1.0, keep_prob=1.0, pre_tockens=2147483647,
                             next_tockens=2147483647, inner_precise=0, prefix=None, actual_seq_qlen=None,
                             actual_seq_kvlen=None, sparse_mode=0, gen_mask_parallel=True, sync=False):
        self._check(query, key, head_num, input_layout, atten_mask, actual_seq_qlen, actual_seq_kvlen, sparse_mode)
        groups = query.shape[1] // key.shape[1]
        out = torch.empty_like(query)
        softmax_max = query.new_empty(len(query), head_num, 8, dtype=torch.float32 if query.dtype != torch.float64
                                      else torch.float64)
        softmax_sum = torch.empty_like(softmax_max)
        for (q0, q1), (k0, k1) in self._segments(actual_seq_qlen, actual_seq_kvlen):
            scores = self._scores(query, key, scale, slice(q0, q1), slice(k0, k1), sparse_mode)
            top = scores.amax(-1, keepdim=True)
            weights = torch.exp(scores - top)
            total = weights.sum(-1, keepdim=True)
            out[q0:q1] = ((weights / total) @ value[k0:k1].repeat_interleave(groups, 1).transpose(0, 1)).transpose(0, 1)
            softmax_max[q0:q1] = top[..., 0].t()[..., None].expand(-1, -1, 8)
            softmax_sum[q0:q1] = total[..., 0].t()[..., None].expand(-1, -1, 8)
        return out, softmax_max, softmax_sum, query.new_empty(0), 0, 0, 0

    def npu_fusion_attention_grad(self, query, key, value, dy, head_num, input_layout, *, pse=None,
                                  padding_mask=None, atten_mask=None, softmax_max=None, softmax_sum=None,
                                  softmax_in=None, attention_in=None, scale_value=1.0, keep_prob=1.0,
                                  pre_tockens=2147483647, next_tockens=2147483647, inner_precise=0, seed=0,
                                  offset=0, numels=0, prefix=None, actual_seq_qlen=None, actual_seq_kvlen=None,
                                  sparse_mode=0, gen_mask_parallel=True, sync=False):
        self._check(query, key, head_num, input_layout, atten_mask, actual_seq_qlen, actual_seq_kvlen, sparse_mode)
        assert softmax_max.shape == softmax_sum.shape == (len(query), head_num, 8)
        groups = query.shape[1] // key.shape[1]
        dq, dk, dv = torch.zeros_like(query), torch.zeros_like(key), torch.zeros_like(value)
        for (q0, q1), (k0, k1) in self._segments(actual_seq_qlen, actual_seq_kvlen):
            scores = self._scores(query, key, scale_value, slice(q0, q1), slice(k0, k1), sparse_mode)
            stats = (softmax_max[q0:q1, :, 0].t()[..., None], softmax_sum[q0:q1, :, 0].t()[..., None])
            probs = torch.exp(scores - stats[0]) / stats[1]  # (N, Lq, Lk), from the given statistics
            upstream = dy[q0:q1].transpose(0, 1)
            values = value[k0:k1].repeat_interleave(groups, 1).transpose(0, 1)
            keys = key[k0:k1].repeat_interleave(groups, 1).transpose(0, 1)
            grad_probs = upstream @ values.transpose(1, 2)
            row_dot = (upstream * attention_in[q0:q1].transpose(0, 1)).sum(-1, keepdim=True)
            grad_scores = probs * (grad_probs - row_dot) * scale_value
            dq[q0:q1] = (grad_scores @ keys).transpose(0, 1)
            head_grads = {"k": grad_scores.transpose(1, 2) @ query[q0:q1].transpose(0, 1),
                          "v": probs.transpose(1, 2) @ upstream}
            for target, grad in ((dk, head_grads["k"]), (dv, head_grads["v"])):
                target[k0:k1] = grad.transpose(0, 1).unflatten(1, (key.shape[1], groups)).sum(2)
        return dq, dk, dv, None


@pytest.mark.parametrize("causal", [True, False])
def test_npu_kernel_calls_the_documented_varlen_interface_and_matches_the_oracle(monkeypatch, causal):
    """Every block of a degree-3 layout (square causal blocks and the rectangular ones) through the NPU kernel,
    with torch_npu stubbed by its documented semantics, against the per-sequence math kernel; and one packed
    forward and backward at degree 1 against the dense oracle."""
    stub = DocumentedTorchNPU()
    monkeypatch.setitem(sys.modules, "torch_npu", stub)
    kernel, reference = KERNELS["npu_fusion"], LoopedMathVarlen()
    seq_lens = [13, 0, 3, 1, 90, 2, 5, 70]
    for rank, source in itertools.product(range(3), range(3)):
        block = packed_block(ZigzagLayout(seq_lens, 3, rank), source, causal, torch.device("cpu"))
        if block is None:
            continue
        rows, keys = block.varlen.cu_seqlens_q_host[-1], block.varlen.cu_seqlens_k_host[-1]
        generator = torch.Generator().manual_seed(rank * 3 + source)
        q, dout = (torch.randn(rows, 4, 16, generator=generator, dtype=torch.float64) for _ in range(2))
        k, v = (torch.randn(keys, 2, 16, generator=generator, dtype=torch.float64) for _ in range(2))
        out, lse = kernel.forward(q, k, v, block.varlen, scale=0.25)
        expected_out, expected_lse = reference.forward(q, k, v, block.varlen, scale=0.25)
        torch.testing.assert_close(out, expected_out, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(lse, expected_lse, rtol=1e-12, atol=1e-12)
        grads = kernel.backward(dout, q, k, v, out, lse, block.varlen, scale=0.25)
        for grad, expected in zip(grads, reference.backward(dout, q, k, v, out, lse, block.varlen, scale=0.25),
                                  strict=True):
            torch.testing.assert_close(grad, expected, rtol=1e-12, atol=1e-12)
    assert {call["sparse_mode"] for call in stub.calls} == ({0, 3} if causal else {0})
    assert max(call["sequences"] for call in stub.calls) > 1, "one call per block, not per sequence"
    q, k, v, upstream = random_inputs(sum(seq_lens), (4, 2), torch.float64, seed=11)
    local = [x.clone().requires_grad_() for x in (q, k, v)]
    out = cp_attention(*local, ZigzagLayout(seq_lens, 1, 0), causal=causal, kernel="npu_fusion")
    grads = torch.autograd.grad(out, local, upstream)
    errors = max_errors(ZigzagLayout(seq_lens, 1, 0), [out, *grads],
                        oracle_with_grads(q, k, v, upstream, seq_lens, causal))
    assert max(errors) < TOLERANCE[torch.float64], errors
