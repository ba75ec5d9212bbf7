"""pivot-hf: PIVOT (Preference-Instructed Vision OpTimization) on the Hugging Face stack."""

from setuptools import find_packages, setup

# torch is deliberately not pinned to a build: `make install` puts the CPU wheel (torch==2.13.0) on machines without
# CUDA before this runs, so pip never resolves a multi-gigabyte CUDA build there.
_deps = [
    "torch>=2.4",
    "transformers>=5.0,<6",
    "trl>=1.0,<2",
    "peft>=0.15",
    "accelerate>=1.0",
    "datasets>=3.0",
    "huggingface_hub>=1.0",
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
    "deepspeed": ["deepspeed>=0.15"],
}
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
