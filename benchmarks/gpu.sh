#!/usr/bin/env bash
# The GPU part of jasper's benchmark suite, for a machine with CUDA and PyTorch already installed
# and no network. Usage:
#
#   JASPER_BENCH_OUT=/path/to/results bash benchmarks/gpu.sh [run.py options...]
#
# Installs the repository's packages without dependencies or downloads (pip --no-deps
# --no-build-isolation --no-index; where pip cannot build them, offline_install.py makes them
# discoverable through PYTHONPATH instead), then runs `run.py --gpu-only` at 10^6 pairs (D=384,
# n_neg=8, fp32): preload onto the GPU vs raw read + pinned copy, GPU memory, the GPU loader vs
# the on-device index_select loop, the pinned host-to-device ceiling. Results (report.md,
# benchmark.json, charts) land in $JASPER_BENCH_OUT. Sized for under 8 minutes on one current data-centre GPU;
# pass e.g. `--pairs 200000` to shorten it.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${PYTHON:-python}"
OUT="${JASPER_BENCH_OUT:-$ROOT/benchmarks/results/$(date -u +%Y%m%dT%H%M%SZ)-gpu}"
export JASPER_BENCH_CACHE="${JASPER_BENCH_CACHE:-$ROOT/benchmarks/.cache}"
export TQDM_DISABLE=1

"$PY" - <<'PY'
import sys
missing = []
for mod in ("torch", "numpy", "pytest", "pluggy", "xxhash", "packaging", "tqdm"):
    try:
        __import__(mod)
    except ImportError:
        missing.append(mod)
if missing:
    sys.exit(f"gpu.sh: missing Python modules {missing}; they cannot be downloaded here")
import torch
if not torch.cuda.is_available():
    print("gpu.sh: warning: torch sees no CUDA device; every GPU benchmark will be skipped",
          file=sys.stderr)
PY

failed=0
for pkg in "$ROOT"/packages/*/; do
  [ -f "$pkg/pyproject.toml" ] || continue
  if ! "$PY" -m pip install --no-deps --no-build-isolation --no-index -q -e "$pkg" >/dev/null 2>&1
  then
    failed=1
  fi
done
if [ "$failed" = 1 ]; then
  echo "gpu.sh: pip could not install every package offline; using offline_install.py" >&2
  PYTHONPATH="$("$PY" "$ROOT/benchmarks/offline_install.py" "$OUT/.site")"
  export PYTHONPATH
fi
"$PY" -c "import jasper; print('jasper backends:', ', '.join(jasper.list_backends()))"

mkdir -p "$OUT"
nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1 || true
cd "$ROOT"
exec "$PY" benchmarks/run.py --gpu-only --out "$OUT" "$@"
