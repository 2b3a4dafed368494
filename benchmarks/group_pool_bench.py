"""Pooled process groups versus the group-free ring, on gloo CPU ranks.

Two questions: what a pool miss costs (creating a group for a new rank set, a collective over the
whole world), and whether ring attention is faster on a pooled subgroup or on the world group with
global-rank point-to-point ops (no group at all). Variants run interleaved in one world, median of
repeats, spread as min-max.

    python benchmarks/group_pool_bench.py [--quick] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
import torch.distributed as dist

from lightning_dhp.attention import ZigzagLayout, cp_attention
from lightning_dhp.testing import run_distributed


def _ring_step(q: torch.Tensor, ring_group: dist.ProcessGroup, layout: ZigzagLayout, ranks: tuple[int, ...],
               members: dist.ProcessGroup) -> float:
    """Forward+backward of one ring, timed until every member of the ring is done."""
    started = time.perf_counter()
    out = cp_attention(q, q, q, layout=layout, group=ring_group, ranks=ranks)
    out.sum().backward()
    dist.barrier(group=members)
    return time.perf_counter() - started


def _measure(rank: int, world_size: int, tokens: int, repeats: int) -> dict:
    timings: dict[str, list[float]] = {}
    for degree in range(2, world_size + 1):
        ranks = tuple(range(degree))
        started = time.perf_counter()
        group = dist.new_group(list(ranks))
        timings.setdefault(f"create group, degree {degree}", []).append(time.perf_counter() - started)
        if rank >= degree:
            continue
        layout = ZigzagLayout([tokens], degree, rank)
        q = torch.randn(layout.num_local_tokens, 4, 32, requires_grad=True, generator=torch.Generator().manual_seed(0))
        for _ in range(repeats):
            for name, ring_group in ((f"pooled subgroup, degree {degree}", group),
                                     (f"group-free world ring, degree {degree}", dist.group.WORLD)):
                timings.setdefault(name, []).append(_ring_step(q, ring_group, layout, ranks, group))
                q.grad = None
    return timings


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="2 ranks, short sequence, 2 repeats")
    parser.add_argument("--world-size", type=int, default=4)
    parser.add_argument("--tokens", type=int, default=4096, help="length of the one sequence per ring")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--json", type=Path, help="write the medians here")
    args = parser.parse_args()
    world_size, tokens, repeats = (2, 512, 2) if args.quick else (args.world_size, args.tokens, args.repeats)
    results = run_distributed(_measure, world_size, tokens, repeats)[0]  # rank 0 is in every group
    rows = {name: {"median_ms": statistics.median(values) * 1e3, "min_ms": min(values) * 1e3,
                   "max_ms": max(values) * 1e3, "repeats": len(values)} for name, values in results.items()}
    print(f"Group pool vs group-free ring: {world_size} gloo ranks, one causal sequence of {tokens} tokens, "
          "4 heads x 32, float32, forward+backward")
    print("| variant | median ms | min-max ms |\n| --- | --- | --- |")
    for name, row in rows.items():
        print(f"| {name} | {row['median_ms']:.2f} | {row['min_ms']:.2f}-{row['max_ms']:.2f} |")
    for degree in range(2, world_size + 1):
        pooled = rows[f"pooled subgroup, degree {degree}"]["median_ms"]
        free = rows[f"group-free world ring, degree {degree}"]["median_ms"]
        print(f"degree {degree}: group-free / pooled time = {free / pooled:.3f}")
    if args.json:
        args.json.write_text(json.dumps({"world_size": world_size, "tokens": tokens, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
