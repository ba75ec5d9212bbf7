"""benchmarks/gpu/run.sh's scratch folder: a fresh one per `--tiny` run (printed), `--work` passed through as given."""

import os
import stat
import subprocess
from pathlib import Path


REPO = Path(__file__).resolve().parents[1]


def _run(tmp_path, *args: str) -> tuple[str, list[str]]:
    """run.sh with a stand-in interpreter that records the arguments check.py would get: (stdout, check.py's argv)."""
    fake = tmp_path / "python"
    fake.write_text('#!/usr/bin/env bash\nprintf "%s\\n" "$@" > "$ARGV_FILE"\n')
    fake.chmod(fake.stat().st_mode | stat.S_IXUSR)
    argv_file = tmp_path / "argv.txt"
    env = {**os.environ, "PYTHON": str(fake), "OUT": str(tmp_path / "out"), "ARGV_FILE": str(argv_file),
           "TMPDIR": str(tmp_path)}  # fmt: skip
    proc = subprocess.run(["bash", str(REPO / "benchmarks" / "gpu" / "run.sh"), *args], env=env, capture_output=True,
                          text=True, timeout=60)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    return proc.stdout, argv_file.read_text().splitlines()[1:]  # [0] is check.py's path


def test_tiny_runs_get_a_fresh_scratch_folder_each(tmp_path):
    works = []
    for _ in range(2):
        stdout, argv = _run(tmp_path, "--tiny")
        work = argv[argv.index("--work") + 1]
        assert f"scratch folder (--work): {work}" in stdout and os.path.isdir(work)
        assert Path(work).parent == tmp_path and not os.listdir(work)  # created empty under $TMPDIR
        works.append(work)
    assert works[0] != works[1]  # two runs never share (or reuse) a folder


def test_an_explicit_work_folder_is_passed_as_given(tmp_path):
    for args in (["--tiny", "--work", "/some/dir"], ["--work=/some/dir", "--tiny"]):
        stdout, argv = _run(tmp_path, *args)
        assert argv == ["--out", str(tmp_path / "out"), *args] and "scratch folder" not in stdout
