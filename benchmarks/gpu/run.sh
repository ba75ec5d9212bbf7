#!/usr/bin/env bash
# The prepared GPU check. On the device machine (torch + transformers + accelerate + peft, no network), after
# `benchmarks/gpu/prepare.sh` filled .whl/ here and the call carried it:
#
#     bash benchmarks/gpu/run.sh            # real shape: SigLIP2-So400m/16 + Qwen2.5-1.5B, bf16, <= 9 minutes
#     bash benchmarks/gpu/run.sh --tiny     # the same code path on a tiny config; runs on CPU (CI)
#
# Checkpoints go to a scratch folder: `--work DIR` (a rerun with the same DIR reuses its build); without it a fresh
# `mktemp -d` folder per --tiny run (printed), /tmp/pivot-gpu-check-real at the real shape.
#
# Every Python step runs on $PYTHON (default: `python3` from PATH); callers that run inside a venv or another
# interpreter pass theirs (`PYTHON="$(command -v python)" bash benchmarks/gpu/run.sh`, the tests pass sys.executable).
#
# It installs the carried wheels into /tmp/site (never into the machine's Python), then runs benchmarks/gpu/check.py:
# 3 PIVOT DPO steps through `accelerate launch` under ZeRO-3 and under FSDP2 (one process), the DPO throughput
# benchmark (with and without Liger, and on MMPR-like lengths at 8 pairs per batch), 3 QLoRA DPO steps (4-bit LLM with
# LoRA, tower and projector in full; needs bitsandbytes, carried in .whl/), and writes gpu_check.json,
# gpu_check.md and gpu_check.log under $OUT (default ./gpu-check-out). Extra arguments go to check.py (e.g.
# `--stages fsdp2,throughput` for a rerun).
set -u -o pipefail
PYTHON="${PYTHON:-python3}"
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$ROOT" || exit 1
OUT="${OUT:-$ROOT/gpu-check-out}"
mkdir -p "$OUT"
export OUT

ARGS=("$@")
TINY=0
HAS_WORK=0
for arg in "$@"; do
    [[ "$arg" == "--tiny" ]] && TINY=1
    [[ "$arg" == "--work" || "$arg" == --work=* ]] && HAS_WORK=1
done
if (( TINY == 1 && HAS_WORK == 0 )); then
    # A fresh scratch folder per tiny run: two runs at once (CI, a developer) must not share checkpoints, and a folder
    # left by an earlier (possibly killed) run must not be reused. `--work DIR` keeps its meaning (a rerun reuses DIR).
    WORK="$(mktemp -d "${TMPDIR:-/tmp}/pivot-gpu-check-tiny.XXXXXX")" || { echo "mktemp failed" >&2; exit 1; }
    echo "scratch folder (--work): $WORK"
    ARGS+=(--work "$WORK")
fi

shopt -s nullglob
# PIVOT_WHEELS=.whl-qlora: the QLoRA stage's own wheels (`prepare.sh --qlora`), carried in a call of their own.
WHEEL_DIR="${PIVOT_WHEELS:-.whl}"
[[ "$WHEEL_DIR" = /* ]] || WHEEL_DIR="$ROOT/$WHEEL_DIR"
WHEELS=("$WHEEL_DIR"/*.whl)
if (( ${#WHEELS[@]} > 0 )) && (( TINY == 0 )); then
    echo "installing ${#WHEELS[@]} carried wheels into /tmp/site"
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
        "${WHEELS[@]}" || { echo "wheel install failed" >&2; exit 1; }
    export PYTHONPATH="/tmp/site:$ROOT/src${PYTHONPATH:+:$PYTHONPATH}"
else
    (( TINY == 0 )) && echo "no wheels in $WHEEL_DIR (run benchmarks/gpu/prepare.sh where pip works): using the installed packages"
    export PYTHONPATH="$ROOT/src${PYTHONPATH:+:$PYTHONPATH}"
fi
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false WANDB_DISABLED=true
export PYTHONUNBUFFERED=1
if (( TINY == 1 )); then
    # CI box: one thread per process, results must not depend on the thread count.
    export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
fi
exec "$PYTHON" "$ROOT/benchmarks/gpu/check.py" --out "$OUT" "${ARGS[@]}"
