"""The tested version range: what setup.py, the pins and the remote-code files say agree; checkpoints outlive an
upgrade inside the range; the remote code warns outside it; our own calls raise no FutureWarning/DeprecationWarning.

`make test-compat` (tests/compat/run.sh) runs the `compat` tests in fresh venvs at both ends of the range, and
`test_checkpoint_logits_identical_across_versions` there with PIVOT_COMPAT_OTHER_PYTHON set to the other end's
interpreter. In the plain suite the other interpreter is this one (the same write -> read round trip).
"""

import json
import os
import re
import subprocess
import sys
import textwrap
import traceback
import warnings
from pathlib import Path

import pytest
import transformers
from packaging.requirements import Requirement
from packaging.version import Version

from pivot_hf.configuration_pivot import TESTED_TRANSFORMERS_RANGE, untested_transformers_message


REPO = Path(__file__).resolve().parents[1]
CHECKPOINT_IO = REPO / "tests" / "compat" / "checkpoint_io.py"
RANGED = ("torch", "transformers", "trl", "accelerate", "datasets", "peft", "huggingface_hub", "tokenizers")


def _setup_requirements() -> dict[str, Requirement]:
    source = (REPO / "setup.py").read_text()
    lower, upper = TESTED_TRANSFORMERS_RANGE
    deps = re.search(r"_deps = \[(.*?)\n\]", source, re.S).group(1)
    specs = [s.replace("{_lower}", lower).replace("{_upper}", upper) for s in re.findall(r'f?"([^"]+)"', deps)]
    return {Requirement(s).name.replace("-", "_").lower(): Requirement(s) for s in specs}


def _pins(name: str) -> dict[str, Version]:
    pins = {}
    for line in (REPO / "requirements" / name).read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            package, version = line.split("==")
            pins[package.strip().replace("-", "_").lower()] = Version(version.split("+")[0])
    return pins


# ------------------------------------------------------------------------------------------ the range, written once
def test_every_hf_package_has_a_closed_range_whose_lower_end_is_pinned():
    requirements = _setup_requirements()
    lower, lock = _pins("lower.txt"), _pins("lock.txt")
    for name in RANGED:
        spec = requirements[name].specifier
        floors = [Version(s.version) for s in spec if s.operator == ">="]
        ceilings = [Version(s.version) for s in spec if s.operator == "<"]
        assert len(floors) == 1 and len(ceilings) == 1, f"{name}: {spec} needs one >= and one exclusive <"
        # The lower end is what requirements/lower.txt installs, the lock lies inside the range.
        assert lower[name] == floors[0] or (lower[name] in spec and lower[name].release[:2] == floors[0].release[:2])
        assert lock[name] in spec, f"lock pins {name}=={lock[name]} outside {spec}"
    lo, hi = TESTED_TRANSFORMERS_RANGE
    assert str(requirements["transformers"].specifier) in (f"<{hi},>={lo}", f">={lo},<{hi}")
    # The lock pins everything `pip install -e .[dev]` brings, not only the ranged packages.
    assert {"pytest", "safetensors", "numpy", "pyarrow", "ruff"} <= set(lock)


def test_installed_versions_are_inside_the_range():
    from importlib.metadata import version

    requirements = _setup_requirements()
    for name in RANGED:
        installed = Version(version(name.replace("_", "-")).split("+")[0])
        assert installed in requirements[name].specifier, f"{name} {installed} outside {requirements[name]}"
    assert untested_transformers_message() is None


@pytest.mark.parametrize(
    ("version", "inside"),
    [
        ("5.17.9", False),
        ("5.18.0", True),
        ("5.24.3", True),
        ("5.25.0.dev0", False),
        ("5.25.0", False),
        ("6.0.0", False),
    ],
)
def test_untested_transformers_message(version, inside):
    message = untested_transformers_message(version)
    assert (message is None) == inside
    if message:
        lo, hi = TESTED_TRANSFORMERS_RANGE
        assert f"transformers>={lo},<{hi}" in message and version in message
        assert "to_llava()" in message and "exported vision encoder" in message


def test_remote_code_outside_the_range_warns_once(tiny_pivot_factory, tmp_path):
    """Two checkpoints whose remote code was tested with transformers 4.0 only (as if written years ago), loaded where
    pivot_hf is not installed: one warning for the process, naming the range and the alternatives."""
    import shutil

    folders = []
    for name in ("a", "b"):
        folder = shutil.copytree(tiny_pivot_factory("siglip"), tmp_path / name)
        config_file = folder / "configuration_pivot.py"
        source = config_file.read_text()
        assert source.count("TESTED_TRANSFORMERS_RANGE = (") == 1
        config_file.write_text(
            re.sub(r"TESTED_TRANSFORMERS_RANGE = \(.*\)", 'TESTED_TRANSFORMERS_RANGE = ("4.0", "4.1")', source)
        )
        folders.append(str(folder))
    script = textwrap.dedent(
        f"""
        import sys, warnings
        sys.modules["pivot_hf"] = None
        from transformers import AutoModelForImageTextToText
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("default")
            for folder in {folders!r}:
                AutoModelForImageTextToText.from_pretrained(folder, trust_remote_code=True)
        ours = [w for w in caught if "Pivot model code was tested" in str(w.message)]
        print("WARNINGS", len(ours))
        print(ours[0].message if ours else "")
        """
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert "WARNINGS 1" in result.stdout, result.stdout + result.stderr[-3000:]
    assert f"transformers>=4.0,<4.1; transformers {transformers.__version__} is installed" in result.stdout
    assert "to_llava()" in result.stdout and "exported vision encoder" in result.stdout


# ------------------------------------------------------------------------- checkpoints across the range
def _checkpoint_io(python: str, mode: str, folder: Path) -> str:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [python, str(CHECKPOINT_IO), mode, str(folder)], capture_output=True, text=True, timeout=900, env=env
    )
    assert result.returncode == 0, f"{python} {mode}:\n{result.stderr[-4000:]}"
    return result.stdout


@pytest.mark.compat
def test_checkpoint_logits_identical_across_versions(tmp_path):
    other = os.environ.get("PIVOT_COMPAT_OTHER_PYTHON", sys.executable)
    for label, writer, reader in (("this->other", sys.executable, other), ("other->this", other, sys.executable)):
        folder = tmp_path / label.replace("->", "-to-")
        _checkpoint_io(writer, "write", folder)
        report = json.loads(_checkpoint_io(reader, "read", folder).strip().splitlines()[-1])
        print(f"\n{label}: {json.dumps(report)}")
        # Same dtype (float32), same CPU, same weights: not one logit may move, with or without pivot_hf.
        assert report["pivot_hf"] == 0.0 and report["remote_code"] == 0.0, report
        assert report["module"].startswith("transformers_modules."), report


# ------------------------------------------------------------------- no deprecated calls of ours on this version
_OURS = (str(REPO / "src" / "pivot_hf"), str(REPO / "recipes"))


def _package_of(filename: str) -> str:
    """The top-level package a source file belongs to (`transformers`, `trl`, ..., `pivot_hf`), else the path."""
    if filename.startswith(_OURS):
        return "pivot_hf"
    match = re.search(r"site-packages/([^/]+)", filename) or re.search(r"/lib/python3\.\d+/([^/]+)", filename)
    return match.group(1).removesuffix(".py") if match else filename


def _caller_of(stack: list[traceback.FrameSummary]) -> traceback.FrameSummary | None:
    """The innermost frame outside the package that issued the warning: whoever made the deprecated call."""
    frames = [f for f in stack if not f.filename.startswith("<") and _package_of(f.filename) != "warnings"]
    if not frames:
        return None
    issuer = _package_of(frames[-1].filename)
    for frame in reversed(frames):
        if _package_of(frame.filename) != issuer:
            return frame
    return None


@pytest.fixture()
def deprecation_calls():
    """Every FutureWarning/DeprecationWarning with the frame that made the deprecated call (whatever its stacklevel)."""
    recorded = []

    def showwarning(message, category, filename, lineno, file=None, line=None):
        if issubclass(category, (FutureWarning, DeprecationWarning)):
            stack = [f for f in traceback.extract_stack()[:-1] if _package_of(f.filename) != "warnings"]
            issuer = _package_of(stack[-1].filename) if stack else filename
            recorded.append((category.__name__, str(message).splitlines()[0], issuer, _caller_of(stack)))

    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.showwarning = showwarning
        yield recorded


def _ours(recorded):
    return [
        f"{category} at {caller.filename}:{caller.lineno}: {message}"
        for category, message, issuer, caller in recorded
        if issuer == "pivot_hf" or (caller is not None and _package_of(caller.filename) == "pivot_hf")
    ]


@pytest.mark.compat
def test_dpo_recipe_makes_no_deprecated_call(deprecation_calls, fixtures_dir, tiny_pivot_factory, tmp_path):
    """recipes/dpo.py on the tiny fixtures, as the README runs it (YAML keys as the recipes write them)."""
    sys.path.insert(0, str(REPO / "recipes"))
    from dpo import main as dpo_main

    recipe = tmp_path / "tiny.yaml"
    recipe.write_text(
        textwrap.dedent(
            f"""\
            model_name_or_path: {tiny_pivot_factory("siglip")}
            dataset_name: {fixtures_dir / "mmpr-mini"}
            output_dir: {tmp_path / "out"}
            tunable_parts: [vision_tower, projector, language_model]
            max_steps: 1
            per_device_train_batch_size: 2
            gradient_checkpointing: true
            gradient_checkpointing_kwargs: {{use_reentrant: false}}
            max_length: 512
            logging_steps: 1
            save_strategy: "no"
            report_to: none
            disable_tqdm: true
            """
        )
    )
    trainer = dpo_main(["--config", str(recipe)])
    assert trainer.state.global_step == 1 and trainer.args.gradient_checkpointing is True
    assert _ours(deprecation_calls) == []


def test_every_recipe_parses_without_a_deprecated_argument(deprecation_calls):
    """Recipe YAML keys reach transformers/TRL in the installed version's spelling (parsing is all ours)."""
    from test_recipes import TRAINING_RECIPES, _parse, _script_of

    for path in TRAINING_RECIPES:
        _parse(_script_of(path), ["--config", str(path)])
    assert [f"{c}: {m}" for c, m, *_ in deprecation_calls] == []


def test_deprecation_call_attribution():
    """The classifier: the caller is the innermost frame outside the package that warned."""
    site = "/venv/lib/python3.11/site-packages"

    def stack(*files):
        return [traceback.FrameSummary(f, 1, "f") for f in files]

    ours = stack(
        f"{REPO}/recipes/dpo.py", f"{REPO}/src/pivot_hf/trainer/dpo.py", f"{site}/transformers/modeling_utils.py"
    )
    assert _package_of(_caller_of(ours).filename) == "pivot_hf"
    # A deprecated argument TRL forwards, or a deprecated property TRL reads, is TRL's call.
    theirs = stack(
        f"{REPO}/src/pivot_hf/configs.py", f"{site}/trl/trainer/dpo_config.py", f"{site}/transformers/training_args.py"
    )
    assert _package_of(_caller_of(theirs).filename) == "trl"
    # pivot_hf's own warnings.warn: the caller is whoever called into pivot_hf.
    own = stack(f"{REPO}/tests/test_x.py", f"{REPO}/src/pivot_hf/export.py", "/usr/lib/python3.11/warnings.py")
    assert _caller_of(own).filename.endswith("test_x.py")
