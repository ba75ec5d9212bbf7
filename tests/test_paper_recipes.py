"""The paper's recipe matrix: every recipe parses with its script's parser, references only models with a
known real config, is up to date with its generator, and recipes/README.md covers every table and figure."""

import importlib.util
import json
import os
import re
import subprocess
from pathlib import Path

import pytest
import yaml

from pivot_hf.configs import (
    PivotDPOConfig,
    PivotModelConfig,
    PivotScriptArguments,
    PivotSFTConfig,
    parse_recipe_args,
)
from pivot_hf.trainer.grpo import PivotGRPOConfig, PivotGRPOScriptArguments


REPO = Path(__file__).resolve().parents[1]
RECIPES = REPO / "recipes"
PARSERS = {
    "recipes/sft.py": [PivotScriptArguments, PivotModelConfig, PivotSFTConfig],
    "recipes/dpo.py": [PivotScriptArguments, PivotModelConfig, PivotDPOConfig],
    "recipes/grpo.py": [PivotGRPOScriptArguments, PivotModelConfig, PivotGRPOConfig],
}
MODEL_KEYS = ("vision_model_name_or_path", "text_model_name_or_path", "model_name_or_path")


def _generator():
    spec = importlib.util.spec_from_file_location("paper_generate", RECIPES / "paper" / "generate.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _owned_recipes() -> list[Path]:
    return sorted((RECIPES / "paper").rglob("*.yaml")) + sorted(RECIPES.glob("grpo*.yaml"))


def _script_of(path: Path) -> str:
    if path.name.startswith("grpo"):
        return "recipes/grpo.py"
    first = path.read_text().splitlines()[0]
    match = re.match(r"# script: (recipes/\w+\.py)", first)
    assert match, f"{path}: first line must name its script (`# script: recipes/<x>.py`)"
    return match.group(1)


def test_generated_recipes_are_up_to_date():
    stale = _generator().write(check=True)
    assert not stale, f"run `python recipes/paper/generate.py`; stale: {stale[:5]}"


def test_every_recipe_parses_with_its_scripts_parser(tmp_path):
    recipes = _owned_recipes()
    assert len(recipes) > 100
    for path in recipes:
        script = _script_of(path)
        # CPU-only test machine: bf16 and the output folder are overridden, every other value is the recipe's.
        argv = ["--config", str(path), "--output_dir", str(tmp_path / "out"), "--bf16", "false", "--use_cpu", "true"]
        parsed = parse_recipe_args(PARSERS[script], argv)
        assert len(parsed) == 3, path


def test_every_referenced_model_has_a_real_config():
    from importlib import resources

    generator = _generator()
    package = resources.files("pivot_hf") / "resources"
    for hub_id, name in generator.HUB_CONFIGS.items():
        found = [package / folder / f"{name}.json" for folder in ("configs", "configs_extra")]
        assert any(p.is_file() for p in found), f"{hub_id}: no real config {name}.json"
    for path in _owned_recipes():
        recipe = yaml.safe_load(path.read_text())
        for key in MODEL_KEYS:
            value = recipe.get(key)
            if not value or value.startswith(("runs/", "<", "outputs/")):  # outputs of earlier stages, placeholders
                continue
            assert value in generator.HUB_CONFIGS, f"{path}: {key}={value} has no known real config"


def test_extra_configs_build_at_their_published_sizes():
    import torch
    from transformers import AutoConfig, AutoModel

    expected = {
        "dinov2-giant": 1.1e9,
        "vit-mae-huge": 0.63e9,
        "moco-v3-vit-base": 86e6,
        "vit-huge-patch14-224-in21k": 0.63e9,
    }
    folder = REPO / "src" / "pivot_hf" / "resources" / "configs_extra"
    for name, size in expected.items():
        values = json.loads((folder / f"{name}.vision.json").read_text())
        assert values.pop("_provenance").startswith("from published sizes")
        config = AutoConfig.for_model(values.pop("model_type"), **values)
        with torch.device("meta"):
            model = AutoModel.from_config(config)
        assert sum(p.numel() for p in model.parameters()) == pytest.approx(size, rel=0.05), name


def test_stage2_pairs_differ_only_in_the_objective():
    sft = yaml.safe_load((RECIPES / "paper/stages/siglip2-so400m+qwen2.5-1.5b/2_sft.yaml").read_text())
    dpo = yaml.safe_load((RECIPES / "paper/stages/siglip2-so400m+qwen2.5-1.5b/2_pivot.yaml").read_text())
    objective = {"learning_rate", "per_device_train_batch_size", "gradient_accumulation_steps", "beta", "loss_type"}
    objective |= {"output_dir", "run_name"}  # names of the run
    assert {k: v for k, v in sft.items() if k not in objective} == {k: v for k, v in dpo.items() if k not in objective}
    assert (dpo["learning_rate"], dpo["beta"], dpo["num_train_epochs"]) == (1e-6, 0.1, 3)
    assert dpo["loss_type"] == ["sigmoid"]
    assert sft["learning_rate"] == 5e-6 and sft["num_samples"] == dpo["num_samples"] == 20000
    for recipe in (sft, dpo):  # global batch 256 on 8 GPUs
        assert recipe["per_device_train_batch_size"] * recipe["gradient_accumulation_steps"] * 8 == 256


def test_readme_covers_every_table_and_figure():
    readme = (RECIPES / "README.md").read_text()
    for item in ("Table 1", "Fig. 2", "Fig. 3", "Fig. 4", "Fig. 5", "Table M", "Table C", "Table E", "Table F",
                 "Fig. B", "Table I", "Table J", "Table K", "ensemble"):  # fmt: skip
        assert item in readme, item
    # Every command in it points at files that exist.
    for rel in re.findall(r"--config (recipes/[\w./+-]+\.yaml)", readme):
        if "<" not in rel:
            assert (REPO / rel).is_file(), rel


def _chain(*args: str) -> subprocess.CompletedProcess:
    script = RECIPES / "paper" / "run_chain.sh"
    env = {k: v for k, v in os.environ.items() if k != "PYTHON"}  # the documented default interpreter, `python`
    return subprocess.run(["bash", str(script), *args], capture_output=True, text=True, cwd="/", env=env)


def test_run_chain_dry_run_lists_the_chain_in_order():
    pair = "siglip2-large+qwen2.5-1.5b"  # one of the Table E pairs: Stage 2 also trains MPO
    proc = _chain("--dry-run", pair)
    assert proc.returncode == 0, proc.stderr
    cfg, base = f"recipes/paper/stages/{pair}", f"runs/paper/{pair}"
    z2 = "accelerate launch --config_file accelerate_configs/zero2.yaml recipes/sft.py --config"
    z3 = "accelerate launch --config_file accelerate_configs/zero3.yaml"
    ev = "accelerate launch --num_processes 8 recipes/eval_mllm.py --tasks all --batch_size 8 --dtype bfloat16"
    expected = [
        f"{z2} {cfg}/1a_projector.yaml",
        f"{z2} {cfg}/1b_finetune.yaml",
        f"{z3} recipes/sft.py --config {cfg}/2_sft.yaml",
        f"{z3} recipes/dpo.py --config {cfg}/2_pivot.yaml",
        f"{z3} recipes/dpo.py --config {cfg}/2_mpo.yaml",
    ]
    for post in ("pivot", "sft"):
        expected.append(
            f"python recipes/export_encoder.py --model_name_or_path {base}/2_{post} --output_dir {base}/encoder_{post} "
            "--export_projector --base_model google/siglip2-large-patch16-384"
        )
    for post in ("pivot", "sft"):
        enc = f"{base}/encoder_{post}"
        expected.append(
            f"{z2} recipes/paper/stage3/3a_reuse1.yaml --vision_model_name_or_path {enc} --projector_init_from {enc} "
            f"--output_dir {base}/stage3_{post}/3a_projector"
        )
        expected.append(
            f"{z2} recipes/paper/stage3/3b_reuse1.yaml --model_name_or_path {base}/stage3_{post}/3a_projector "
            f"--projector_init_from {enc} --output_dir {base}/stage3_{post}/3b_finetune"
        )
    for post in ("pivot", "sft"):
        expected.append(
            f"{ev} --model_name_or_path {base}/stage3_{post}/3b_finetune --output_dir eval/paper/{pair}/stage3_{post}"
        )
        expected.append(f"{ev} --model_name_or_path {base}/2_{post} --output_dir eval/paper/{pair}/2_{post}")
    assert proc.stdout.splitlines() == expected
    for rel in re.findall(r"--config (\S+)", proc.stdout):  # every recipe the chain names is on disk
        assert (REPO / rel).is_file(), rel


def test_run_chain_runs_a_subset_in_chain_order():
    pair = "siglip2-base+qwen2.5-0.5b"  # no MPO recipe: Stage 2 is SFT + PIVOT only
    proc = _chain(pair, "export", "--dry-run", "2")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert [line.split()[-1] if " --config " in line else line.split()[1] for line in lines] == [
        f"recipes/paper/stages/{pair}/2_sft.yaml",
        f"recipes/paper/stages/{pair}/2_pivot.yaml",
        "recipes/export_encoder.py",
        "recipes/export_encoder.py",
    ]
    assert _chain("--dry-run", pair, "1").stdout.count(" --config ") == 2  # `1` = 1a 1b


def test_run_chain_runs_every_step_on_the_python_it_is_given(tmp_path):
    """With PYTHON set (a venv's interpreter that is not first on PATH), the `accelerate launch` steps use it too:
    before, they ran on whatever `accelerate` PATH found, another environment than the export steps'."""
    python = str(tmp_path / "venv" / "bin" / "python")
    script = RECIPES / "paper" / "run_chain.sh"
    env = {**os.environ, "PYTHON": python}
    proc = subprocess.run(
        ["bash", str(script), "--dry-run", "siglip2-base+qwen2.5-0.5b"], capture_output=True, text=True, env=env
    )
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines and all(line.startswith(f"{python} ") for line in lines), lines
    assert sum(line.startswith(f"{python} -m accelerate.commands.launch ") for line in lines) == len(lines) - 2


def test_run_chain_rejects_an_unknown_pair_or_step():
    proc = _chain("--dry-run", "siglip2-so400m+llama-7b")
    assert proc.returncode != 0 and proc.stdout == ""
    assert "unknown pair 'siglip2-so400m+llama-7b'" in proc.stderr
    listed = [line.strip() for line in proc.stderr.splitlines() if line.startswith("  ")]
    assert listed == sorted(_generator().pairs())
    proc = _chain("--dry-run", "siglip2-so400m+qwen2.5-1.5b", "2", "stage9")
    assert proc.returncode != 0 and proc.stdout == "" and "unknown step 'stage9'" in proc.stderr
    assert "set -euo pipefail" in (RECIPES / "paper" / "run_chain.sh").read_text()
