"""Multi-node PIVOT DPO as users launch it, 2 machines x 1 process on one host over loopback:

    accelerate launch --config_file accelerate_configs/<ddp|fsdp2|multinode_zero3>.yaml --num_machines 2 \
        --num_processes 2 --machine_rank R --main_process_ip 127.0.0.1 --main_process_port P \
        --mixed_precision no recipes/dpo.py ... --use_cpu true

one launcher per "machine" (R = 0, 1), started together. DDP, FSDP2 and ZeRO-3 each give the losses of the same run
in one plain process (2 rows per optimizer step either way), and the main machine writes a checkpoint with the
1-process tensor names. The README's multi-node section shows these commands.
"""

import os
import subprocess
import sys

import pytest

from test_distributed_fsdp import CHILD, REPO, _env, _recipe_args
from test_distributed_zero3 import _assert_like_one_process_save, _assert_losses_equal, _report, free_port


pytestmark = [pytest.mark.slow, pytest.mark.multiprocess]


@pytest.fixture(scope="module")
def tiny(tiny_pivot_factory):
    return tiny_pivot_factory("siglip")


@pytest.fixture(scope="module")
def one_process(tiny, tmp_path_factory):
    out = tmp_path_factory.mktemp("one") / "one_dpo"
    proc = subprocess.run(
        [sys.executable, str(CHILD), *_recipe_args(tiny, out, 2)],
        env=_env(), cwd=REPO, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    return out


def launch_two_machines(config: str, args: list[str], logs: list, env_extra: dict | None = None) -> list[int]:
    """Start machine 0 and machine 1 (one process each) against the same rendezvous; wait for both."""
    port = free_port()
    env = {**_env(), **(env_extra or {})}
    procs = []
    for rank, log in enumerate(logs):
        cmd = [sys.executable, "-m", "accelerate.commands.launch"]
        cmd += ["--config_file", str(REPO / "accelerate_configs" / config), "--num_machines", "2"]
        cmd += ["--num_processes", "2", "--machine_rank", str(rank), "--main_process_ip", "127.0.0.1"]
        cmd += ["--main_process_port", str(port), "--mixed_precision", "no", str(CHILD), *args]
        procs.append(subprocess.Popen(cmd, env=env, cwd=REPO, stdout=open(log, "wb"), stderr=subprocess.STDOUT))
    codes = []
    for proc in procs:
        try:
            codes.append(proc.wait(timeout=900))
        except subprocess.TimeoutExpired:
            proc.kill()
            codes.append(proc.wait())
    return codes


@pytest.mark.parametrize(
    "config,env_extra",
    [
        ("ddp.yaml", None),
        ("fsdp2.yaml", {"PIVOT_TEST_FSDP_ON_CPU": "1"}),  # accelerate's FSDP path on CPU processes
        ("multinode_zero3.yaml", None),
    ],
)
def test_two_machines_on_loopback_equal_one_process(config, env_extra, tiny, one_process, tmp_path):
    out = tmp_path / "out"
    logs = [tmp_path / "machine0.log", tmp_path / "machine1.log"]
    codes = launch_two_machines(config, _recipe_args(tiny, out, 1), logs, env_extra)
    assert codes == [0, 0], "\n".join(log.read_text()[-3000:] for log in logs)
    report = _report(out)
    assert report["world_size"] == 2, report
    expected = {"ddp.yaml": "MULTI_CPU", "fsdp2.yaml": "FSDP", "multinode_zero3.yaml": "DEEPSPEED"}[config]
    assert report["distributed_type"].endswith(expected), report["distributed_type"]
    _assert_losses_equal(one_process, out)
    _assert_like_one_process_save(out, one_process)
    # Only the main machine's rank 0 writes the final model (a shared filesystem here).
    assert os.path.isfile(out / "model.safetensors")
