"""Recipes and configuration errors raised before any compute."""

import sys
from pathlib import Path

import pytest
import torch
import yaml

from pivot_hf.configs import (
    PivotDPOConfig,
    PivotModelConfig,
    PivotScriptArguments,
    PivotSFTConfig,
    RecipeConfigError,
    parse_recipe_args,
)


REPO = Path(__file__).resolve().parents[1]
SCRIPT_CONFIGS = {"recipes/sft.py": PivotSFTConfig, "recipes/dpo.py": PivotDPOConfig}


def _script_of(path: Path) -> str | None:
    """The script a recipe declares in its header comment (`# script: recipes/dpo.py` or a launch line)."""
    head = "".join(path.read_text().splitlines(keepends=True)[:6])
    for script in SCRIPT_CONFIGS:
        if script in head:
            return script
    return None


def _parse(script: str, argv: list[str]):
    dataclasses = [PivotScriptArguments, PivotModelConfig, SCRIPT_CONFIGS[script]]
    if not torch.cuda.is_available():
        argv = argv + ["--use_cpu", "true"]  # GPU recipes ask for bf16, which a CPU run only takes with use_cpu
    return parse_recipe_args(dataclasses, argv)


TRAINING_RECIPES = sorted(p for p in (REPO / "recipes").rglob("*.yaml") if _script_of(p))


def test_training_recipes_found():
    names = {p.relative_to(REPO).as_posix() for p in TRAINING_RECIPES}
    assert "recipes/so400m.yaml" in names
    assert any(n.startswith("recipes/demo/") for n in names)


@pytest.mark.parametrize("path", TRAINING_RECIPES, ids=lambda p: p.relative_to(REPO).as_posix())
def test_every_recipe_parses_with_its_script(path):
    script_args, model_args, training_args = _parse(_script_of(path), ["--config", str(path)])
    assert training_args.tunable_parts
    assert model_args.model_name_or_path or model_args.vision_model_name_or_path
    assert script_args.dataset_name


def test_headline_recipe_has_the_official_values():
    path = REPO / "recipes" / "so400m.yaml"
    script_args, model_args, args = _parse("recipes/dpo.py", ["--config", str(path)])
    assert args.loss_type == ["sigmoid"] and args.beta == 0.1 and args.learning_rate == 1e-6
    assert (
        args.num_train_epochs == 3 and args.per_device_train_batch_size * args.gradient_accumulation_steps * 8 == 256
    )
    assert args.tunable_parts == ["vision_tower", "projector", "language_model"]
    assert args.vision_tower_lr is None and args.max_length == 2048 and args.lr_scheduler_type == "cosine"
    assert script_args.num_samples == 20000 and script_args.dataset_seed == 777
    assert "so400m" in yaml.safe_load(path.read_text())["model_name_or_path"]


def test_cli_overrides_the_recipe():
    path = REPO / "recipes" / "so400m.yaml"
    _, model_args, args = _parse(
        "recipes/dpo.py",
        ["--config", str(path), "--learning_rate", "2e-6", "--tunable_parts", "projector,language_model"],
    )
    assert args.learning_rate == 2e-6 and args.tunable_parts == ["projector", "language_model"]


# ------------------------------------------------------------------------------------------- configuration errors
def test_unknown_recipe_key_names_the_key_and_the_fix(tmp_path):
    recipe = tmp_path / "bad.yaml"
    recipe.write_text("model_name_or_path: x\nvision_tower_lrr: 2.0e-6\n")
    with pytest.raises(RecipeConfigError) as err:
        _parse("recipes/dpo.py", ["--config", str(recipe)])
    assert "vision_tower_lrr" in str(err.value) and "Did you mean: vision_tower_lr" in str(err.value)
    with pytest.raises(RecipeConfigError, match="`betaa` .*on the command line.*Did you mean: beta"):
        _parse("recipes/dpo.py", ["--model_name_or_path", "x", "--betaa", "0.2"])


@pytest.mark.parametrize(
    "parts, message",
    [(["vision"], "Unknown tunable_parts \\['vision'\\].*choose from"), ([], "empty: nothing would train")],
)
def test_bad_tunable_parts(parts, message, tmp_path):
    with pytest.raises(RecipeConfigError, match=message):
        PivotSFTConfig(output_dir=str(tmp_path), tunable_parts=parts)


def test_tunable_parts_that_leave_nothing_to_train(tiny_pivot_factory, tmp_path):
    from pivot_hf import PivotForConditionalGeneration
    from pivot_hf.trainer import PivotSFTTrainer

    model = PivotForConditionalGeneration.from_pretrained(tiny_pivot_factory("siglip"))
    args = PivotSFTConfig(output_dir=str(tmp_path), tunable_parts=["projector"], report_to="none")
    with pytest.raises(RecipeConfigError, match="leaves no trainable weight.*Fix"):
        # e.g. Stage 3 reusing the whole projector frozen while only the projector was to train
        PivotSFTTrainer(model, args=args, after_tunable_parts=lambda m: m.requires_grad_(False))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU refusal")
def test_liger_without_cuda_is_refused_at_start(tmp_path):
    with pytest.raises(RecipeConfigError, match="use_liger_kernel.*needs a CUDA GPU.*use_liger_kernel: false"):
        PivotDPOConfig(output_dir=str(tmp_path), use_liger_kernel=True)


def test_feature_layer_out_of_reach(tiny_pivot_factory):
    from pivot_hf.testing import build_tiny_llm, build_tiny_vision  # noqa: F401
    from pivot_hf.trainer import preflight_model

    model_args = PivotModelConfig(model_name_or_path=tiny_pivot_factory("siglip"), vision_feature_layer=-9)
    with pytest.raises(RecipeConfigError, match="vision_feature_layer=-9 cannot be reached.*3 layers.*Fix"):
        preflight_model(model_args)


def test_feature_layer_out_of_reach_when_composing(tmp_path):
    from pivot_hf.testing import build_tiny_llm, build_tiny_vision
    from pivot_hf.trainer import preflight_model

    vision = build_tiny_vision(tmp_path / "vision", "clip")
    text = build_tiny_llm(tmp_path / "llm")
    args = PivotModelConfig(vision_model_name_or_path=vision, text_model_name_or_path=text, vision_feature_layer=5)
    with pytest.raises(RecipeConfigError, match="vision_feature_layer=5 cannot be reached"):
        preflight_model(args)


def test_max_length_smaller_than_image_tokens(tiny_pivot_factory, fixtures_dir, tmp_path):
    from pivot_hf import PivotProcessor
    from pivot_hf.trainer.data_prep import load_training_data

    processor = PivotProcessor.from_pretrained(tiny_pivot_factory("siglip"))
    script_args = PivotScriptArguments(dataset_name=str(fixtures_dir / "mmpr-mini"))
    args = PivotDPOConfig(output_dir=str(tmp_path), max_length=12, report_to="none")
    with pytest.raises(RecipeConfigError, match="max_length=12 is not larger than the 16 image tokens.*Fix"):
        load_training_data(script_args, args, processor, "preference")
    # Long enough for the image, too short for any row: every row would be dropped, which is also caught up front.
    args = PivotDPOConfig(output_dir=str(tmp_path), max_length=24, report_to="none")
    with pytest.raises(RecipeConfigError, match="No training rows left.*exceeds_max_length.*raise `max_length`"):
        load_training_data(script_args, args, processor, "preference")


def test_reference_model_with_another_architecture(tiny_pivot_factory):
    from pivot_hf import PivotForConditionalGeneration
    from pivot_hf.trainer import check_reference_model

    policy = PivotForConditionalGeneration.from_pretrained(tiny_pivot_factory("siglip", "qwen2"))
    other = PivotForConditionalGeneration.from_pretrained(tiny_pivot_factory("siglip", "llama"))
    with pytest.raises(RecipeConfigError, match="(?s)different architecture.*text.model_type.*ref_model_name_or_path"):
        check_reference_model(policy, other, "other")
    check_reference_model(policy, PivotForConditionalGeneration.from_pretrained(tiny_pivot_factory("siglip")), "same")


def test_missing_or_placeholder_model_path():
    from pivot_hf.configs import check_model_source

    with pytest.raises(RecipeConfigError, match="does not exist"):
        check_model_source(PivotModelConfig(model_name_or_path="runs/paper/x/1b_finetune"))
    with pytest.raises(RecipeConfigError, match="placeholder"):
        check_model_source(PivotModelConfig(model_name_or_path="<stage-1b checkpoint>"))
    with pytest.raises(RecipeConfigError, match="No model given"):
        check_model_source(PivotModelConfig())


def test_scripts_fail_before_loading_on_bad_keys(tmp_path):
    sys.path.insert(0, str(REPO / "recipes"))
    from sft import main as sft_main

    with pytest.raises(RecipeConfigError, match="learning_rat"):
        sft_main(["--model_name_or_path", "x", "--learning_rat", "1e-3", "--output_dir", str(tmp_path)])


@pytest.mark.parametrize("path", sorted((REPO / "accelerate_configs").glob("*.yaml")), ids=lambda p: p.name)
def test_accelerate_configs_load_and_leave_the_optimizer_to_the_trainer(path):
    from accelerate.commands.config.config_args import load_config_from_file

    config = load_config_from_file(str(path))
    assert config.num_processes >= 8 and config.mixed_precision == "bf16"
    raw = yaml.safe_load(path.read_text())
    # A DeepSpeed-built optimizer would drop the per-part LR groups.
    assert "optimizer" not in (raw.get("deepspeed_config") or {})
    assert "deepspeed_config_file" not in (raw.get("deepspeed_config") or {})
