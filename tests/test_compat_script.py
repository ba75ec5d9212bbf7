"""tests/compat/run.sh's failure message: it names every package of the stack whose version is not the lock's."""

import subprocess
import sys
from pathlib import Path


REPO = Path(__file__).resolve().parents[1]


def _versions_against_lock(tmp_path, stack: str, site: Path | None = None) -> subprocess.CompletedProcess:
    """Run the script's `versions_against_lock` alone, on a fake venv whose python is this interpreter."""
    script = (REPO / "tests" / "compat" / "run.sh").read_text()
    function = script[script.index("versions_against_lock() {") :]
    function = function[: function.index("\n}\n") + 3]
    (tmp_path / "compat-newest" / "bin").mkdir(parents=True)
    (tmp_path / "compat-newest" / "bin" / "python").symlink_to(sys.executable)
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(site or "")}
    code = (
        f'set -euo pipefail\nSTACK="{stack}"\nVENVS="{tmp_path}"\n{function}\necho "$(versions_against_lock newest)"'
    )
    return subprocess.run(["bash", "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=60)


def test_the_failure_names_each_package_and_version_that_differs_from_the_lock(tmp_path):
    site = tmp_path / "site"
    # A release newer than the lock, as the newest end meets it (metadata only: nothing imports it).
    (site / "peft-9.9.0.dist-info").mkdir(parents=True)
    (site / "peft-9.9.0.dist-info" / "METADATA").write_text("Metadata-Version: 2.1\nName: peft\nVersion: 9.9.0\n")
    lock = dict(
        line.strip().split("==")
        for line in (REPO / "requirements" / "lock.txt").read_text().splitlines()
        if "==" in line
    )
    result = _versions_against_lock(tmp_path, "peft kernels no_such_package", site)
    assert result.returncode == 0, result.stderr
    message = result.stdout.strip()
    assert f"peft==9.9.0 (lock: {lock['peft']})" in message
    # A package missing from the venv is named too, instead of a traceback and an empty message.
    assert "no_such_package==not installed (lock: none)" in message


def test_the_newest_end_upgrades_the_packages_a_failure_names():
    script = (REPO / "tests" / "compat" / "run.sh").read_text()
    stack = script.split('\nSTACK="', 1)[1].split('"', 1)[0].split()
    # transformers 5.25+ brings Hub kernels (`kernels`) and needs a newer safetensors: both are the stack now.
    assert {"transformers", "trl", "accelerate", "datasets", "peft", "huggingface_hub", "tokenizers"} <= set(stack)
    assert {"kernels", "safetensors"} <= set(stack)
