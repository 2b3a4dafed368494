"""One prepared check of the CUDA path on one NVIDIA GPU; every figure goes to one JSON file.

1. Correctness: every CUDA attention kernel that applies (torch's flash, flash-attn when installed,
   the memory-efficient kernel in varlen form and per sequence) against the math kernel in float64 on
   the same (rounded) inputs, fp32 and bf16, forward and backward (out, dq, dk, dv), causal and not, on
   a pack of mixed lengths with zero-length sequences and sequences shorter than 2 x degree. Degrees
   above 1 run every rank's blocks of the ring one after another in this process (no communication),
   so each kernel also sees the blocks with gaps between their rows and with queries != keys.
   Error = max |x - reference| / max(1, max |reference|); bf16 must stay under 2.5e-2, fp32 under 2e-3.
2. Timing: ``cp_attention`` forward + backward at degree 1, each varlen kernel against the
   per-sequence loop of the memory-efficient kernel, on a pack of 512 short sequences and on a few
   long ones; variants interleaved in a rotating order, warm-up, then repeats: median, min, max.
3. The main job for a few steps on this one GPU (``examples/vlm_finetune.py trainer=gpu
   trainer.devices=1``) in a subprocess, on video lengths drawn here (the shared data folder is not on
   the GPU machine); its exit code, wall time and the end of its output.

Writes ``benchmarks/results/gpu/<date>.json`` (device, torch/CUDA versions, every figure) after every
step, so a step that raises (recorded with its traceback) or a run cut short by its time limit still leaves
the steps before it; exits 1 when a check fails. One GPU cannot show NCCL or the ring across devices (the
JSON says so): ``serial_context_parallel`` runs every rank's blocks in one process. ``--dry-run`` runs the
same code on CPU with tiny sizes, CPU kernels standing in
(``cpu_flash`` for the varlen kernels, ``math`` for the per-sequence loop); the main job is only
described unless ``--main-job`` asks for it (then ``trainer=cpu``).

    python benchmarks/gpu_check.py                    # one NVIDIA GPU, about 5 minutes on an H200
    python benchmarks/gpu_check.py --dry-run --out /tmp/gpu_check_dry.json
    bash benchmarks/gpu_check.sh run                  # the same on the lent GPU machine (see that script)
"""

from __future__ import annotations

import argparse
import csv
import datetime
import itertools
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run from a checkout where the package is not installed (the GPU machine)

from lightning_dhp.attention import ZigzagLayout, cp_attention  # noqa: E402
from lightning_dhp.attention.blocks import AttentionProblem, backward_block, forward_block  # noqa: E402
from lightning_dhp.attention.kernels import (  # noqa: E402
    KERNELS,
    accumulation_dtype,
    default_scale,
    efficient_applies,
    flash_applies,
    flash_attn_available,
    select_kernel,
)
from lightning_dhp.attention.ring import empty_output  # noqa: E402
from lightning_dhp.simulate.provenance import git_commit, torch_version  # noqa: E402

TOLERANCE = {torch.float32: 2e-3, torch.float16: 5e-3, torch.bfloat16: 2.5e-2}
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
NOT_SHOWN = ["NCCL: the ring's point-to-point exchange, all-gather CP and FSDP2 collectives across GPUs",
             "the ring across devices: every rank's blocks run one after another in one process here",
             "multi-GPU steps of the main job (one GPU: groups of degree 1 only)"]


@dataclass(frozen=True)
class Sizes:
    """What one mode checks and times."""

    device: str
    heads: tuple[int, int]  # query heads, key/value heads (GQA)
    head_dims: tuple[int, ...]
    degrees: tuple[int, ...]
    check_lengths: tuple[int, ...]
    short_pack: tuple[int, int, int]  # sequences, shortest, longest
    long_pack: tuple[int, ...]
    timing_heads: tuple[int, int]
    timing_head_dim: int
    warmup: int
    repeats: int


GPU = Sizes(
    device="cuda",
    heads=(8, 2),
    head_dims=(64, 128),
    degrees=(1, 2, 4),
    check_lengths=(0, 1, 3, 7, 64, 0, 300, 1000, 5, 2048),
    short_pack=(512, 16, 128),
    long_pack=(16384, 8192, 4096, 4096),
    timing_heads=(16, 4),
    timing_head_dim=128,
    warmup=2,
    repeats=15,
)
DRY_RUN = Sizes(
    device="cpu",
    heads=(4, 2),
    head_dims=(8,),
    degrees=(1, 2),
    check_lengths=(0, 1, 3, 20, 0, 33, 2),
    short_pack=(32, 4, 16),
    long_pack=(96, 64),
    timing_heads=(2, 1),
    timing_head_dim=8,
    warmup=1,
    repeats=3,
)


def kernels_to_check(sizes: Sizes, dtype: torch.dtype, head_dim: int) -> list[str]:
    """The kernels that take this dtype and head size on this device (CPU kernels in a dry run)."""
    if sizes.device == "cpu":
        return ["cpu_flash", "math"]
    capability = torch.cuda.get_device_capability()
    flash = flash_applies(dtype, head_dim, capability)
    efficient = efficient_applies(dtype, head_dim, capability)
    names = []
    if flash:
        names.append("cuda_flash")
    if flash and flash_attn_available():
        names.append("flash_attn")
    if efficient:
        names += ["cuda_efficient", "cuda_efficient_per_sequence"]
    return names


def timing_variants(sizes: Sizes) -> tuple[list[str], str]:
    """The varlen kernels to time and the per-sequence loop they are measured against."""
    per_sequence = "math" if sizes.device == "cpu" else "cuda_efficient_per_sequence"
    varlen = ["cpu_flash"] if sizes.device == "cpu" else [
        kernel for kernel in kernels_to_check(sizes, torch.bfloat16, sizes.timing_head_dim) if kernel != per_sequence
    ]
    return varlen, per_sequence


def random_pack(lengths, heads, head_dim, dtype, device, seed):
    """q, k, v and an upstream gradient of a packed batch, drawn in float64 and rounded to ``dtype``."""
    generator = torch.Generator().manual_seed(seed)
    total, (heads_q, heads_kv) = sum(lengths), heads
    shapes = [(total, heads_q, head_dim), (total, heads_kv, head_dim), (total, heads_kv, head_dim)]
    shapes.append(shapes[0])
    return [torch.randn(shape, generator=generator, dtype=torch.float64).to(device, dtype) for shape in shapes]


def serial_context_parallel(q, k, v, upstream, lengths, degree, kernel, causal):
    """Out, dq, dk, dv of ring attention over ``degree`` ranks, every rank's blocks run one after the
    other in this process (the ring's block calls and merges, without its communication)."""
    layouts = [ZigzagLayout(lengths, degree, rank) for rank in range(degree)]
    shards = [[layout.shard(x) for x in (q, k, v, upstream)] for layout in layouts]
    problems = [AttentionProblem(layout, causal, default_scale(q.shape[-1]), KERNELS[kernel]) for layout in layouts]
    outs, lses = [], []
    for rank, problem in enumerate(problems):
        out, lse = empty_output(shards[rank][0])
        for step in range(degree):
            source = (rank - step) % degree
            forward_block(problem, source, shards[rank][0], *shards[source][1:3], out, lse, first=step == 0)
            if step == 0:
                problem.zero_padding_rows(out)
        outs.append(out.to(q.dtype))
        lses.append(lse)
    dtype = accumulation_dtype(q.dtype)
    grads = [[torch.zeros(x.shape, dtype=dtype, device=q.device) for x in shards[rank][:3]] for rank in range(degree)]
    for rank, problem in enumerate(problems):
        for source in range(degree):
            backward_block(problem, source, shards[rank][3], shards[rank][0], *shards[source][1:3], outs[rank],
                           lses[rank], grads[rank][0], grads[source][1], grads[source][2], first=False)
    unshard = layouts[0].unshard
    return [unshard(outs), *(unshard([grads[rank][i] for rank in range(degree)]) for i in range(3))]


def relative_error(value: torch.Tensor, reference: torch.Tensor) -> float:
    if not reference.numel():
        return 0.0
    scale = max(1.0, reference.abs().max().item())
    return (value.double() - reference).abs().max().item() / scale


def check_kernels(sizes: Sizes) -> list[dict]:
    """Every kernel, dtype, head size, degree and mask against the float64 math kernel."""
    rows = []
    lengths = list(sizes.check_lengths)
    for (dtype_index, dtype), head_dim, causal in itertools.product(enumerate(DTYPES), sizes.head_dims, (True, False)):
        inputs = random_pack(lengths, sizes.heads, head_dim, dtype, sizes.device, seed=10 * dtype_index + head_dim)
        reference = serial_context_parallel(*(x.double() for x in inputs), lengths, 1, "math", causal)
        for kernel in kernels_to_check(sizes, dtype, head_dim):
            for degree in sizes.degrees:
                row = {"kernel": kernel, "dtype": str(dtype).removeprefix("torch."), "head_dim": head_dim,
                       "causal": causal, "degree": degree, "lengths": lengths, "tolerance": TOLERANCE[dtype]}
                try:
                    results = serial_context_parallel(*inputs, lengths, degree, kernel, causal)
                except RuntimeError as error:  # a kernel refusing its inputs is a failed check, not a crash
                    rows.append({**row, "error": str(error).splitlines()[0], "passed": False})
                    continue
                errors = dict(zip(("out", "dq", "dk", "dv"), map(relative_error, results, reference), strict=True))
                rows.append({**row, "errors": errors, "passed": max(errors.values()) < TOLERANCE[dtype]})
    return rows


def _synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def time_variants(steps: dict[str, Callable[[], None]], sizes: Sizes) -> dict[str, dict]:
    """Seconds of each step: warm-up, then repeats in a rotating order (no variant always runs first)."""
    names = list(steps)
    for _ in range(sizes.warmup):
        for name in names:
            steps[name]()
    seconds: dict[str, list[float]] = {name: [] for name in names}
    for repeat in range(sizes.repeats):
        for name in names[repeat % len(names):] + names[: repeat % len(names)]:
            _synchronize(sizes.device)
            started = time.perf_counter()
            steps[name]()
            _synchronize(sizes.device)
            seconds[name].append(time.perf_counter() - started)
    return {
        name: {"median_s": statistics.median(values), "min_s": min(values), "max_s": max(values), "seconds": values}
        for name, values in seconds.items()
    }


def attention_step(lengths, kernel, sizes: Sizes, seed: int) -> Callable[[], None]:
    """cp_attention forward + backward on a bf16 pack at degree 1 with ``kernel``."""
    q, k, v, upstream = random_pack(lengths, sizes.timing_heads, sizes.timing_head_dim, torch.bfloat16,
                                    sizes.device, seed)
    layout = ZigzagLayout(lengths, 1, 0)
    leaves = [x.requires_grad_() for x in (q, k, v)]

    def step() -> None:
        torch.autograd.grad(cp_attention(*leaves, layout, kernel=kernel), leaves, upstream)

    return step


def time_packs(sizes: Sizes) -> dict[str, dict]:
    """Varlen kernels against the per-sequence loop, on many short sequences and on a few long ones."""
    count, shortest, longest = sizes.short_pack
    generator = torch.Generator().manual_seed(0)
    packs = {
        f"{count} sequences of {shortest}-{longest} tokens":
            torch.randint(shortest, longest + 1, (count,), generator=generator).tolist(),
        "long sequences " + "+".join(map(str, sizes.long_pack)): list(sizes.long_pack),
    }
    varlen, per_sequence = timing_variants(sizes)
    results = {}
    for pack_index, (name, lengths) in enumerate(packs.items()):
        steps = {kernel: attention_step(lengths, kernel, sizes, seed=pack_index) for kernel in [*varlen, per_sequence]}
        timings = time_variants(steps, sizes)
        ratios = {kernel: timings[per_sequence]["median_s"] / timings[kernel]["median_s"] for kernel in varlen}
        results[name] = {"lengths": lengths, "tokens": sum(lengths), "heads": list(sizes.timing_heads),
                         "head_dim": sizes.timing_head_dim, "dtype": "bfloat16", "causal": True,
                         "per_sequence_kernel": per_sequence, "timings": timings,
                         "per_sequence_over_varlen": ratios}
    return results


def write_video_metadata(path: Path, count: int = 2000) -> None:
    """Video durations (log-normal, median 90 s, 2-600 s) for the main job's data set."""
    generator = torch.Generator().manual_seed(0)
    durations = (torch.randn(count, generator=generator, dtype=torch.float64) * 0.8 + 4.5).exp().clamp(2, 600)
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["sample_id", "subset", "duration_s"])
        writer.writerows((f"v{i}", "training", f"{duration:.2f}") for i, duration in enumerate(durations.tolist()))


def main_job(sizes: Sizes, steps: int, run: bool, timeout_s: float) -> dict:
    """The example's main job for ``steps`` steps on one device, in a subprocess of its own."""
    trainer = "gpu" if sizes.device == "cuda" else "cpu"
    with tempfile.TemporaryDirectory(prefix="dhp_gpu_check_") as folder:
        write_video_metadata(Path(folder) / "durations.csv")
        command = [sys.executable, "examples/vlm_finetune.py", f"trainer={trainer}", "trainer.devices=1",
                   f"trainer.max_steps={steps}", "strategy.tokens_per_device=4096",  # the longest sample: 1033
                   "pretrain.steps=20", "eval.num_samples=16",
                   f"pretrain.cache_dir={folder}/cache", f"data.metadata_file={folder}/durations.csv",
                   f"hydra.run.dir={folder}/run"]
        result = {"command": " ".join(command[1:]).replace(folder, "<tmp>"), "steps": steps, "ran": run}
        if not run:
            return result
        started = time.perf_counter()
        try:
            env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
            process = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout_s)
            returncode, output = process.returncode, process.stdout + process.stderr
        except subprocess.TimeoutExpired as expired:
            returncode, output = None, f"timed out after {timeout_s} s\n{expired.stdout or ''}{expired.stderr or ''}"
        summary_file = Path(folder) / "run" / "summary.json"
        summary = json.loads(summary_file.read_text()) if summary_file.exists() else None
        return {**result, "returncode": returncode, "wall_s": time.perf_counter() - started,
                "summary": summary, "output_tail": output[-3000:].replace(folder, "<tmp>"),
                "passed": returncode == 0 and summary is not None and summary.get("steps") == steps}


def environment(sizes: Sizes) -> dict:
    info = {"torch": torch_version(), "cuda": torch.version.cuda, "python": platform.python_version(),
            "device": sizes.device, "flash_attn": flash_attn_available()}
    if sizes.device == "cuda":
        info |= {"device_name": torch.cuda.get_device_name(), "capability": list(torch.cuda.get_device_capability()),
                 "cudnn": torch.backends.cudnn.version(), "driver_devices": torch.cuda.device_count()}
    else:
        info["device_name"] = platform.processor() or platform.machine()
    device = torch.device(sizes.device, 0) if sizes.device == "cuda" else torch.device("cpu")
    info["chosen_kernel"] = {f"{str(dtype).removeprefix('torch.')}, head_dim {head_dim}":
                             select_kernel(device, dtype, head_dim=head_dim).name
                             for dtype in DTYPES for head_dim in sizes.head_dims}
    return info


def _passed(result: list | dict) -> bool:
    if isinstance(result, list):
        return all(row["passed"] for row in result)
    return result.get("passed", True)


def summarize(name: str, result: list | dict) -> None:
    """One line per step on stdout (the JSON holds the rest)."""
    if isinstance(result, dict) and "error" in result:
        print(f"  {name}: raised\n{result['error']}", flush=True)
    elif name == "correctness":
        failed = [row for row in result if not row["passed"]]
        print(f"  correctness: {len(result) - len(failed)}/{len(result)} passed", flush=True)
        for row in failed:
            print(f"    FAILED {row}", flush=True)
    elif name == "timing":
        for pack, timing in result.items():
            medians = ", ".join(f"{kernel} {t['median_s'] * 1e3:.2f} ms" for kernel, t in timing["timings"].items())
            print(f"  {pack}: {medians}", flush=True)
    elif result.get("ran"):
        print(f"  main job: exit {result['returncode']} in {result['wall_s']:.1f} s", flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dry-run", action="store_true", help="CPU, tiny sizes, CPU kernels standing in")
    parser.add_argument("--out", type=Path, help="JSON path (default benchmarks/results/gpu/<date>.json)")
    parser.add_argument("--main-job-steps", type=int, default=20)
    parser.add_argument("--main-job", action=argparse.BooleanOptionalAction, default=None,
                        help="run the main job (default: on a GPU run, off in a dry run)")
    parser.add_argument("--main-job-timeout", type=float, default=240.0)
    args = parser.parse_args(argv)
    sizes = DRY_RUN if args.dry_run else GPU
    if sizes.device == "cuda" and not torch.cuda.is_available():
        parser.error("no CUDA device: run on a machine with an NVIDIA GPU, or pass --dry-run")
    started = time.perf_counter()
    stamp = datetime.datetime.now(datetime.timezone.utc)
    out = args.out or REPO / "benchmarks" / "results" / "gpu" / f"{stamp:%Y-%m-%d}.json"
    report = {"date": stamp.isoformat(timespec="seconds"), "mode": "dry-run" if args.dry_run else "gpu",
              "command": "python benchmarks/gpu_check.py " + " ".join(argv if argv is not None else sys.argv[1:]),
              "commit": git_commit(short=False), "environment": environment(sizes)}
    print(f"gpu_check ({report['mode']}): {report['environment']['device_name']}", flush=True)
    report["not_shown"] = NOT_SHOWN
    run_main_job = args.main_job if args.main_job is not None else not args.dry_run

    def write() -> None:
        report["wall_s"] = time.perf_counter() - started
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(report, indent=2) + "\n")

    steps = {"correctness": lambda: check_kernels(sizes), "timing": lambda: time_packs(sizes),
             "main_job": lambda: main_job(sizes, args.main_job_steps, run_main_job, args.main_job_timeout)}
    for name, step in steps.items():
        try:
            report[name] = step()
        except Exception:  # one failing step must not cost the others' figures
            report[name] = {"error": traceback.format_exc(), "passed": False}
        summarize(name, report[name])
        write()
    report["passed"] = all(_passed(report[name]) for name in steps)
    write()
    print(f"  {'passed' if report['passed'] else 'FAILED'} in {report['wall_s']:.1f} s -> {out}", flush=True)
    return 0 if report["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
