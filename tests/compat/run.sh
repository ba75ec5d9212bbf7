#!/usr/bin/env bash
# `make test-compat`: the tested range, both ends, each in a fresh virtualenv.
#   lower: requirements/lower.txt as pip constraints (the oldest versions setup.py allows)
#   upper: `pip install -e .[tests]` with no constraints, so pip picks the newest releases setup.py allows
# Each runs the smoke subset (`pytest -m compat`: compose -> forward -> generate -> DPO and SFT steps -> export ->
# reload without pivot_hf). Then tests/test_compat.py writes a checkpoint under each end and reads it under the other
# (with pivot_hf and through its remote code): identical logits.
#
# Venvs live in $COMPAT_VENVS (default .venvs/, gitignored) and are rebuilt from scratch on every run unless
# COMPAT_REUSE=1 (then only missing ones are built and the upper one is upgraded to the newest allowed). pip's cache
# makes a rebuild mostly unpacking. COMPAT_ENDS="lower" (or "upper") runs one end.
set -euo pipefail
cd "$(dirname "$0")/../.."
PYTHON=${PYTHON:-python3}
VENVS=${COMPAT_VENVS:-.venvs}
ENDS=${COMPAT_ENDS:-lower upper}
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
    "$dir/bin/python" -m pip install -q --upgrade --upgrade-strategy eager -e ".[tests]"
  fi
  echo "compat[$end]: venv ready in $((SECONDS - start)) s:" \
    "$("$dir/bin/python" -c 'import torch, transformers, trl, accelerate, datasets, peft, huggingface_hub, tokenizers as t
print(" ".join(f"{m.__name__}=={m.__version__}" for m in (torch, transformers, trl, accelerate, datasets, peft, huggingface_hub, t)))')"
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
    echo "compat[$end]: smoke subset FAILED" >&2
    status=1
  fi
  echo "compat[$end]: smoke subset took $((SECONDS - start)) s"
done

# Checkpoints across the range: written under lower, read under upper, and the other way round.
if [ -x "$VENVS/compat-lower/bin/python" ] && [ -x "$VENVS/compat-upper/bin/python" ]; then
  start=$SECONDS
  if ! PIVOT_COMPAT_OTHER_PYTHON="$VENVS/compat-lower/bin/python" "$VENVS/compat-upper/bin/python" -m pytest \
      tests/test_compat.py -k across_versions -q -p no:cacheprovider -s; then
    echo "compat: cross-version checkpoints FAILED" >&2
    status=1
  fi
  echo "compat: cross-version checkpoints took $((SECONDS - start)) s"
fi
exit "$status"
