#!/usr/bin/env bash
# benchmarks/gpu_check.py as one command on the lent GPU machine (torch 2.11 + CUDA, Python 3.12, lightning,
# no hydra-core/omegaconf, no network).
#
#   bash benchmarks/gpu_check.sh prepare   # here, with the package registry: pure-Python wheels the GPU
#                                          # machine lacks -> benchmarks/gpu_wheels/ (git-ignored)
#   bash benchmarks/gpu_check.sh run       # there: installs them offline if missing, then the check
#   bash benchmarks/gpu_check.sh run --dry-run   # extra arguments go to gpu_check.py (here: on CPU)
#
# With the device tool: run(command="bash benchmarks/gpu_check.sh run", carry=["benchmarks/gpu_wheels"],
# timeout_s=540). The check stops itself after 480 s (CHECK_TIMEOUT_S); its JSON lands in $OUT/gpu_check.json
# (benchmarks/results/gpu/<date>.json without $OUT), written after every step, so a cut-short run keeps
# what it measured. Commit it under benchmarks/results/gpu/.
set -euo pipefail
cd "$(dirname "$0")/.."
WHEELS=benchmarks/gpu_wheels
PACKAGES=(hydra-core==1.3.2 omegaconf==2.3.0 antlr4-python3-runtime==4.9.3)  # antlr: hydra's exact pin

case "${1:-}" in
  prepare)
    rm -rf "$WHEELS" && mkdir -p "$WHEELS"
    python -m pip wheel --quiet --no-deps --wheel-dir "$WHEELS" "${PACKAGES[@]}"
    ls "$WHEELS"
    ;;
  run)
    if ! python -c "import hydra, omegaconf" 2>/dev/null; then
      python -m pip install --quiet --no-index --find-links "$WHEELS" "${PACKAGES[@]}"
    fi
    out="${OUT:-benchmarks/results/gpu}"
    mkdir -p "$out"
    timeout "${CHECK_TIMEOUT_S:-480}" python benchmarks/gpu_check.py --out "$out/gpu_check.json" \
      --main-job-timeout 180 "${@:2}"
    ;;
  *)
    echo "usage: bash benchmarks/gpu_check.sh prepare|run" >&2
    exit 2
    ;;
esac
