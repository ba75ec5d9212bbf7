"""PEFT: TRL's LoRA keys in the recipes (LoRA on the LLM, tower and projector trained in full), the DPO reference
under PEFT, the adapter output (reload, merge, encoder export) and the refusal of 4/8-bit loading without CUDA."""

import json
import logging
import math
import sys
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, PeftModel
from transformers import AutoModel, AutoModelForImageTextToText

import pivot_hf  # noqa: F401  (registers the Auto classes)
from pivot_hf import PivotForConditionalGeneration, PivotProcessor
from pivot_hf.configs import TUNABLE_PARTS, PivotDPOConfig, PivotModelConfig, RecipeConfigError
from pivot_hf.data import load_pivot_dataset
from pivot_hf.export import export_encoder, merge_adapter, merge_adapter_checkpoint
from pivot_hf.trainer import PivotDPOTrainer, trainable_split
from pivot_hf.trainer.adapters import (
    base_parameter_name,
    complete_lora_config,
    describe_reference,
    restore_full_part_dtypes,
    scoped_target_modules,
)


REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "recipes"))

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def tiny(tiny_pivot_factory):
    return tiny_pivot_factory("siglip")


@pytest.fixture(scope="module")
def mmpr(fixtures_dir):
    return str(fixtures_dir / "mmpr-mini")


def _argv(tiny, mmpr, output_dir, **extra):
    flags = {
        "model_name_or_path": tiny,
        "dataset_name": mmpr,
        "output_dir": str(output_dir),
        "max_steps": 2,
        "per_device_train_batch_size": 2,
        "gradient_checkpointing": "false",
        "logging_steps": 1,
        "report_to": "none",
        "save_strategy": "no",
        "disable_tqdm": "true",
        "max_length": 512,
        "learning_rate": 1e-3,
        "projector_lr": 5e-4,
        "vision_tower_lr": 1e-3,
        "seed": 0,
        "use_peft": "true",
        "lora_r": 8,
        **extra,
    }
    argv = []
    for key, value in flags.items():
        argv += [f"--{key}"] + ([str(v) for v in value] if isinstance(value, list) else [str(value)])
    return argv


def _inputs(processor, sample_images):
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is in it?"}]}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return processor(images=sample_images[:2], text=[text] * 2, return_tensors="pt", padding=True)


def _logits(model, inputs):
    model.eval()
    with torch.no_grad():
        return model(**inputs).logits.float()


def _assert_peft_run(trainer, tiny):
    """Base LLM unchanged, every LoRA weight changed, tower (reached blocks) and projector changed in full."""
    peft_model = trainer.accelerator.unwrap_model(trainer.model)
    assert isinstance(peft_model, PeftModel)
    start = dict(PivotForConditionalGeneration.from_pretrained(tiny).named_parameters())
    unreached = set(PivotForConditionalGeneration.from_pretrained(tiny).unreached_vision_parameter_names())
    lora, trained_copies = 0, 0
    for name, param in peft_model.named_parameters():
        base = base_parameter_name(name)
        if ".lora_" in name:
            lora += 1
            if ".lora_B." in name:
                assert param.abs().sum() > 0, f"LoRA weight did not train: {name}"
            continue
        if ".modules_to_save." in name:
            trained_copies += 1
            changed = not torch.equal(param.detach(), start[base].detach())
            assert changed == (base not in unreached), name  # reached weights trained, the blocks above stay frozen
            continue
        # Everything else, the LLM's base weights included, is the starting checkpoint.
        assert torch.equal(param.detach(), start[base].detach()), f"base weight changed: {name}"
    assert lora > 0 and trained_copies > 0
    report = trainer.tunable_parts_report
    assert {part for part, entry in report.items() if entry["changed"] == entry["total"] > 0} == {
        "vision_tower",
        "projector",
        "language_model",
    }


# ------------------------------------------------------------------------------------------------ DPO recipe, end to end
def test_dpo_recipe_with_lora_llm_full_tower(tiny, mmpr, tmp_path, sample_images):
    from dpo import main as dpo_main

    out = tmp_path / "dpo"
    trainer = dpo_main(_argv(tiny, mmpr, out, lora_target_modules=["q_proj", "v_proj"]))
    # No second model: the reference is the adapter-disabled policy, with the frozen originals of the full parts.
    assert trainer.ref_model is None
    first = next(e for e in trainer.state.log_history if "loss" in e)
    assert first["loss"] == pytest.approx(math.log(2), rel=1e-6)
    _assert_peft_run(trainer, tiny)
    # The adapter is scoped to the LLM: the tower's own q_proj/v_proj carry no LoRA (trained in full instead).
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["r"] == 8 and config["modules_to_save"] == ["vision_tower", "multi_modal_projector"]
    assert all(t.startswith("model.language_model.") for t in config["target_modules"])
    assert (out / "adapter_model.safetensors").is_file() and not (out / "model.safetensors").exists()
    run = json.loads((out / "pivot_run.json").read_text())
    assert run["peft"]["r"] == 8 and run["peft"]["adapted_parts"] == ["language_model"]

    # Reload (PEFT's own loader on the base checkpoint) and merge: the trained model's logits.
    processor = PivotProcessor.from_pretrained(out)
    inputs = _inputs(processor, sample_images)
    trained = _logits(trainer.accelerator.unwrap_model(trainer.model), inputs)
    reloaded = PeftModel.from_pretrained(PivotForConditionalGeneration.from_pretrained(tiny), str(out))
    torch.testing.assert_close(_logits(reloaded, inputs), trained, rtol=1e-5, atol=1e-5)
    merged_dir = merge_adapter_checkpoint(out, tmp_path / "merged")
    merged = AutoModelForImageTextToText.from_pretrained(merged_dir)
    assert type(merged).__name__ == "PivotForConditionalGeneration"
    assert not any("lora" in n or "modules_to_save" in n for n, _ in merged.named_parameters())
    torch.testing.assert_close(_logits(merged, inputs), trained, rtol=1e-5, atol=1e-5)

    # The encoder export works from the PEFT run folder and is the merged model's tower, bit for bit.
    folder = export_encoder(str(out), tmp_path / "encoder")
    encoder = AutoModel.from_pretrained(folder)
    tower = merged.model.vision_tower.state_dict()
    assert encoder.state_dict().keys() == tower.keys()
    assert all(torch.equal(v, tower[k]) for k, v in encoder.state_dict().items())
    card = (Path(folder) / "README.md").read_text()
    assert "LoRA adapters of rank 8" in card and "encoder itself trained in full" in card


def test_sft_recipe_with_dora_rslora(tiny, mmpr, tmp_path, sample_images):
    from sft import main as sft_main

    out = tmp_path / "sft"
    trainer = sft_main(_argv(tiny, mmpr, out, use_dora="true", use_rslora="true", lora_target_modules="all-linear"))
    _assert_peft_run(trainer, tiny)
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["use_dora"] and config["use_rslora"]
    # all-linear on the LLM: every projection of every decoder layer, never lm_head nor a tower layer.
    assert {t.rsplit(".", 1)[-1] for t in config["target_modules"]} == {
        "q_proj",
        "k_proj",
        "v_proj",
        "o_proj",
        "gate_proj",
        "up_proj",
        "down_proj",
    }
    inputs = _inputs(PivotProcessor.from_pretrained(out), sample_images)
    trained = _logits(trainer.accelerator.unwrap_model(trainer.model), inputs)
    torch.testing.assert_close(_logits(merge_adapter(out), inputs), trained, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------------------------ trainer API
def test_user_lora_config_on_tower_and_llm_trains_projector_in_full(tiny, mmpr, tmp_path, caplog):
    """TRL's documented door (`peft_config=LoraConfig(...)`): q_proj/v_proj exist in both the tower and the LLM, so
    both get LoRA; the projector, a tunable part without adapters, trains in full; precompute needs no second model."""
    model = PivotForConditionalGeneration.from_pretrained(tiny)
    processor = PivotProcessor.from_pretrained(tiny)
    dataset, _ = load_pivot_dataset(mmpr, "preference", num_samples=4)
    args = PivotDPOConfig(
        output_dir=str(tmp_path),
        max_steps=1,
        per_device_train_batch_size=2,
        report_to="none",
        save_strategy="no",
        disable_tqdm=True,
        max_length=512,
        learning_rate=1e-3,
        precompute_ref_log_probs=True,
        logging_steps=1,
    )
    with caplog.at_level(logging.INFO, logger="pivot_hf"):
        trainer = PivotDPOTrainer(
            model,
            args=args,
            train_dataset=dataset,
            processing_class=processor,
            peft_config=LoraConfig(r=4, target_modules=["q_proj", "v_proj"]),
        )
    # The split is the wrapped model's (LoRA weights and the projector's trained copy), and the log says it.
    split = trainable_split(trainer.model)
    lora_llm = sum(p.numel() for n, p in trainer.model.named_parameters() if "language_model" in n and p.requires_grad)
    assert split["language_model"]["trainable"] == lora_llm > 0
    assert f"{lora_llm / 1e6:10.3f}M" in caplog.text
    assert (
        "DPO reference (once, before training (precompute_ref_log_probs)): the policy with its adapters disabled"
        in (caplog.text)
    )
    assert "['projector'] (trained in full) run as the frozen originals" in caplog.text
    assert trainer.ref_model is None and trainer._peft_parts == (["language_model", "vision_tower"], ["projector"])
    peft_model = trainer.model
    unreached = {n for n in model.unreached_vision_parameter_names()}
    trainable = [n for n, p in peft_model.named_parameters() if p.requires_grad]
    # LoRA on the tower's blocks above the feature layer stays frozen (no gradient can reach it).
    assert not any(base_parameter_name(n).rsplit(".", 1)[0] + ".weight" in unreached for n in trainable)
    assert any("vision_tower" in n and ".lora_A." in n for n in trainable)
    assert any("multi_modal_projector.modules_to_save" in n for n in trainable)
    trainer.train()
    first = next(e for e in trainer.state.log_history if "loss" in e)
    assert first["loss"] == pytest.approx(math.log(2), rel=1e-6)
    assert trainer.tunable_parts_report["projector"]["changed"] == 4
    # The reference pass (adapters disabled) did not un-freeze anything.
    assert [n for n, p in peft_model.named_parameters() if p.requires_grad] == trainable


def test_adapter_on_a_frozen_part_is_refused(tiny):
    model = PivotForConditionalGeneration.from_pretrained(tiny)
    with pytest.raises(RecipeConfigError, match="vision_tower"):
        complete_lora_config(model, LoraConfig(target_modules=["q_proj"]), ["projector", "language_model"])
    # PEFT's `all-linear` (expanded only when PEFT wraps) is seen as hitting every part.
    with pytest.raises(RecipeConfigError, match="vision_tower"):
        complete_lora_config(model, LoraConfig(target_modules="all-linear"), ["projector", "language_model"])
    config, adapted, full = complete_lora_config(model, LoraConfig(target_modules="all-linear"), list(TUNABLE_PARTS))
    assert adapted == ["language_model", "projector", "vision_tower"] and full == []
    assert config.modules_to_save is None
    with pytest.raises(RecipeConfigError, match="selects no linear layer"):
        scoped_target_modules(model, ["no_such_proj"], ["language_model"])


def test_load_in_4bit_without_cuda_is_refused_before_any_weight(tiny, mmpr, tmp_path, monkeypatch):
    from dpo import main as dpo_main

    def no_weights(*args, **kwargs):
        raise AssertionError("a weight was loaded")

    monkeypatch.setattr(PivotForConditionalGeneration, "from_pretrained", no_weights)
    for key in ("load_in_4bit", "load_in_8bit"):
        with pytest.raises(RecipeConfigError, match=f"`{key}: true`.*CUDA"):
            dpo_main(_argv(tiny, mmpr, tmp_path / key, **{key: "true"}))


def test_grpo_recipe_with_lora(tiny, mmpr, tmp_path):
    import importlib.util

    spec = importlib.util.spec_from_file_location("grpo_recipe", REPO / "recipes" / "grpo.py")
    recipe = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(recipe)
    out = tmp_path / "grpo"
    argv = ["--config", str(REPO / "recipes" / "grpo_tiny.yaml"), "--model_name_or_path", tiny]
    argv += ["--dataset_name", mmpr, "--output_dir", str(out), "--use_peft", "true", "--lora_r", "4"]
    trainer = recipe.main(argv)
    _assert_peft_run(trainer, tiny)
    assert json.loads((out / "adapter_config.json").read_text())["r"] == 4


def test_reference_description_says_which():
    assert "nothing outside the adapters" in describe_reference(["language_model"], [])
    assert "['vision_tower'] (trained in full) run as the frozen originals" in describe_reference(
        ["language_model"], ["vision_tower"]
    )


def test_full_parts_keep_their_dtype_after_a_qlora_style_cast(tiny):
    """TRL casts every trainable weight to bf16 under QLoRA; the parts trained in full get their dtype back."""
    from peft import get_peft_model

    model = PivotForConditionalGeneration.from_pretrained(tiny)
    dtypes = {n: p.dtype for n, p in model.named_parameters()}
    config, _, _ = complete_lora_config(
        model, LoraConfig(target_modules=["gate_proj"]), ["projector", "language_model"]
    )
    peft_model = get_peft_model(model, config)
    for param in peft_model.parameters():
        if param.requires_grad:
            param.data = param.data.to(torch.bfloat16)
    restored = restore_full_part_dtypes(peft_model, dtypes)
    assert restored and all("multi_modal_projector.modules_to_save" in n for n in restored)
    for name, param in peft_model.named_parameters():
        expected = torch.bfloat16 if ".lora_" in name else dtypes[base_parameter_name(name)]
        assert param.dtype == expected, name


def test_peft_without_a_base_checkpoint_is_refused():
    with pytest.raises(RecipeConfigError, match="`use_peft: true` needs `model_name_or_path`"):
        PivotModelConfig(vision_model_name_or_path="v", text_model_name_or_path="t", use_peft=True)
