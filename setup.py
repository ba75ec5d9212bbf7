"""pivot-hf: PIVOT (Preference-Instructed Vision OpTimization) on the Hugging Face stack."""

import ast
import os
import re

from setuptools import find_packages, setup


def _tested_transformers_range():
    """`TESTED_TRANSFORMERS_RANGE` from configuration_pivot.py (read, not imported: that needs torch), the one place it
    is written: the same file travels with checkpoints and warns when loaded outside the range."""
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "src", "pivot_hf", "configuration_pivot.py")
    source = open(path, encoding="utf-8").read()
    match = re.search(r"^TESTED_TRANSFORMERS_RANGE = (.+)$", source, re.MULTILINE)
    return ast.literal_eval(match.group(1))


_lower, _upper = _tested_transformers_range()

# The tested range: both ends run in CI (`make test-compat`: requirements/lower.txt, and the newest releases pip picks
# here), upper bounds exclusive at the first untested minor. requirements/lock.txt pins the newest end exactly.
# torch: only the 2.13.0 CPU wheel is available to CI, so 2.13 is both ends. `make install` puts that wheel on machines
# without CUDA before this runs, so pip never resolves a multi-gigabyte CUDA build there.
_deps = [
    "torch>=2.13,<2.14",
    f"transformers>={_lower},<{_upper}",
    "trl>=1.16,<1.17",  # 1.16: the fused LM head the trainers score through runs without Triton (CPU)
    "peft>=0.21,<0.22",
    "accelerate>=1.15,<1.16",
    "datasets>=5.0.1,<5.3",
    "huggingface_hub>=1.33,<2.5",
    "tokenizers>=0.23.2,<0.24",
    "evaluate>=0.4",
    "safetensors>=0.4",
    "pyyaml>=6.0",
    "pillow>=10.0",
    "tqdm",
    "numpy",
    "scikit-learn>=1.3",
    "matplotlib>=3.7",
    "psutil",
    # The recipes' default `report_to`: TRL's recommended tracker, local-first (SQLite under ~/.cache/huggingface/trackio
    # or $TRACKIO_DIR; nothing leaves the machine unless a Space is configured). No gradio, only its light client.
    "trackio>=0.43,<1",
]

extras = {
    "tests": ["pytest>=8", "pytest-xdist", "hypothesis>=6", "scikit-image"],
    "quality": ["ruff>=0.6"],
    # Triton kernels: CUDA only. Installed on GPU machines; gated at runtime everywhere.
    "liger": ["liger-kernel>=0.5"],
    # The paper's 16 MLLM benchmarks (issue: MLLM benchmark evaluation).
    # lmms-eval 0.7.3's `simple_evaluate` patches `filelock._api`, which filelock 4 removed: keep the last 3.x
    # (huggingface_hub and datasets accept it). CPU machines: requirements-eval-cpu.txt (no torchvision).
    "eval": ["lmms-eval>=0.7.3,<0.8", "filelock>=3.16,<4"],
    # ZeRO-2/3 (accelerate_configs/zero*.yaml). Tested: 2 CPU processes in the suite (DeepSpeed's CPU accelerator, gloo;
    # it compiles a small C++ op with the machine's g++ on first start), so `make install` (the dev extra) installs it.
    "deepspeed": ["deepspeed>=0.19,<0.20"],
}
extras["tests"] = extras["tests"] + extras["deepspeed"]
extras["dev"] = extras["tests"] + extras["quality"]

setup(
    name="pivot-hf",
    version="0.1.0.dev0",
    description="PIVOT: preference-instructed vision optimization of vision encoders, on transformers + TRL",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    package_dir={"": "src"},
    packages=find_packages("src"),
    package_data={
        "pivot_hf": ["py.typed", "resources/*", "resources/**/*", "mllm_eval/*.json", "mllm_eval/README.md"],
    },
    python_requires=">=3.10",
    install_requires=_deps,
    extras_require=extras,
    entry_points={
        "console_scripts": ["pivot-hf=pivot_hf.cli:main"],
        # `lmms_eval --model pivot` finds the adapter without LMMS_EVAL_PLUGINS.
        "lmms_eval.models": ["pivot = pivot_hf.mllm_eval.registration:lmms_eval_manifest"],
    },
)
