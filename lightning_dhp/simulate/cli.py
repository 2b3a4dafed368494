"""``python -m lightning_dhp.simulate`` (``dhp-simulate``): parse the options, simulate, print and write
the report."""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
from collections.abc import Sequence
from pathlib import Path

from lightning_dhp.data.lengths import DISTRIBUTIONS, LengthFileError
from lightning_dhp.planner import CostModel, PlanError
from lightning_dhp.simulate.config import DEFAULT_DEVICES, PRESETS, SimulationConfig, SimulationError
from lightning_dhp.simulate.replay import simulate
from lightning_dhp.simulate.report import format_markdown
from lightning_dhp.simulate.results import SimulationResult
from lightning_dhp.simulate.sources import MULTIMODAL_DISTRIBUTIONS, LengthSource, csv_source, named_source

QUICK_DEVICES = (8, 16, 64)
QUICK_DISTRIBUTIONS = ("epic_kitchens_segments",)


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} must be an integer >= 1")
    return value


def _device_counts(text: str) -> tuple[int, ...]:
    counts = tuple(_positive_int(part.strip()) for part in text.split(","))
    if list(counts) != sorted(set(counts)):
        raise argparse.ArgumentTypeError(f"{text!r} must list distinct device counts in increasing order")
    return counts


def _rule_param(text: str) -> tuple[str, float]:
    key, _, value = text.partition("=")
    try:
        number = float(value)
    except ValueError:
        number = math.nan
    if not key.strip() or not math.isfinite(number):
        raise argparse.ArgumentTypeError(f"{text!r} must look like KEY=NUMBER, e.g. sample_fps=2")
    return key.strip(), int(number) if number.is_integer() else number


def build_parser() -> argparse.ArgumentParser:
    """The CLI of ``python -m lightning_dhp.simulate``."""
    defaults = SimulationConfig()
    parser = argparse.ArgumentParser(
        prog="python -m lightning_dhp.simulate",
        description="Replay token-length distributions through DHP and static context parallelism "
        "(ring and Ulysses) at cluster scale under a cost model; print a markdown report.",
    )
    source = parser.add_argument_group("lengths")
    source.add_argument("--dist", action="append", metavar="NAME",
                        help=f"named distribution (repeatable; default: all, --quick: "
                        f"{', '.join(QUICK_DISTRIBUTIONS)}); one of {sorted(DISTRIBUTIONS)}, or a video and a text "
                        f"one with vision patches on the videos: {', '.join(MULTIMODAL_DISTRIBUTIONS)}")
    source.add_argument("--param", action="append", type=_rule_param, default=[], metavar="KEY=NUMBER",
                        help="override a constant of the named distributions' rules, e.g. sample_fps=2")
    source.add_argument("--data-dir",
                        help="folder of the shared metadata CSVs (default: $DHP_DATA_DIR or ../shared/data)")
    source.add_argument("--csv", help="your own CSV of per-sample metadata (used instead of the named ones "
                        "unless --dist is given too)")
    source.add_argument("--column", help="--csv column to turn into tokens: ceil(column * scale + offset)")
    source.add_argument("--scale", type=float, default=1.0, help="tokens per unit of --column (default 1)")
    source.add_argument("--offset", type=float, default=0.0, help="tokens added to every --csv sample (default 0)")
    cluster = parser.add_argument_group("cluster")
    cluster.add_argument("--devices", type=_device_counts,
                         help=f"comma-separated device counts (default {','.join(map(str, DEFAULT_DEVICES))}; "
                         f"--quick {','.join(map(str, QUICK_DEVICES))})")
    cluster.add_argument("--samples-per-device", type=_positive_int, default=defaults.samples_per_device,
                         help="global batch = this x devices (default %(default)s)")
    cluster.add_argument("--tokens-per-device", type=_positive_int,
                         help=f"per-device token capacity C (default {defaults.tokens_per_device}, or the preset's)")
    cluster.add_argument("--vision-patches-per-device", type=_positive_int,
                         help="per-device vision-tower patch budget: a group of d devices holds at most d x this "
                         "many patches (default: none, the tower's memory is not budgeted; no preset sets one)")
    cluster.add_argument("--node-size", type=_positive_int, default=defaults.node_size,
                         help="devices per node; wider groups pay the inter-node bandwidth (default %(default)s)")
    cluster.add_argument("--cost-model", help="CostModel JSON (CostModel.save); default CostModel.default()")
    cluster.add_argument("--preset", choices=sorted(PRESETS),
                         help="the DHP paper's setting: the model's cost model on the device "
                         "(CostModel.for_transformer), its token budget, Ulysses heads and video distributions")
    cluster.add_argument("--steps", type=_positive_int,
                         help=f"global batches per device count (default {defaults.steps}, --quick 3)")
    cluster.add_argument("--pool-size", type=_positive_int, default=defaults.pool_size,
                         help="process-group pool capacity, as DHPStrategy(pool_size=...) (default %(default)s)")
    cluster.add_argument("--ulysses-heads", type=_positive_int,
                         help=f"Ulysses degrees must divide this head count (default {defaults.ulysses_heads}: "
                         "the KV heads, or the preset's)")
    cluster.add_argument("--ulysses-volume-ratio", type=float,
                         help="Ulysses all-to-all bytes per token over the ring's kv_bytes_per_token (default "
                         "10/3, or the preset's)")
    cluster.add_argument("--seed", type=int, default=defaults.seed, help="batch shuffling seed (default %(default)s)")
    output = parser.add_argument_group("output")
    output.add_argument("--quick", action="store_true", help="small fast run (few steps, devices and distributions)")
    output.add_argument("--out", help="folder for simulation.md")
    output.add_argument("--json", help="write the full result as JSON to this path")
    return parser


def _sources(args: argparse.Namespace) -> list[LengthSource]:
    params = dict(args.param)
    if args.csv is None and args.column is not None:
        raise SimulationError("--column needs --csv PATH (the file that holds that column)")
    if args.csv is not None and args.column is None:
        raise SimulationError(f"--csv {args.csv} needs --column NAME: the column to turn into token lengths")
    defaults = PRESETS[args.preset].distributions if args.preset else DISTRIBUTIONS
    names = args.dist or ([] if args.csv else list(QUICK_DISTRIBUTIONS if args.quick else defaults))
    sources = [named_source(name, data_dir=args.data_dir, params=params) for name in names]
    if args.csv:
        sources.append(csv_source(args.csv, args.column, scale=args.scale, offset=args.offset))
    return sources


def _cost_model(path: str | None, preset: str | None) -> CostModel:
    if preset is not None:
        if path is not None:
            raise SimulationError(f"--cost-model {path} and --preset {preset} both set the cost model; pass one")
        return PRESETS[preset].cost_model()
    if path is None:
        return CostModel.default()
    try:
        return CostModel.load(path)
    except FileNotFoundError:
        raise SimulationError(f"--cost-model {path} does not exist; pass a file written by CostModel.save") from None
    except (ValueError, TypeError) as error:
        raise SimulationError(
            f"--cost-model {path} is not a CostModel JSON ({error}); write one with CostModel.save"
        ) from None


def run(argv: Sequence[str] | None = None, *, prog: str | None = None) -> tuple[argparse.Namespace, SimulationResult]:
    """Parse the CLI's arguments and simulate; bad input exits with code 2 and the reason on stderr."""
    parser = build_parser()
    if prog:
        parser.prog = prog
    args = parser.parse_args(argv)
    defaults, preset = SimulationConfig(), PRESETS.get(args.preset)
    preset_heads, preset_ratio = preset.ulysses() if preset else (defaults.ulysses_heads, defaults.ulysses_volume_ratio)
    budget = preset.tokens_per_device if preset else defaults.tokens_per_device
    ratio = args.ulysses_volume_ratio if args.ulysses_volume_ratio is not None else preset_ratio
    if ratio < 0 or not math.isfinite(ratio):
        parser.error(f"--ulysses-volume-ratio {ratio} must be a finite number >= 0")
    config = SimulationConfig(
        devices=args.devices or (QUICK_DEVICES if args.quick else DEFAULT_DEVICES),
        samples_per_device=args.samples_per_device,
        tokens_per_device=args.tokens_per_device or budget,
        vision_patches_per_device=args.vision_patches_per_device,
        node_size=args.node_size,
        steps=args.steps or (3 if args.quick else defaults.steps),
        pool_size=args.pool_size,
        ulysses_heads=args.ulysses_heads or preset_heads,
        ulysses_volume_ratio=ratio,
        seed=args.seed,
    )
    try:
        cost = _cost_model(args.cost_model, args.preset)
        sources = _sources(args)
        result = simulate(sources, config, cost, progress=lambda message: print(message, file=sys.stderr))
    except (SimulationError, LengthFileError, PlanError) as error:
        parser.exit(2, f"{parser.prog}: error: {error}\n")
    return args, dataclasses.replace(result, preset=preset)


def write_outputs(args: argparse.Namespace, report: str, result: SimulationResult) -> None:
    """Print ``report``; write it to ``--out``/simulation.md and ``result`` to ``--json`` when given."""
    print(report, end="")
    if args.out:
        out_dir = Path(args.out)
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "simulation.md").write_text(report)
    if args.json:
        Path(args.json).write_text(json.dumps(result.to_json(), indent=2) + "\n")


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; returns the exit code (2 on bad input, with the reason on stderr)."""
    args, result = run(argv)
    write_outputs(args, format_markdown(result), result)
    return 0
