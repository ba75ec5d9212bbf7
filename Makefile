.PHONY: install test test-compat demo quality style clean

PYTHON ?= python3
export HF_HUB_OFFLINE ?= 1
export HF_DATASETS_OFFLINE ?= 1
export TRANSFORMERS_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false

check_dirs := src tests recipes benchmarks scripts

# One step both `test` and `demo` stand on. torch first: a machine without CUDA gets the CPU wheel (torch==2.13.0),
# so the package's own `torch>=` requirement is already met and pip never pulls a CUDA build. Everything else comes at
# the exact versions CI tested (requirements/lock.txt, the newest end of the tested range, used as pip constraints).
install:
	@$(PYTHON) -c "import torch" 2>/dev/null || \
		( if command -v nvidia-smi >/dev/null 2>&1; then $(PYTHON) -m pip install "torch>=2.13,<2.14"; \
		  else $(PYTHON) -m pip install torch==2.13.0; fi )
	$(PYTHON) -m pip install -q -c requirements/lock.txt -e ".[dev]"

test: install
	$(PYTHON) -m pytest tests -n 2 --dist loadfile -q

# Fresh venvs at both ends of the tested range (requirements/lower.txt; the newest releases pip picks, no lock), the
# smoke subset (`-m compat`) in each, then checkpoints written at one end and read at the other (tests/compat/run.sh).
test-compat:
	PYTHON=$(PYTHON) bash tests/compat/run.sh

demo: install
	$(PYTHON) scripts/demo.py

quality:
	ruff check $(check_dirs)
	ruff format --check $(check_dirs)

style:
	ruff check --fix $(check_dirs)
	ruff format $(check_dirs)

clean:
	rm -rf build dist *.egg-info .pytest_cache demo_output .venvs
