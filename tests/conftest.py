import os
from pathlib import Path

import pytest


# The suite runs without the Hub: every checkpoint is a local folder built from a tiny config.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("WANDB_DISABLED", "true")

FIXTURES = Path(__file__).parent / "fixtures"


@pytest.fixture(scope="module")
def one_torch_thread():
    """One torch thread for a module's tiny models: two threads on two shared cores are ~4x slower than one."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def fixtures_dir() -> Path:
    return FIXTURES


@pytest.fixture(scope="session")
def tiny_pivot_factory(tmp_path_factory):
    """Build (once per session and worker) tiny Pivot checkpoints: `factory(family="siglip", arch="qwen2")`."""
    from pivot_hf.testing import build_tiny_pivot

    root = tmp_path_factory.mktemp("tiny-pivot")
    cache = {}

    def factory(family: str = "siglip", arch: str = "qwen2", **kwargs) -> str:
        key = (family, arch, tuple(sorted(kwargs.items())))
        if key not in cache:
            name = "-".join([family, arch] + [f"{k}{v}" for k, v in sorted(kwargs.items())])
            cache[key] = build_tiny_pivot(root / name, family=family, arch=arch, **kwargs)
        return cache[key]

    return factory


@pytest.fixture(scope="session")
def sample_images(fixtures_dir):
    from PIL import Image

    folder = fixtures_dir / "llava-mini" / "images"
    return [Image.open(p).convert("RGB") for p in sorted(folder.glob("*.jpg"))]
