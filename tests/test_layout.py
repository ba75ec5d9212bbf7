"""The package layout: every import path the README, the recipes, the benchmarks and the tests use resolves, and the
modules that moved into `trainer/` and `export/` stay importable under their earlier names as the same objects."""

import ast
import importlib
import re
from pathlib import Path

import pytest


REPO = Path(__file__).resolve().parents[1]


def _imports_in_python(source: str) -> set[tuple[str, str | None]]:
    found = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("pivot_hf") and not node.level:
            found.update((node.module, alias.name) for alias in node.names if alias.name != "*")
        elif isinstance(node, ast.Import):
            found.update((alias.name, None) for alias in node.names if alias.name.startswith("pivot_hf"))
    return found


def _used_imports() -> set[tuple[str, str | None]]:
    found = set()
    for folder in ("recipes", "benchmarks", "tests", "scripts"):
        for path in (REPO / folder).rglob("*.py"):
            found |= _imports_in_python(path.read_text(encoding="utf-8"))
    for doc in [REPO / "README.md", REPO / "recipes" / "README.md", *(REPO / "docs").glob("*.md")]:
        for block in re.findall(r"```python\n(.*?)```", doc.read_text(encoding="utf-8"), re.S):
            found |= _imports_in_python(block)
        # Module paths named in prose (`pivot_hf.trainer.preflight`, ...) must exist too.
        for dotted in re.findall(r"`(pivot_hf(?:\.\w+)+)`", doc.read_text(encoding="utf-8")):
            found.add((dotted, None))
    return found


USED = sorted(_used_imports(), key=lambda item: (item[0], item[1] or ""))


def test_the_scan_finds_the_documented_entry_points():
    modules = {module for module, _ in USED}
    assert {"pivot_hf", "pivot_hf.trainer", "pivot_hf.configs", "pivot_hf.export"} <= modules


@pytest.mark.parametrize("module,name", USED, ids=[f"{m}:{n}" for m, n in USED])
def test_import_path_resolves(module, name):
    try:
        imported = importlib.import_module(module)
    except ModuleNotFoundError:
        # `pivot_hf.x.y` in prose may name an attribute (a class or function) rather than a module.
        parent, _, attribute = module.rpartition(".")
        imported = importlib.import_module(parent)
        assert hasattr(imported, attribute), f"{module} is neither a module nor an attribute of {parent}"
        return
    if name is not None:
        assert hasattr(imported, name) or importlib.util.find_spec(f"{module}.{name}"), f"{module}.{name}"


@pytest.mark.parametrize("old", ["fast_dpo", "checkpointing", "grpo", "model_card"])
def test_no_aliases_for_old_module_names(old):
    """Modules that moved are importable under their current names only: no import-system finder keeps old ones."""
    import sys

    import pivot_hf

    assert not any(type(finder).__module__.startswith("pivot_hf") for finder in sys.meta_path)
    with pytest.raises(ModuleNotFoundError):
        importlib.import_module(f"pivot_hf.{old}")
    assert not hasattr(pivot_hf, old)


def test_what_runs_inside_a_trainer_lives_in_trainer():
    package = REPO / "src" / "pivot_hf"
    top_level = {path.stem for path in package.glob("*.py")}
    assert not top_level & {"fast_dpo", "checkpointing", "grpo", "export", "model_card"}
    trainer = {path.stem for path in (package / "trainer").glob("*.py")}
    trainer |= {path.parent.name for path in (package / "trainer").glob("*/__init__.py")}
    assert {"dpo", "sft", "grpo", "fast_dpo", "tunable", "checkpointing", "collators", "model_loading"} <= trainer
    assert {"encoder", "model_card"} <= {path.stem for path in (package / "export").glob("*.py")}
