"""`bash benchmarks/gpu/run.sh --tiny`: the prepared GPU check's code path on a tiny config, on CPU.

What needs CUDA (Liger) is skipped with its reason; the ZeRO-3 and FSDP2 DPO steps (2 gloo processes here, through
`accelerate launch`, DeepSpeed's CPU accelerator and accelerate's own `fully_shard`) and the throughput benchmark run
the code they run on the GPU.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest


pytestmark = [pytest.mark.slow, pytest.mark.multiprocess]

REPO = Path(__file__).resolve().parents[1]


def test_gpu_check_tiny_runs_on_cpu(tmp_path):
    out = tmp_path / "out"
    # The interpreter running the tests, not whichever `python3` is first on PATH.
    env = {**os.environ, "OUT": str(out), "OMP_NUM_THREADS": "1", "PYTHON": sys.executable}
    cmd = ["bash", str(REPO / "benchmarks" / "gpu" / "run.sh"), "--tiny", "--work", str(tmp_path / "work")]
    proc = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=2700)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert "gpu check: passed" in proc.stdout
    report = json.loads((out / "gpu_check.json").read_text())
    assert (out / "gpu_check.md").read_text().startswith("# PIVOT GPU check on cpu")
    stages = report["stages"]
    # Skipped only where CUDA is missing (Liger), with the reason printed.
    assert stages["throughput_liger"]["status"] == "skipped" and "CUDA only" in stages["throughput_liger"]["reason"]
    assert "[throughput_liger] SKIPPED" in proc.stdout

    # ZeRO-3 on 2 CPU processes (DeepSpeed's CPU accelerator, gloo): every parameter partitioned, the per-part groups
    # read from DeepSpeed's own lists (its param_groups are emptied outside a step), the tower trained.
    zero3 = stages["zero3"]
    assert zero3["status"] == "ok" and zero3["checkpoint_saved"], zero3
    run = zero3["report"]
    assert run["distributed_type"] == "DEEPSPEED" and run["num_processes"] == 2
    assert run["zero3_partitioned_parameters"] == run["parameters"] > 0
    groups = {g["name"]: g for g in run["optimizer_groups"]}
    for part in ("language_model", "projector", "vision_tower"):
        assert groups[f"{part}_no_decay"]["tensors"] > 0 and groups[f"{part}_no_decay"]["parts"] == [part], groups
    assert run["global_step"] == 3 and len(run["losses"]) == 3
    changed, total = run["tensors_changed"]["vision_tower"]
    assert changed == total > 0

    fsdp = stages["fsdp2"]
    assert fsdp["status"] == "ok" and fsdp["checkpoint_saved"]
    run = fsdp["report"]
    assert run["distributed_type"] == "FSDP" and run["num_processes"] == 2
    assert run["dtensor_parameters"] == run["parameters"] > 0 and "<root>" in run["fsdp_units"]
    assert [g["name"] for g in run["optimizer_groups"]] == [
        "language_model_no_decay",
        "projector_no_decay",
        "vision_tower_no_decay",
    ]
    assert run["global_step"] == 3 and len(run["losses"]) == 3
    changed, total = run["tensors_changed"]["vision_tower"]
    assert changed == total > 0

    throughput = stages["throughput"]
    assert throughput["status"] == "ok"
    assert throughput["summary"]["loss_max_rel_diff"] < 1e-5
    # MMPR-like lengths (2 pairs per batch on the tiny config): padding-free pairs (no padding at all on sdpa), same
    # losses as stock.
    mmpr = stages["throughput_mmpr"]
    assert mmpr["status"] == "ok", mmpr
    assert mmpr["summary"]["lengths"] == "mmpr" and mmpr["summary"]["batch_pairs"] == 2
    assert mmpr["summary"]["loss_max_rel_diff"] < 1e-5
    assert mmpr["summary"]["rows"]["ours"]["padding_share"] == 0.0 < mmpr["summary"]["rows"]["stock"]["padding_share"]
