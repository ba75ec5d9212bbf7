#!/usr/bin/env bash
# Fill the ignored .whl/ folder with what the GPU check needs and the device machine lacks (it has torch,
# transformers, accelerate, peft, triton, pyarrow, pandas, xxhash, msgpack, psutil, py-cpuinfo, ninja; no network):
# Python 3.12 manylinux x86-64 wheels, one version each, no dependency resolution on that machine.
#
#     bash benchmarks/gpu/prepare.sh      # here, where pip reaches PyPI; then carry `.whl` in the device call
#
# DeepSpeed publishes only a source archive on PyPI: it is built here into a pure-Python wheel (DS_BUILD_OPS=0, its
# CUDA ops are JIT-built on the GPU machine, which has nvcc and ninja).
set -euo pipefail
PYTHON="${PYTHON:-python3}"  # the interpreter whose pip runs (a venv's: PYTHON="$(command -v python)")
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
DEST="$ROOT/.whl"
mkdir -p "$DEST"

# Versions: those this project is tested with here (trl, datasets and their pins), Liger and DeepSpeed as recent
# releases that TRL's extras accept (liger-kernel>=0.8.2, deepspeed>=0.18.6), and DeepSpeed's dependencies that the
# machine lacks (`import deepspeed` imports einops through its flops profiler; hjson and pydantic for its config).
PURE=(
    trl==1.16.0
    datasets==5.2.0
    dill==0.4.1
    multiprocess==0.70.19
    liger-kernel==0.8.5
    hjson==3.1.0
    einops==0.8.2
    pydantic==2.13.4
    annotated-types==0.7.0
    typing-inspection==0.4.2
)
BINARY=(
    pydantic-core==2.46.4
)
# `--qlora`: the wheels of the QLoRA stage alone, in .whl-qlora/: bitsandbytes (~58 MiB) leaves no room under the
# 64 MiB carry limit for DeepSpeed and Liger, so that stage runs in its own call:
#     PIVOT_WHEELS=.whl-qlora bash benchmarks/gpu/run.sh --stages qlora      (carrying .whl-qlora)
QLORA=0
if [[ "${1:-}" == "--qlora" ]]; then
    QLORA=1
    DEST="$ROOT/.whl-qlora"
    mkdir -p "$DEST"
    PURE=(trl==1.16.0 datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19)
    BINARY=(bitsandbytes==0.49.2)
fi
PLATFORMS=(manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_24_x86_64 manylinux_2_17_x86_64
           manylinux2014_x86_64 manylinux1_x86_64)
platform_flags=()
for p in "${PLATFORMS[@]}"; do platform_flags+=(--platform "$p"); done

"$PYTHON" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    "${platform_flags[@]}" -d "$DEST" "${PURE[@]}" "${BINARY[@]}"

if (( QLORA == 0 )) && ! ls "$DEST"/deepspeed-*.whl >/dev/null 2>&1; then
    tmp="$(mktemp -d)"
    "$PYTHON" -m pip download -q --no-deps --no-binary=:all: -d "$tmp" deepspeed==0.19.8
    # No build isolation: DeepSpeed's setup imports torch (any local torch will do for a wheel without ops).
    DS_BUILD_OPS=0 "$PYTHON" -m pip wheel -q --no-deps --no-build-isolation -w "$DEST" "$tmp"/deepspeed-*.tar.gz
    rm -rf "$tmp"
fi

# One version of each: two wheels of one project stop the install on the device machine.
"$PYTHON" - "$DEST" <<'PY'
import collections, pathlib, sys
seen = collections.defaultdict(list)
for wheel in pathlib.Path(sys.argv[1]).glob("*.whl"):
    seen[wheel.name.split("-")[0].lower().replace("_", "-")].append(wheel.name)
dupes = {k: v for k, v in seen.items() if len(v) > 1}
if dupes:
    sys.exit(f"several versions of one project in .whl/: {dupes}; delete the extra ones")
total = sum(w.stat().st_size for w in pathlib.Path(sys.argv[1]).glob("*.whl"))
print(f"{sum(len(v) for v in seen.values())} wheels, {total / 2**20:.1f} MiB in {sys.argv[1]} (carry limit 64 MiB)")
PY
