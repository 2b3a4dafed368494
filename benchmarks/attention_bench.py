"""Context-parallel attention on this CPU: CP efficiency and the cost of packs of short sequences.

1. CP efficiency of one long causal sequence, forward + backward: the dense single-process time over
   ``degree x`` the per-rank time at degrees 2 and 4, ring vs all-gather. All variants run interleaved in
   one gloo world (``lightning_dhp.testing.run_distributed``; ranks outside a variant's group wait at a
   barrier), one thread per rank.
   The per-rank time of a repeat is the slowest rank's. Reported from wall time and from process CPU
   time: with more ranks than cores the wall time also counts waiting for a core.
2. A pack of many short causal sequences at degree 1: cp_attention (one kernel call per sequence and
   block) against one SDPA call on the pack padded to a ``(sequences, heads, longest, head_dim)`` batch
   and against the bare CPU flash kernel called once per sequence without any bookkeeping (the floor
   of per-sequence calls). The overhead column is (variant - padded SDPA) / number of sequences.

Usage: python benchmarks/attention_bench.py [--quick] [--json PATH] [--part efficiency|short_pack] [--repeats N]
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import time

import torch
import torch.distributed as dist

from lightning_dhp.attention import ZigzagLayout, cp_attention
from lightning_dhp.simulate.provenance import stamp
from lightning_dhp.testing import run_distributed

EFFICIENCY_TIMEOUT_S = 1800.0  # the full run on a loaded 2-core machine takes minutes; a hang fails here


def fwd_bwd_seconds(step) -> tuple[float, float]:
    """Wall and process-CPU seconds of one ``step()``."""
    wall, cpu = time.perf_counter(), time.process_time()
    step()
    return time.perf_counter() - wall, time.process_time() - cpu


def attention_step(layout, heads, head_dim, *, group=None, ranks=None, implementation="ring"):
    """A closure running cp_attention forward + backward on random float32 inputs of ``layout``."""
    generator = torch.Generator().manual_seed(layout.rank)
    q, k, v, grad = (torch.randn(layout.num_local_tokens, heads, head_dim, generator=generator) for _ in range(4))
    for x in (q, k, v):
        x.requires_grad_()

    def step():
        out = cp_attention(q, k, v, layout, group, ranks=ranks, implementation=implementation)
        out.backward(grad)

    return step


def _efficiency_timings(rank: int, world_size: int, config: dict) -> dict[str, list[tuple[float, float]]]:
    """This rank's (wall, CPU) seconds of every variant it takes part in, per measured repeat."""
    variants = [("dense", 1)] + [(impl, degree) for degree in config["degrees"] for impl in ("ring", "allgather")]
    subgroups = {
        degree: dist.group.WORLD if degree == world_size else dist.new_group(list(range(degree)))
        for degree in config["degrees"]
    }
    steps = {}
    for implementation, degree in variants:
        if rank < degree:
            layout = ZigzagLayout([config["seq_len"]], degree, rank)
            group = subgroups.get(degree)
            steps[implementation, degree] = attention_step(
                layout,
                config["heads"],
                config["head_dim"],
                group=group,
                implementation="ring" if implementation == "dense" else implementation,
            )
    timings = {f"{impl}@{degree}": [] for impl, degree in variants}
    for repeat in range(config["warmup"] + config["repeats"]):
        for implementation, degree in variants:
            dist.barrier()
            if rank < degree:
                seconds = fwd_bwd_seconds(steps[implementation, degree])
                if repeat >= config["warmup"]:
                    timings[f"{implementation}@{degree}"].append(seconds)
            dist.barrier()
    return timings


def median_and_spread(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def cp_efficiency(config: dict) -> dict:
    per_rank = run_distributed(_efficiency_timings, max(config["degrees"]), config, timeout_s=EFFICIENCY_TIMEOUT_S)
    results = {}
    for variant in per_rank[0]:
        degree = int(variant.split("@")[1])
        # A repeat takes as long as its slowest rank.
        repeats = list(zip(*(per_rank[rank][variant] for rank in range(degree)), strict=True))
        results[variant] = {
            clock: median_and_spread([max(times[index] for times in repeat) for repeat in repeats])
            for index, clock in enumerate(("wall_s", "cpu_s"))
        }
    for variant, timing in results.items():
        degree = int(variant.split("@")[1])
        for clock in ("wall_s", "cpu_s"):
            dense = results["dense@1"][clock]["median"]
            timing[f"efficiency_{clock[:-2]}"] = dense / (degree * timing[clock]["median"])
    return results


def short_pack_overhead(config: dict) -> dict:
    torch.set_num_threads(1)
    generator = torch.Generator().manual_seed(0)
    seq_lens = torch.randint(
        config["short_min"], config["short_max"] + 1, (config["num_short"],), generator=generator
    ).tolist()
    heads, head_dim = config["heads"], config["head_dim"]
    layout = ZigzagLayout(seq_lens, 1, 0)
    packed = [
        torch.randn(layout.num_local_tokens, heads, head_dim, generator=generator).requires_grad_() for _ in range(3)
    ]
    padded = [
        torch.randn(len(seq_lens), heads, max(seq_lens), head_dim, generator=generator).requires_grad_()
        for _ in range(3)
    ]
    starts = layout.local_cu_seqlens.tolist()
    sdpa = torch.nn.functional.scaled_dot_product_attention
    flash = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
    flash_backward = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward

    def cp_attention_packed():
        cp_attention(*packed, layout).sum().backward()

    def bare_kernel_per_sequence():
        q, k, v = (x.detach().transpose(0, 1).unsqueeze(0) for x in packed)
        for a, b in itertools.pairwise(starts):
            out, lse = flash(q[:, :, a:b], k[:, :, a:b], v[:, :, a:b], 0.0, True)
            flash_backward(torch.ones_like(out), q[:, :, a:b], k[:, :, a:b], v[:, :, a:b], out, lse, 0.0, True)

    def sdpa_padded_batch():
        sdpa(*padded, is_causal=True).sum().backward()

    variants = {step.__name__: step for step in (cp_attention_packed, bare_kernel_per_sequence, sdpa_padded_batch)}
    timings = {name: [] for name in variants}
    for repeat in range(config["warmup"] + config["repeats"]):
        for name, step in variants.items():
            seconds = fwd_bwd_seconds(step)[0]
            if repeat >= config["warmup"]:
                timings[name].append(seconds)
    results = {name: median_and_spread(values) for name, values in timings.items()}
    baseline = results["sdpa_padded_batch"]["median"]
    for timing in results.values():
        timing["overhead_per_sequence_us"] = (timing["median"] - baseline) / len(seq_lens) * 1e6
    return {"num_sequences": len(seq_lens), "num_tokens": sum(seq_lens), "timings_s": results}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes, one repeat (smoke test)")
    parser.add_argument("--json", help="write the results to this path")
    parser.add_argument("--part", choices=["all", "efficiency", "short_pack"], default="all", help="what to run")
    parser.add_argument("--repeats", type=int, help="measured repeats (default: 1 quick, 3 full)")
    args = parser.parse_args()
    if args.quick:
        config = {
            "seq_len": 512,
            "heads": 2,
            "head_dim": 32,
            "degrees": [2],
            "repeats": 1,
            "warmup": 0,
            "num_short": 32,
            "short_min": 4,
            "short_max": 32,
        }
    else:
        config = {
            "seq_len": 16384,
            "heads": 4,
            "head_dim": 64,
            "degrees": [2, 4],
            "repeats": 3,
            "warmup": 1,
            "num_short": 512,
            "short_min": 8,
            "short_max": 64,
        }
    if args.repeats is not None:
        config["repeats"] = args.repeats
    results = {**stamp(torch=True), "config": config}
    print(f"config: {config}, {results['machine']}, torch {results['torch']}, 1 thread per rank")
    if args.part in ("all", "efficiency"):
        results["cp_efficiency"] = report_efficiency(config)
    if args.part in ("all", "short_pack"):
        results["short_pack"] = report_short_pack(config)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


def report_efficiency(config: dict) -> dict:
    efficiency = cp_efficiency(config)
    print(
        f"\nCP efficiency, one causal sequence of {config['seq_len']} tokens, fwd+bwd, float32 "
        f"(median over {config['repeats']} repeats [min, max]):"
    )
    print(f"{'variant':<14}{'wall s':>24}{'cpu s':>24}{'eff(wall)':>11}{'eff(cpu)':>10}")
    for variant, timing in efficiency.items():
        cells = [f"{t['median']:.3f} [{t['min']:.3f}, {t['max']:.3f}]" for t in (timing["wall_s"], timing["cpu_s"])]
        print(
            f"{variant:<14}{cells[0]:>24}{cells[1]:>24}{timing['efficiency_wall']:>11.2f}"
            f"{timing['efficiency_cpu']:>10.2f}"
        )
    return efficiency


def report_short_pack(config: dict) -> dict:
    short = short_pack_overhead(config)
    print(
        f"\nPack of {short['num_sequences']} short causal sequences ({short['num_tokens']} tokens, lengths "
        f"{config['short_min']}-{config['short_max']}) at degree 1, fwd+bwd:"
    )
    print(f"{'variant':<34}{'seconds':>26}{'vs padded SDPA, us/seq':>24}")
    for name, timing in short["timings_s"].items():
        cell = f"{timing['median']:.4f} [{timing['min']:.4f}, {timing['max']:.4f}]"
        print(f"{name:<34}{cell:>26}{timing['overhead_per_sequence_us']:>24.1f}")
    return short


if __name__ == "__main__":
    main()
