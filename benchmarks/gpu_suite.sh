#!/usr/bin/env bash
# GPU benchmark suite for a fresh GPU machine.
#
#   benchmarks/gpu_suite.sh OUTDIR
#
# 1. environment: a virtual environment (benchmarks/out/.venv-gpu, git-ignored, or $ZEROCOMM_VENV) with
#    `pip install -r requirements.txt`, or the current python when
#    ZEROCOMM_USE_CURRENT_PY=1;
# 2. build: `pip install --no-build-isolation -e .` with CUDA_HOME=/usr/local/cuda
#    and ZEROCOMM_REQUIRE_CUDA=1 (a CPU-only build is an error here; ZEROCOMM_SKIP_BUILD=1
#    uses an extension that is already built);
# 3. the test suite (`python -m pytest -q tests`: CUDA tests and CPU tests);
# 4. benchmarks/flatten.py --device cuda;
# 5. torchrun --nproc-per-node 1 benchmarks/overlap.py --device cuda (NCCL world
#    size 1 + the simulated transport); $ZEROCOMM_OVERLAP_NPROC > 1 runs it again
#    on that many GPUs;
# 6. benchmarks/scale_model.py (CPU alpha/beta fit, GPU profile from flags; add
#    your fabric's figures via $ZEROCOMM_SCALE_ARGS, e.g. "--gpu-alpha-us 8 --gpu-beta-gbps 45").
#
# Everything lands in OUTDIR: one log per stage, nvidia-smi output, env.txt, the
# benchmarks' JSON/PNG, and status.txt (one line per stage: OK / FAILED rc / SKIPPED).
# Set-up stages (1, 2) stop the suite when they fail; a failing test or benchmark
# stage is recorded and the next stage runs. Exit status: 0 when every stage passed.
set -euo pipefail

if [[ $# -ne 1 ]]; then
  echo "usage: $0 OUTDIR" >&2
  exit 2
fi
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
mkdir -p "$1"
OUT="$(cd "$1" && pwd)"
cd "$ROOT"
export CUDA_HOME="${CUDA_HOME:-/usr/local/cuda}"
export PYTHONUNBUFFERED=1
STATUS="$OUT/status.txt"
: > "$STATUS"
FAILED=0
T0=$(date +%s)

note() { echo "[gpu_suite $(date +%H:%M:%S)] $*"; }

# stage NAME TIMEOUT_S CMD...: run CMD with its output in OUT/NAME.log; record the result.
stage() {
  local name="$1" limit="$2"
  shift 2
  local start rc=0
  start=$(date +%s)
  note "stage $name: $*"
  timeout --signal=TERM --kill-after=30 "$limit" "$@" > "$OUT/$name.log" 2>&1 || rc=$?
  local secs=$(( $(date +%s) - start ))
  if [[ $rc -eq 0 ]]; then
    echo "$name OK ${secs}s" >> "$STATUS"
  else
    [[ $rc -eq 124 ]] && echo "(timed out after ${limit}s)" >> "$OUT/$name.log"
    echo "$name FAILED rc=$rc ${secs}s (see $name.log)" >> "$STATUS"
    FAILED=1
    note "stage $name FAILED (rc=$rc); last lines:"
    tail -n 15 "$OUT/$name.log" || true
  fi
  return $rc
}

# required NAME TIMEOUT_S CMD...: a set-up stage; the suite cannot go on without it.
required() {
  if ! stage "$@"; then
    note "set-up stage $1 failed: stopping (status in $STATUS)"
    exit 1
  fi
}

# --- machine ------------------------------------------------------------------
{
  echo "date: $(date -Is)"
  echo "host: $(hostname)"
  echo "git: $(git -C "$ROOT" rev-parse HEAD 2>/dev/null || echo unknown) $(git -C "$ROOT" status --porcelain 2>/dev/null | wc -l) changed files"
  echo "cpus: $(nproc)"
  echo "CUDA_HOME: $CUDA_HOME"
  "$CUDA_HOME/bin/nvcc" --version 2>/dev/null | tail -n 2 || echo "nvcc: not found"
} > "$OUT/env.txt"
if command -v nvidia-smi > /dev/null; then
  nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1 || true
  nvidia-smi -q > "$OUT/nvidia-smi-q.txt" 2>&1 || true
  nvidia-smi topo -m > "$OUT/nvidia-smi-topo.txt" 2>&1 || true
  NGPU=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)
else
  echo "nvidia-smi not found" > "$OUT/nvidia-smi.txt"
  NGPU=0
fi
note "$NGPU GPU(s); output in $OUT"

# --- 1. environment -------------------------------------------------------------
if [[ "${ZEROCOMM_USE_CURRENT_PY:-0}" == "1" ]]; then
  PY="$(command -v python || command -v python3)"
  echo "venv SKIPPED (ZEROCOMM_USE_CURRENT_PY=1: $PY)" >> "$STATUS"
else
  VENV="${ZEROCOMM_VENV:-$ROOT/benchmarks/out/.venv-gpu}"
  mkdir -p "$(dirname "$VENV")"
  if [[ ! -x "$VENV/bin/python" ]]; then
    required venv 600 python3 -m venv "$VENV"
  else
    echo "venv OK (reused $VENV)" >> "$STATUS"
  fi
  PY="$VENV/bin/python"
  required pip_install 1800 "$PY" -m pip install -r requirements.txt
fi
"$PY" -c "import sys, torch; print('python', sys.version.split()[0], '| torch', torch.__version__, '| cuda', torch.version.cuda, '| devices', torch.cuda.device_count())" >> "$OUT/env.txt" 2>&1 || true

# --- 2. build ---------------------------------------------------------------------
if [[ "${ZEROCOMM_SKIP_BUILD:-0}" == "1" ]]; then
  echo "build SKIPPED (ZEROCOMM_SKIP_BUILD=1: using the installed zerocomm)" >> "$STATUS"
else
  required build 3600 env ZEROCOMM_REQUIRE_CUDA=1 CUDA_HOME="$CUDA_HOME" "$PY" -m pip install --no-build-isolation -e .
fi
required build_info 120 "$PY" -c "import json, torch, zerocomm; i = zerocomm.build_info(); print(json.dumps(i)); assert i['cuda'], 'built without CUDA'; assert torch.cuda.is_available(), 'no CUDA device visible'"
cp "$OUT/build_info.log" "$OUT/zerocomm_build_info.json" 2>/dev/null || true

# --- 3. tests (CUDA and CPU) --------------------------------------------------------
stage tests 3600 "$PY" -m pytest -q tests --junitxml="$OUT/tests.xml" || true
grep -E "passed|failed|error" "$OUT/tests.log" | tail -n 1 >> "$STATUS" || true

# --- 4. flatten bandwidth -----------------------------------------------------------------
if [[ -f benchmarks/flatten.py ]]; then
  stage flatten 1800 "$PY" benchmarks/flatten.py --device cuda --out "$OUT" || true
else
  echo "flatten SKIPPED (benchmarks/flatten.py missing)" >> "$STATUS"
fi

# --- 5. step overlap: NCCL world size 1 + simulated transport ---------------------------------
stage overlap 3600 "$PY" -m torch.distributed.run --standalone --nproc-per-node 1 \
  benchmarks/overlap.py --device cuda --out "$OUT" || true
NPROC="${ZEROCOMM_OVERLAP_NPROC:-1}"
if [[ "$NPROC" -gt 1 && "$NGPU" -ge "$NPROC" ]]; then
  mkdir -p "$OUT/overlap_x$NPROC"
  stage "overlap_x$NPROC" 3600 "$PY" -m torch.distributed.run --standalone --nproc-per-node "$NPROC" \
    benchmarks/overlap.py --device cuda --transport real --out "$OUT/overlap_x$NPROC" || true
fi

# --- 6. scale model ------------------------------------------------------------------------------
# shellcheck disable=SC2086
stage scale_model 1200 "$PY" benchmarks/scale_model.py --out "$OUT" ${ZEROCOMM_SCALE_ARGS:-} || true

echo "total $(( $(date +%s) - T0 ))s" >> "$STATUS"
note "done; status:"
cat "$STATUS"
exit $FAILED
