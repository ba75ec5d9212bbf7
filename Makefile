.PHONY: install test test-compat test-eval demo quality style clean

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

# Fresh venvs at both ends of what users install (requirements/lower.txt; the newest releases the registry has, our
# upper bounds ignored), the smoke subset (`-m compat`) in each, then checkpoints across them (tests/compat/run.sh).
test-compat:
	PYTHON=$(PYTHON) bash tests/compat/run.sh

# The real lmms-eval harness on the `pivot` adapter, on a CPU machine: lmms-eval and the few pure-Python modules it
# imports go into an isolated folder (requirements-eval-cpu.txt says why: no torchvision/CUDA torch, filelock 3.x
# only there); the HF stack and pytest come from the environment (`make install`). PIVOT_HF_REQUIRE_LMMS_EVAL=1 turns
# the tests' "lmms-eval is not installed" skip into a failure. GPU machines: `pip install -e ".[eval]"` (README).
EVAL_TARGET ?= .venvs/lmms-eval

$(EVAL_TARGET)/.installed: requirements-eval-cpu.txt
	rm -rf $(EVAL_TARGET)
	$(PYTHON) -m pip install -q --disable-pip-version-check --no-deps --target $(EVAL_TARGET) -r requirements-eval-cpu.txt
	cp requirements-eval-cpu.txt $@

test-eval: $(EVAL_TARGET)/.installed
	PYTHONPATH="$(CURDIR)/src:$(CURDIR)/$(EVAL_TARGET)$${PYTHONPATH:+:$$PYTHONPATH}" PIVOT_HF_REQUIRE_LMMS_EVAL=1 \
		OMP_NUM_THREADS=1 $(PYTHON) -m pytest tests/test_eval_mllm_adapter.py -p no:xdist -q -rs

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
