#!/usr/bin/env bash
# `make test-compat`: both ends of what users install, each in a fresh virtualenv.
#   lower:  requirements/lower.txt as pip constraints (the lowest versions setup.py allows: the tested lower end)
#   newest: `pip install -e .[tests]`, then the newest releases the registry has of the HF stack, IGNORING our upper
#           bounds (torch stays the CPU wheel). The newest tested end is requirements/lock.txt, which `make test` runs
#           on; this end meets a release nobody here has tested yet, at the next submission instead of at a user's.
#           A failure names every package whose version differs from the lock.
# Each runs the smoke subset (`pytest -m compat`: compose -> forward -> generate -> DPO and SFT steps -> export ->
# reload without pivot_hf). Then tests/test_compat.py writes a checkpoint under each end and reads it under the other
# (with pivot_hf and through its remote code): identical logits.
#
# Venvs live in $COMPAT_VENVS (default .venvs/, gitignored) and are rebuilt from scratch on every run unless
# COMPAT_REUSE=1 (then only missing ones are built and the newest one is upgraded). pip's cache makes a rebuild mostly
# unpacking. COMPAT_ENDS="lower" (or "newest") runs one end.
set -euo pipefail
cd "$(dirname "$0")/../.."
PYTHON=${PYTHON:-python3}
VENVS=${COMPAT_VENVS:-.venvs}
ENDS=${COMPAT_ENDS:-lower newest}
# The HF stack whose newest releases the `newest` end installs (torch: the CPU wheel only, see torch_spec). kernels
# (transformers' Hub kernels) and safetensors come with transformers; listed so that a reused venv gets theirs too and
# a failure names them.
STACK="transformers trl accelerate datasets peft huggingface_hub tokenizers kernels safetensors"
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false OMP_NUM_THREADS=1
mkdir -p "$VENVS"
VENVS=$(cd "$VENVS" && pwd)

torch_spec() {
  # The CPU wheel on machines without CUDA (never a multi-gigabyte CUDA build), as `make install` does.
  if command -v nvidia-smi >/dev/null 2>&1; then echo "torch>=2.13,<2.14"; else echo "torch==2.13.0"; fi
}

build_venv() {
  local end=$1 dir="$VENVS/compat-$1"
  local start=$SECONDS
  if [ "${COMPAT_REUSE:-0}" != 1 ] || [ ! -x "$dir/bin/python" ]; then
    rm -rf "$dir"
    "$PYTHON" -m venv "$dir"
    "$dir/bin/python" -m pip install -q "$(torch_spec)"
  fi
  if [ "$end" = lower ]; then
    "$dir/bin/python" -m pip install -q -c requirements/lower.txt -e ".[tests]"
  else
    "$dir/bin/python" -m pip install -q -e ".[tests]"
    # Separate top-level requirements, so pip does not apply pivot-hf's upper bounds (it only prints a notice that
    # pivot-hf's requirements are not met, which is the point here).
    # shellcheck disable=SC2086
    if ! "$dir/bin/python" -m pip install -q --upgrade $STACK "$(torch_spec)"; then
      echo "compat[newest]: pip could not install the newest releases of: $STACK" >&2
      return 1
    fi
  fi
  echo "compat[$end]: venv ready in $((SECONDS - start)) s:" \
    "$("$dir/bin/python" -c 'import torch, transformers, trl, accelerate, datasets, peft, huggingface_hub, tokenizers as t
print(" ".join(f"{m.__name__}=={m.__version__}" for m in (torch, transformers, trl, accelerate, datasets, peft, huggingface_hub, t)))')"
}

versions_against_lock() {
  # "transformers==5.26.0 (lock: 5.25.0), ..." for every package of the stack whose version is not the lock's.
  "$VENVS/compat-$1/bin/python" - "$STACK torch" <<'PY'
import sys
from importlib.metadata import PackageNotFoundError, version
lock = dict(line.split("==") for line in open("requirements/lock.txt") if "==" in line and not line.startswith("#"))
lock = {k.lower().replace("-", "_"): v.strip() for k, v in lock.items()}
diff = []
for name in sys.argv[1].split():
    try:
        found = version(name.replace("_", "-"))
    except PackageNotFoundError:
        found = "not installed"
    if found.split("+")[0] != lock.get(name, "").split("+")[0]:
        diff.append(f"{name}=={found} (lock: {lock.get(name, 'none')})")
print(", ".join(diff) or "the lock's versions")
PY
}

status=0
for end in $ENDS; do
  build_venv "$end"
done
for end in $ENDS; do
  start=$SECONDS
  # The checkpoint round trip runs once, across the ends, below.
  if ! "$VENVS/compat-$end/bin/python" -m pytest tests -m compat -k "not across_versions" -n 2 --dist loadfile -q \
      -p no:cacheprovider; then
    echo "compat[$end]: smoke subset FAILED with: $(versions_against_lock "$end")" >&2
    status=1
  fi
  echo "compat[$end]: smoke subset took $((SECONDS - start)) s; versions: $(versions_against_lock "$end")"
done

# Checkpoints across the ends: written under lower, read under newest, and the other way round.
if [ -x "$VENVS/compat-lower/bin/python" ] && [ -x "$VENVS/compat-newest/bin/python" ]; then
  start=$SECONDS
  if ! PIVOT_COMPAT_OTHER_PYTHON="$VENVS/compat-lower/bin/python" "$VENVS/compat-newest/bin/python" -m pytest \
      tests/test_compat.py -k across_versions -q -p no:cacheprovider -s; then
    echo "compat: cross-version checkpoints FAILED; newest end: $(versions_against_lock newest)" >&2
    status=1
  fi
  echo "compat: cross-version checkpoints took $((SECONDS - start)) s"
fi
exit "$status"
