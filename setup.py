"""pivot-hf: PIVOT (Preference-Instructed Vision OpTimization) on the Hugging Face stack."""

import ast
import os
import runpy

from setuptools import find_packages, setup


_SRC = os.path.join(os.path.dirname(os.path.abspath(__file__)), "src", "pivot_hf")


def _literal(file_name: str, name: str):
    """The literal assigned to `name` in a source file of the package (parsed, not imported: that needs torch)."""
    path = os.path.join(_SRC, file_name)
    tree = ast.parse(open(path, encoding="utf-8").read())
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == name for t in node.targets):
            return ast.literal_eval(node.value)
    raise RuntimeError(f"{name} is not assigned in {path}")


# The tested range (README, "Tested versions"): transformers' in configuration_pivot.py (it travels with checkpoints),
# the rest in versions.py (stdlib only, so it runs here without the package). pip gets each lower end (tested in CI,
# requirements/lower.txt) and an upper bound at the next MAJOR release: a newer minor release a user already has is
# kept, never downgraded; `import pivot_hf` warns about it, and CI's newest-release smoke meets it first.
# requirements/lock.txt pins the newest tested set (`make install`).
_versions = runpy.run_path(os.path.join(_SRC, "versions.py"))
_ranges = {
    "transformers": _literal("configuration_pivot.py", "TESTED_TRANSFORMERS_RANGE"),
    **_versions["TESTED_RANGES"],
}
_deps = [_versions["pip_requirement"](name, tested) for name, tested in _ranges.items()] + [
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
