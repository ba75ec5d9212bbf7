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
from pivot_hf.versions import TESTED_RANGES, pip_requirement, untested_versions, untested_versions_message


REPO = Path(__file__).resolve().parents[1]
CHECKPOINT_IO = REPO / "tests" / "compat" / "checkpoint_io.py"
RANGED = ("torch", "transformers", "trl", "accelerate", "datasets", "peft", "huggingface_hub", "tokenizers")


def _setup_requirements() -> dict[str, Requirement]:
    """What setup.py asks pip for, as pip sees it (setup() intercepted)."""
    import runpy

    import setuptools

    captured = {}
    original = setuptools.setup
    setuptools.setup = lambda **kwargs: captured.update(kwargs)
    try:
        runpy.run_path(str(REPO / "setup.py"))
    finally:
        setuptools.setup = original
    return {Requirement(s).name.replace("-", "_").lower(): Requirement(s) for s in captured["install_requires"]}


def _tested_ranges() -> dict[str, tuple[str, str]]:
    return {"transformers": TESTED_TRANSFORMERS_RANGE, **TESTED_RANGES}


def _pins(name: str) -> dict[str, Version]:
    pins = {}
    for line in (REPO / "requirements" / name).read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            package, version = line.split("==")
            pins[package.strip().replace("-", "_").lower()] = Version(version.split("+")[0])
    return pins


def _minor(version) -> tuple[int, int]:
    return Version(str(version)).release[:2] if not isinstance(version, Version) else version.release[:2]


# ------------------------------------------------------------------------------------------ the range, written once
def test_every_hf_package_has_a_tested_range_whose_ends_are_pinned():
    requirements = _setup_requirements()
    lower, lock = _pins("lower.txt"), _pins("lock.txt")
    assert set(_tested_ranges()) == set(RANGED)
    for name, (first, first_untested) in _tested_ranges().items():
        # requirements/lower.txt installs the lowest tested version; the lock (`make install`) lies inside the range.
        assert lower[name] == Version(first) or _minor(lower[name]) == _minor(first), (name, lower[name], first)
        assert _minor(first) <= _minor(lock[name]) < _minor(first_untested), f"lock pins {name}=={lock[name]}"
        # pip asks for the lowest tested version and stops at the major release after the newest tested one.
        assert requirements[name] == Requirement(pip_requirement(name, (first, first_untested)))
    # The lock pins everything `pip install -e .[dev]` brings, not only the ranged packages.
    assert {"pytest", "safetensors", "numpy", "pyarrow", "ruff"} <= set(lock)


def test_a_newer_minor_release_is_never_downgraded_and_the_next_major_is_refused():
    """The range policy: pip keeps a release newer than the tested range (it is warned about at import), and refuses
    the next major (untested API breaks) and anything below the lowest tested version."""
    requirements = _setup_requirements()
    for name, (first, first_untested) in _tested_ranges().items():
        spec = requirements[name].specifier
        major, minor = _minor(first_untested)
        newer_minor = f"{major}.{minor + 7}.0"
        assert spec.contains(newer_minor), f"pip would downgrade {name} {newer_minor}: {spec}"
        newest_major = major if minor > 0 else major - 1
        assert not spec.contains(f"{newest_major + 1}.0.0"), f"{name}: the next major passes {spec}"
        below = Version(first).release
        assert not spec.contains(f"{below[0]}.{below[1] - 1}.0" if below[1] else "0.0.1"), f"{name}: {spec}"


def test_installed_versions_are_inside_the_range():
    from importlib.metadata import version

    for name, (first, first_untested) in _tested_ranges().items():
        installed = Version(version(name.replace("_", "-")).split("+")[0])
        assert _minor(first) <= _minor(installed) < _minor(first_untested), f"{name} {installed} is not tested"
    assert untested_transformers_message() is None
    assert untested_versions() == {}


def test_newer_than_tested_releases_are_named_in_one_message():
    message = untested_versions_message({"trl": "1.17.0", "accelerate": "1.15.0", "peft": "0.22.0rc1"})
    assert "trl 1.17.0 (tested >=1.16,<1.17)" in message and "peft 0.22.0rc1" in message
    assert "accelerate" not in message and "pip install -c requirements/lock.txt" in message
    assert untested_versions_message({"trl": "1.16.3", "torch": "2.13.0+cpu"}) is None


def test_import_warns_once_about_newer_releases(tmp_path):
    """trl and transformers newer than tested (trl's metadata found first on sys.path, transformers' version as the
    model files read it): `import pivot_hf` gives ONE warning naming both, not a second one from the model files."""
    dist = tmp_path / "trl-1.99.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: trl\nVersion: 1.99.0\n")
    dist = tmp_path / "transformers-5.99.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: transformers\nVersion: 5.99.0\n")
    script = (
        "import warnings, transformers\n"
        "transformers.__version__ = '5.99.0'\n"
        "with warnings.catch_warnings(record=True) as caught:\n"
        "    warnings.simplefilter('always')\n"
        "    import pivot_hf\n"
        "ours = [str(w.message) for w in caught if 'tested' in str(w.message)]\n"
        "print('WARNINGS', len(ours))\n"
        "print('BOTH', all(name in ours[0] for name in ('trl 1.99.0', 'transformers 5.99.0')))\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), str(REPO / "src")])}
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, env=env)
    assert "WARNINGS 1" in result.stdout and "BOTH True" in result.stdout, result.stdout + result.stderr[-3000:]


@pytest.mark.parametrize(
    ("version", "inside"),
    [
        ("5.17.9", False),
        ("5.18.0", True),
        ("5.24.3", True),
        ("5.25.0", True),
        ("5.26.0.dev0", False),
        ("5.26.0", False),
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
