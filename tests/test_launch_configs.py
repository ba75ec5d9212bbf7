"""Every shipped accelerate config is launched by a test as the README spells it (on CPU with the documented overrides
`--num_processes 2 --mixed_precision no` and `use_cpu: true`), and the launches that would fail after the weights loaded,
or silently run something else, are refused before any weight loads, with the fix:

- DeepSpeed config `mixed_precision: bf16` vs a recipe with `bf16: false` (transformers' mismatch error, late);
- DeepSpeed on a machine without CUDA without `use_cpu: true` (DeepSpeed's train_batch_size assertion, late);
- `accelerate launch --cpu` with a DeepSpeed / FSDP / multi-GPU config (accelerate drops the config: one plain process).
"""

import subprocess
import sys
from pathlib import Path

import pytest

from pivot_hf.configs import RecipeConfigError
from pivot_hf.trainer import launch_checks
from pivot_hf.trainer.launch_checks import check_launch


REPO = Path(__file__).resolve().parents[1]

# Which test launches each shipped config (2 CPU processes each; the multi-node ones as 2 machines x 1 process).
LAUNCHED_BY = {
    "ddp.yaml": ["test_distributed_multinode.py", "test_distributed_resume.py"],
    "fsdp2.yaml": ["test_distributed_multinode.py", "test_distributed_fsdp.py"],
    "zero2.yaml": ["test_distributed_zero3.py"],
    "zero3.yaml": ["test_distributed_zero3.py"],
    "multinode_zero3.yaml": ["test_distributed_multinode.py"],
}


def test_every_shipped_config_is_launched_by_a_test():
    shipped = sorted(p.name for p in (REPO / "accelerate_configs").glob("*.yaml"))
    assert shipped == sorted(LAUNCHED_BY), f"a config without a launching test: {shipped}"
    for config, tests in LAUNCHED_BY.items():
        for test in tests:
            text = (REPO / "tests" / test).read_text()
            assert f'"{config}"' in text or f"'{config}'" in text, f"{test} does not launch {config}"


class _Args:
    def __init__(self, bf16=False, fp16=False, use_cpu=True, batch=1, accumulation=1, max_grad_norm=1.0):
        self.bf16, self.fp16, self.use_cpu = bf16, fp16, use_cpu
        self.per_device_train_batch_size, self.gradient_accumulation_steps = batch, accumulation
        self.max_grad_norm = max_grad_norm


@pytest.mark.parametrize(
    "launcher,args,ok",
    [
        ("bf16", _Args(bf16=False), False),
        ("no", _Args(bf16=True), False),
        ("fp16", _Args(bf16=True), False),
        ("no", _Args(), True),
        ("bf16", _Args(bf16=True), True),
    ],
)
def test_deepspeed_precision_must_match_the_recipe(launcher, args, ok, monkeypatch):
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", launcher)
    if ok:
        check_launch(args)
    else:
        with pytest.raises(RecipeConfigError, match=f"mixed_precision: {launcher}.*--mixed_precision"):
            check_launch(args)


@pytest.mark.parametrize("bf16,refused", [({"enabled": "auto"}, False), ({"enabled": True}, True), (None, False)])
def test_deepspeed_json_precision_is_what_counts(bf16, refused, monkeypatch, tmp_path):
    """With a DeepSpeed JSON (`deepspeed_config_file`) its own bf16/fp16 blocks decide; "auto" follows the recipe."""
    import json

    config = {"zero_optimization": {"stage": 3}, **({"bf16": bf16} if bf16 else {})}
    (tmp_path / "ds.json").write_text(json.dumps(config))
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "no")
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_CONFIG_FILE", str(tmp_path / "ds.json"))
    if refused:
        with pytest.raises(RecipeConfigError, match='mixed_precision: bf16.*"enabled": "auto"'):
            check_launch(_Args(bf16=False))
    else:
        check_launch(_Args(bf16=False))


@pytest.mark.parametrize(
    "values,refused",
    [
        ({"train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto"}, None),
        ({"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 4, "train_batch_size": 16}, None),
        ({"train_micro_batch_size_per_gpu": 4, "train_batch_size": "auto"}, "train_micro_batch_size_per_gpu: 4"),
        ({"gradient_accumulation_steps": 8}, "gradient_accumulation_steps: 8"),
        ({"train_batch_size": 256}, "train_batch_size: 256.*x 2 processes = 16"),
        ({"gradient_clipping": 0.5}, "gradient_clipping: 0.5.*max_grad_norm = 1.0"),
    ],
)
def test_deepspeed_json_batch_values_must_match_the_recipe(values, refused, monkeypatch, tmp_path):
    """A DeepSpeed JSON's fixed batch / clipping values that disagree with the recipe are refused before any weight
    loads (else DeepSpeed's train_batch_size assertion fires after both models loaded); "auto" follows the recipe."""
    import json

    (tmp_path / "ds.json").write_text(json.dumps({"zero_optimization": {"stage": 3}, **values}))
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "no")
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_CONFIG_FILE", str(tmp_path / "ds.json"))
    monkeypatch.setenv("WORLD_SIZE", "2")
    args = _Args(batch=2, accumulation=4)
    if refused is None:
        check_launch(args)
    else:
        with pytest.raises(RecipeConfigError, match=f'{refused}.*"auto"'):
            check_launch(args)


def test_deepspeed_without_cuda_needs_use_cpu(monkeypatch):
    import torch

    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "no")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(RecipeConfigError, match="use_cpu: true"):
        check_launch(_Args(use_cpu=False))
    check_launch(_Args(use_cpu=True))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    check_launch(_Args(use_cpu=False))  # a GPU machine


@pytest.mark.parametrize("config,refused", [("zero3.yaml", True), ("fsdp2.yaml", True), ("ddp.yaml", True)])
def test_cpu_flag_that_drops_a_distributed_config_is_refused(config, refused, monkeypatch):
    monkeypatch.setenv("ACCELERATE_USE_CPU", "True")
    argv = [
        "python",
        "/usr/bin/accelerate",
        "launch",
        "--config_file",
        str(REPO / "accelerate_configs" / config),
        "--cpu",
    ]
    monkeypatch.setattr(launch_checks, "_launcher_argv", lambda: argv)
    with pytest.raises(RecipeConfigError, match=f"--cpu.*{config}.*drops"):
        check_launch(_Args())
    monkeypatch.setattr(launch_checks, "_launcher_argv", lambda: [a for a in argv if a != "--cpu"])
    check_launch(_Args())  # the config kept (e.g. `use_cpu: true` in the config itself)


def test_no_launcher_nothing_to_check(monkeypatch):
    for key in ("ACCELERATE_USE_DEEPSPEED", "ACCELERATE_USE_CPU", "ACCELERATE_USE_FSDP"):
        monkeypatch.delenv(key, raising=False)
    check_launch(_Args(bf16=True, use_cpu=False))


def _launch(tmp_path, flags: list[str], recipe_flags: list[str], tiny: str) -> tuple[int, str]:
    from test_distributed_fsdp import _env, _recipe_args
    from test_distributed_zero3 import free_port

    args = _recipe_args(tiny, tmp_path / "out", 1)
    i = args.index("--use_cpu")
    del args[i : i + 2]  # each case says whether the recipe sets it
    cmd = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--config_file",
        str(REPO / "accelerate_configs/zero3.yaml"),
    ]
    cmd += ["--main_process_port", str(free_port()), *flags, *args, *recipe_flags]
    proc = subprocess.run(cmd, env=_env(), cwd=REPO, capture_output=True, text=True, timeout=600)
    return proc.returncode, proc.stdout + proc.stderr


@pytest.mark.slow
@pytest.mark.multiprocess
@pytest.mark.parametrize(
    "case,flags,recipe_flags,message",
    [
        # the shipped config as it is (bf16) against a recipe with bf16: false
        ("precision", ["--num_processes", "2"], ["--use_cpu", "true"], "mixed_precision: bf16"),
        # use_cpu missing on a CPU machine
        ("use_cpu", ["--num_processes", "2", "--mixed_precision", "no"], [], "use_cpu: true"),
        # --cpu drops DeepSpeed
        ("cpu_flag", ["--cpu", "--mixed_precision", "no"], ["--use_cpu", "true"], "drops that config"),
    ],
)
def test_real_launch_refused_before_weights_load(case, flags, recipe_flags, message, tmp_path, tiny_pivot_factory):
    import torch

    if case == "use_cpu" and torch.cuda.is_available():
        pytest.skip("a CUDA machine does not need use_cpu")
    code, log = _launch(tmp_path, flags, recipe_flags, tiny_pivot_factory("siglip"))
    assert code != 0 and "RecipeConfigError" in log and message in log, log[-3000:]
    assert "Loading weights" not in log and not (tmp_path / "out" / "model.safetensors").exists()
