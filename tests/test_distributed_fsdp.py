"""Sharded PIVOT DPO without a GPU: 2 processes on the CPU (gloo) under accelerate's FSDP2 (`fully_shard` applied by
accelerate itself, from `accelerate_configs/fsdp2.yaml` with only the machine-specific keys changed), against the same
run in one plain process. Runs are kept to 3 optimizer steps on one thread per process (2 shared cores)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from pivot_hf import PivotForConditionalGeneration


pytestmark = [pytest.mark.slow, pytest.mark.multiprocess]

REPO = Path(__file__).resolve().parents[1]
CHILD = REPO / "tests" / "distributed_child.py"
LRS = {"language_model": 1e-4, "projector": 5e-4, "vision_tower": 1e-3}
STEPS = 3


def _env():
    return {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "WANDB_DISABLED": "true",
        "PYTHONPATH": os.pathsep.join([str(REPO / "src"), os.environ.get("PYTHONPATH", "")]),
    }


def _recipe_args(model, output_dir, per_device_batch, *extra):
    flags = {
        "model_name_or_path": model,
        "dataset_name": str(REPO / "tests" / "fixtures" / "mmpr-mini"),
        "output_dir": str(output_dir),
        "max_steps": STEPS,
        "per_device_train_batch_size": per_device_batch,
        "gradient_checkpointing": "false",
        "logging_steps": 1,
        "report_to": "none",
        "save_strategy": "no",
        "disable_tqdm": "true",
        "max_length": 512,
        "learning_rate": LRS["language_model"],
        "projector_lr": LRS["projector"],
        "vision_tower_lr": LRS["vision_tower"],
        "seed": 0,
        "data_seed": 0,
        "use_cpu": "true",
    }
    argv = [str(REPO / "recipes" / "dpo.py")]
    for key, value in flags.items():
        argv += [f"--{key}", str(value)]
    return argv + list(extra)


def cpu_accelerate_config(source: str, tmp_path: Path, num_processes: int = 2) -> Path:
    """The shipped accelerate config with the machine-specific keys set for this CPU box (gloo, fp32)."""
    config = yaml.safe_load((REPO / "accelerate_configs" / source).read_text())
    config.update(num_processes=num_processes, use_cpu=True, mixed_precision="no", main_process_port=0)
    path = tmp_path / f"cpu-{source}"
    path.write_text(yaml.safe_dump(config))
    return path


def run_launched(config: Path, args: list[str], log: Path, timeout: int = 900, env_extra: dict | None = None) -> int:
    """`accelerate launch --config_file config tests/distributed_child.py args`; FSDP runs on the CPU processes (see
    `distributed_child._allow_fsdp_on_cpu`)."""
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config), str(CHILD), *args]
    env = {**_env(), "PIVOT_TEST_FSDP_ON_CPU": "1", **(env_extra or {})}
    with open(log, "ab") as f:
        proc = subprocess.run(cmd, env=env, cwd=REPO, stdout=f, stderr=subprocess.STDOUT, timeout=timeout)
    return proc.returncode


def _losses(output_dir: Path) -> dict[int, float]:
    state = json.loads((output_dir / "trainer_state.json").read_text())
    return {e["step"]: e["loss"] for e in state["log_history"] if "loss" in e}


@pytest.fixture(scope="module")
def tiny(tiny_pivot_factory):
    return tiny_pivot_factory("siglip")


def test_two_process_fsdp2_dpo_equals_one_process(tiny, tmp_path):
    one, two = tmp_path / "one-process", tmp_path / "fsdp2"
    # The same 2 rows per optimizer step: 1 process x 2 rows, or 2 processes x 1 row (accelerate deals the batches
    # of one sampler to the ranks in turn).
    proc = subprocess.run(
        [sys.executable, str(CHILD), *_recipe_args(tiny, one, 2)],
        env=_env(), cwd=REPO, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    config = cpu_accelerate_config("fsdp2.yaml", tmp_path)
    log = tmp_path / "fsdp2.log"
    assert run_launched(config, _recipe_args(tiny, two, 1), log) == 0, log.read_text()[-4000:]

    report = json.loads((two / "distributed_check.json").read_text())
    # Really sharded: accelerate applied fully_shard to every tower block and decoder layer, and the parameters are
    # DTensors split over the 2 ranks.
    assert report["distributed_type"].endswith("FSDP") and report["world_size"] == 2
    model = PivotForConditionalGeneration.from_pretrained(tiny)
    blocks = model.config.vision_config.num_hidden_layers + model.config.text_config.num_hidden_layers
    assert "<root>" in report["fsdp_units"] and len(report["fsdp_units"]) >= blocks + 1, report["fsdp_units"]
    assert report["dtensor_parameters"] == report["parameters"] > 0
    # The per-part LR groups survive sharding.
    groups = {g["name"]: g["lr"] for g in report["optimizer_groups"]}
    assert groups == {f"{part}_no_decay": lr for part, lr in LRS.items()}, groups

    # Losses equal the 1-process run step by step (step 1 is ln 2 by construction; steps 2-3 follow the updates).
    expected, got = _losses(one), _losses(two)
    assert sorted(expected) == sorted(got) == list(range(1, STEPS + 1))
    rel = {s: abs(got[s] - expected[s]) / abs(expected[s]) for s in expected}
    print("per-step losses 1 process vs FSDP2 x2:", {s: (expected[s], got[s]) for s in expected}, "rel", rel)
    assert max(rel.values()) <= 1e-5, rel
    assert abs(got[STEPS] - got[1]) > 1e-4, "the later steps must have moved away from ln 2"

    # The checkpoint written from the sharded model is a normal Pivot checkpoint: it reloads in a plain process and
    # gives the logits the sharded model gave, and its vision tower trained like the 1-process run's.
    trained = PivotForConditionalGeneration.from_pretrained(two).eval()
    from safetensors.torch import load_file

    check = load_file(str(two / "distributed_check.safetensors"))
    inputs = {k[len("input.") :]: v for k, v in check.items() if k.startswith("input.")}
    with torch.no_grad():
        logits = trained(**inputs).logits.float()
    torch.testing.assert_close(logits, check["logits"], rtol=1e-5, atol=1e-6)
    reference = PivotForConditionalGeneration.from_pretrained(one)
    unreached = set(model.unreached_vision_parameter_names())
    start, after, single = (dict(m.named_parameters()) for m in (model, trained, reference))
    vision = [n for n in start if n.startswith("model.vision_tower.") and n not in unreached]
    assert vision and all(not torch.equal(start[n], after[n]) for n in vision), "vision tower not updated"
    assert all(torch.equal(start[n], after[n]) for n in unreached)
    worst = max((after[n] - single[n]).abs().max().item() for n in start)
    print(f"max |w_fsdp2 - w_1proc| = {worst:.3g}")
    assert worst < 1e-5
