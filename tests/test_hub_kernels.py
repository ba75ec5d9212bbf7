"""Hub kernels (transformers' `use_kernels`) are our explicit choice, not transformers' default.

transformers 5.25 loads models with Hub kernels on unless told otherwise (`use_kernels=None` -> True, or
`USE_HUB_KERNELS=0`); that swaps layers for downloaded kernels, which changes the numbers our exactness tests and the
reference log-prob cache rely on, and silently falls back offline. Every loader of ours passes `use_kernels` (the
recipe key, default False), on both ends of the tested range; a user turns them on with `use_kernels: true`.
"""

import importlib.util
import os
from pathlib import Path

import pytest
import transformers
from packaging.version import Version
from transformers import AutoModel, AutoModelForCausalLM, AutoModelForImageTextToText, PreTrainedModel

from pivot_hf import PivotForConditionalGeneration
from pivot_hf.configs import PivotModelConfig
from pivot_hf.trainer.model_loading import load_model


pytestmark = pytest.mark.compat

# Where transformers itself turns kernels on by default: the default our loaders must override.
KERNELS_BY_DEFAULT = (
    Version(transformers.__version__).release[:2] >= (5, 25)
    and importlib.util.find_spec("kernels") is not None
    and os.environ.get("USE_HUB_KERNELS", "YES").upper() not in ("0", "NO", "FALSE", "OFF")
)


def _kernelized(model) -> list[str]:
    return [name or "<root>" for name, m in model.named_modules() if isinstance(m, PreTrainedModel) and m.use_kernels]


def test_recipes_load_without_hub_kernels(tiny_pivot_factory, one_torch_thread):
    checkpoint = tiny_pivot_factory("siglip")
    if KERNELS_BY_DEFAULT:  # else this test would pass whatever our loaders did
        assert _kernelized(AutoModelForImageTextToText.from_pretrained(checkpoint)) == ["<root>"]
    model = load_model(PivotModelConfig(model_name_or_path=checkpoint))
    assert _kernelized(model) == []
    model.train()  # transformers re-kernelizes on train()/eval() when kernels are on
    assert _kernelized(model) == []


def test_composition_loads_both_parts_without_hub_kernels(tiny_pivot_factory, one_torch_thread):
    parts = Path(tiny_pivot_factory("siglip") + "-parts")
    vision, text = parts / "vision-siglip", parts / "llm-qwen2"
    if KERNELS_BY_DEFAULT:
        assert AutoModel.from_pretrained(vision).use_kernels
    model = PivotForConditionalGeneration.from_vision_text_pretrained(vision, text)
    assert _kernelized(model) == []
    via_recipe = load_model(PivotModelConfig(vision_model_name_or_path=str(vision), text_model_name_or_path=str(text)))
    assert _kernelized(via_recipe) == []


@pytest.mark.skipif(not KERNELS_BY_DEFAULT, reason="Hub kernels need transformers >= 5.25 and the `kernels` package")
def test_use_kernels_key_turns_them_on(tiny_pivot_factory, one_torch_thread):
    model = load_model(PivotModelConfig(model_name_or_path=tiny_pivot_factory("siglip"), use_kernels=True))
    assert _kernelized(model) == ["<root>"]


def test_every_model_load_in_the_package_decides_hub_kernels():
    """Each `<model class>.from_pretrained(...)` call in src/, and in the recipes, benchmarks and scripts shipped
    beside it, passes `use_kernels` (or forwards a kwargs dict that our loader filled): a new loader cannot silently
    inherit transformers' default."""
    import ast

    not_models = ("Config", "Processor", "Tokenizer", "PeftModel", "VisionBackbone")
    repo = Path(__file__).resolve().parents[1]
    undecided = []
    for path in [p for folder in ("src", "recipes", "benchmarks", "scripts") for p in (repo / folder).rglob("*.py")]:
        for node in ast.walk(ast.parse(path.read_text())):
            if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)):
                continue
            if node.func.attr != "from_pretrained" or not isinstance(
                node.func.value, ast.Name | ast.Call | ast.Attribute
            ):
                continue
            owner = ast.unparse(node.func.value)
            if any(word.lower() in owner.lower() for word in not_models) or owner in ("cls", "super()"):
                continue
            if not any(k.arg == "use_kernels" or k.arg is None for k in node.keywords):
                undecided.append(f"{path.relative_to(repo)}:{node.lineno}: {ast.unparse(node)[:100]}")
    assert not undecided, "\n".join(undecided)


def _grpo_trainer(checkpoint, fixtures_dir, tmp_path, use_kernels=False, **config):
    from pivot_hf import PivotProcessor
    from pivot_hf.trainer.grpo import (
        PivotGRPOConfig,
        PivotGRPOScriptArguments,
        PivotGRPOTrainer,
        build_reward_funcs,
        load_grpo_dataset,
    )

    processor = PivotProcessor.from_pretrained(checkpoint)
    script_args = PivotGRPOScriptArguments(dataset_name=str(fixtures_dir / "mmpr-mini"), num_samples=-1)
    dataset, _ = load_grpo_dataset(script_args, None, processor.tokenizer)
    args = PivotGRPOConfig(
        output_dir=str(tmp_path / "grpo"),
        beta=0.04,  # a KL reference, which TRL reloads from the policy's checkpoint
        num_generations=2,
        per_device_train_batch_size=2,
        max_completion_length=4,
        max_steps=1,
        use_cpu=True,
        bf16=False,
        report_to=[],
        save_strategy="no",
        **config,
    )
    model = load_model(PivotModelConfig(model_name_or_path=checkpoint, use_kernels=use_kernels), processor)
    trainer = PivotGRPOTrainer(
        model, build_reward_funcs(["accuracy"]), args=args, train_dataset=dataset, processing_class=processor
    )
    return model, trainer


def test_reference_that_trl_reloads_gets_the_policys_choice(
    tiny_pivot_factory, fixtures_dir, tmp_path, one_torch_thread
):
    """GRPO with `beta > 0` (and DPO without a `ref_model` under ZeRO-3) let TRL reload the reference from the policy's
    checkpoint; under transformers 5.25 that load would turn Hub kernels on for the reference only."""
    model, trainer = _grpo_trainer(tiny_pivot_factory("siglip"), fixtures_dir, tmp_path)
    assert trainer.ref_model is not None and trainer.ref_model is not model
    assert _kernelized(model) == [] and _kernelized(trainer.ref_model) == []


@pytest.mark.skipif(not KERNELS_BY_DEFAULT, reason="Hub kernels need transformers >= 5.25 and the `kernels` package")
def test_reference_that_trl_reloads_follows_a_policy_with_hub_kernels(
    tiny_pivot_factory, fixtures_dir, tmp_path, one_torch_thread
):
    model, trainer = _grpo_trainer(tiny_pivot_factory("siglip"), fixtures_dir, tmp_path, use_kernels=True)
    assert _kernelized(model) == _kernelized(trainer.ref_model) == ["<root>"]


def test_trl_reference_loads_keep_an_explicit_model_init_kwargs_choice(tiny_pivot_factory, one_torch_thread):
    import sys

    from trl import DPOTrainer, GRPOTrainer
    from trl.trainer.utils import create_model_from_path

    from pivot_hf.trainer.model_loading import trl_reference_loads_like

    checkpoint = tiny_pivot_factory("siglip")
    policy = load_model(PivotModelConfig(model_name_or_path=checkpoint))
    for trainer_class in (DPOTrainer, GRPOTrainer):
        module = sys.modules[trainer_class.__module__]
        args = type("Args", (), {"model_init_kwargs": None})()
        with trl_reference_loads_like(policy, args, trainer_class):
            assert _kernelized(module.create_model_from_path(checkpoint)) == []
        assert module.create_model_from_path is create_model_from_path  # restored
        args.model_init_kwargs = {"use_kernels": KERNELS_BY_DEFAULT}
        with trl_reference_loads_like(policy, args, trainer_class):
            assert module.create_model_from_path is create_model_from_path  # the user's choice, untouched


@pytest.mark.skipif(not KERNELS_BY_DEFAULT, reason="Hub kernels need transformers >= 5.25 and the `kernels` package")
def test_reference_cache_key_tells_hub_kernels_apart(tiny_pivot_factory, one_torch_thread):
    from pivot_hf.trainer.fast_dpo.reference_cache import reference_identity

    checkpoint = tiny_pivot_factory("siglip")
    without = reference_identity(load_model(PivotModelConfig(model_name_or_path=checkpoint)))
    with_kernels = reference_identity(load_model(PivotModelConfig(model_name_or_path=checkpoint, use_kernels=True)))
    assert "hub_kernels" not in without  # caches written without Hub kernels keep their keys
    assert "hub_kernels" in with_kernels  # so a cache computed without them is not reused with them, nor back
    assert {k: v for k, v in with_kernels.items() if k != "hub_kernels"} == without


@pytest.mark.skipif(not KERNELS_BY_DEFAULT, reason="Hub kernels need transformers >= 5.25 and the `kernels` package")
def test_composition_with_hub_kernels_kernelizes_the_whole_model(tiny_pivot_factory, one_torch_thread):
    """`from_vision_text_pretrained(..., use_kernels=True)` used to kernelize the two parts on their own, and the LLM's
    flag stayed on its discarded CausalLM wrapper: the LLM never re-kernelized for training. Now the composed model is
    kernelized as `from_pretrained(checkpoint, use_kernels=True)` is; `from_vision_text_models` decides too."""
    parts = Path(tiny_pivot_factory("siglip") + "-parts")
    vision, text = parts / "vision-siglip", parts / "llm-qwen2"
    model = PivotForConditionalGeneration.from_vision_text_pretrained(vision, text, use_kernels=True)
    assert _kernelized(model) == ["<root>"]
    model.train()
    assert str(model.kernels_mode).endswith("TRAINING")
    loaded = {
        "vision_tower": AutoModel.from_pretrained(vision),
        "language_model": AutoModelForCausalLM.from_pretrained(text),
    }
    assert all(m.use_kernels for m in loaded.values())  # transformers' default
    assert (
        _kernelized(PivotForConditionalGeneration.from_vision_text_models(*loaded.values(), use_kernels=False)) == []
    )
    loaded = [AutoModel.from_pretrained(vision, use_kernels=False), AutoModelForCausalLM.from_pretrained(text)]
    composed = PivotForConditionalGeneration.from_vision_text_models(*loaded, use_kernels=True)
    assert _kernelized(composed) == ["<root>"]
