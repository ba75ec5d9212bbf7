"""The contract between model, processor, optimizer setup and data, checked before compute.

- Model and processor composed from the same two folders agree on the image token (the real Qwen2.5 has
  `vocab_size` 151,936 > `len(tokenizer)` 151,665), and a checkpoint where they disagree is refused before any compute.
- A tunable part with learning rate 0 is refused at start; a failing end-of-run check saves the model first.
- DeepSpeed `optimizer` / `scheduler` blocks (which drop the per-part LRs) are refused.
- Variable-resolution towers (SigLIP2 NaFlex): the length filter measures each row's real image-token count.
"""

import json
from pathlib import Path

import pytest
import torch
from PIL import Image
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from pivot_hf import PivotForConditionalGeneration, PivotProcessor
from pivot_hf.configs import PivotDPOConfig, PivotModelConfig, PivotSFTConfig, RecipeConfigError
from pivot_hf.testing import QWEN_VOCAB_SIZE, build_tiny_llm, build_tiny_vision


QWEN_TOKENIZER_SIZE = 151665
CAT = Path(__file__).parent / "fixtures" / "special-tokens" / "cat.jpg"
RECIPES = Path(__file__).resolve().parents[1] / "recipes"


def _recipe_main(name):
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"_recipe_{name}", RECIPES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    root = tmp_path_factory.mktemp("parts")
    return {
        "vision": build_tiny_vision(root / "vision", "siglip"),
        "qwen2": build_tiny_llm(root / "qwen2", "qwen2"),
        "llama": build_tiny_llm(root / "llama", "llama"),
    }


def _chat_inputs(processor, text="What animal is this?"):
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]}]
    prompt = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return processor(text=[prompt], images=[Image.open(CAT).convert("RGB")], return_tensors="pt")


# ------------------------------------------------------------------------------------------ B: image token / vocab
def test_case_b_interface_spelling_agrees_on_real_qwen_vocab(parts, tmp_path):
    vision, text = parts["vision"], parts["qwen2"]
    assert json.loads(Path(text, "config.json").read_text())["vocab_size"] == QWEN_VOCAB_SIZE
    model = PivotForConditionalGeneration.from_vision_text_pretrained(vision, text)
    processor = PivotProcessor.from_vision_text_pretrained(vision, text)
    assert len(processor.tokenizer) == QWEN_TOKENIZER_SIZE + 1
    assert model.config.image_token_id == processor.image_token_id == QWEN_TOKENIZER_SIZE
    assert model.get_input_embeddings().weight.shape[0] == QWEN_VOCAB_SIZE  # no resize: the padded rows hold it
    inputs = _chat_inputs(processor)
    assert int((inputs["input_ids"] == model.config.image_token_id).sum()) == processor.num_image_tokens() == 16
    with torch.no_grad():
        logits = model(**inputs).logits
    assert logits.shape == (1, inputs["input_ids"].shape[1], QWEN_VOCAB_SIZE) and torch.isfinite(logits).all()

    # Three DPO steps on that composition (a frozen copy as the reference): they run and move the vision tower.
    from datasets import Dataset

    from pivot_hf.trainer import PivotDPOTrainer

    rows = [
        {
            "images": [str(CAT)],
            "prompt": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What animal?"}]}],
            "chosen": [{"role": "assistant", "content": [{"type": "text", "text": answer}]}],
            "rejected": [{"role": "assistant", "content": [{"type": "text", "text": "A dog."}]}],
        }
        for answer in ("A cat.", "A small cat.", "A cat on a mat.", "A kitten.")
    ]
    dataset = Dataset.from_list(rows).cast_column("images", _image_list_feature())
    import copy

    ref = copy.deepcopy(model)
    before = {n: p.detach().clone() for n, p in model.model.vision_tower.named_parameters()}
    args = PivotDPOConfig(
        output_dir=str(tmp_path / "dpo"),
        per_device_train_batch_size=2,
        max_steps=3,
        learning_rate=1e-3,
        use_cpu=True,
        report_to="none",
        save_strategy="no",
        logging_steps=1,
        disable_tqdm=True,
        dataloader_num_workers=0,
    )
    trainer = PivotDPOTrainer(model, ref, args=args, train_dataset=dataset, processing_class=processor)
    trainer.train()
    assert trainer.state.global_step == 3
    assert any(not torch.equal(before[n], p) for n, p in model.model.vision_tower.named_parameters())


def _image_list_feature():
    import datasets

    return datasets.List(datasets.Image())


def test_case_b_checkpoint_with_a_wrong_image_id_is_refused_before_data(parts, tmp_path):
    dpo_main = _recipe_main("dpo")
    model = PivotForConditionalGeneration.from_vision_text_pretrained(parts["vision"], parts["qwen2"])
    processor = PivotProcessor.from_vision_text_pretrained(parts["vision"], parts["qwen2"])
    ckpt = tmp_path / "ckpt"
    model.config.image_token_index = QWEN_VOCAB_SIZE - 1  # what an older composition wrote
    model.save_pretrained(ckpt)
    processor.save_pretrained(ckpt)
    out = tmp_path / "out"
    argv = [
        "--model_name_or_path",
        str(ckpt),
        "--dataset_name",
        str(Path(__file__).parent / "fixtures" / "mmpr-mini"),
        "--output_dir",
        str(out),
        "--use_cpu",
        "true",
        "--report_to",
        "none",
    ]
    with pytest.raises(RecipeConfigError, match=r"image_token_id is 151935.*maps it to 151665"):
        dpo_main(argv)
    assert not (out / "data_report.json").exists()  # refused before the data was loaded


def test_base_llm_quirks_one_rule(parts):
    """No chat template, no pad token, untied head, vocab_size == len(tokenizer): both calls still agree."""
    vision, text = parts["vision"], parts["llama"]
    model = PivotForConditionalGeneration.from_vision_text_pretrained(vision, text)
    processor = PivotProcessor.from_vision_text_pretrained(vision, text)
    assert model.config.image_token_id == processor.image_token_id
    assert model.get_input_embeddings().weight.shape[0] == len(processor.tokenizer) == QWEN_TOKENIZER_SIZE + 1
    assert model.get_output_embeddings().weight.shape[0] == len(processor.tokenizer)
    assert processor.tokenizer.pad_token is not None and processor.tokenizer.chat_template
    with torch.no_grad():
        assert torch.isfinite(model(**_chat_inputs(processor)).logits).all()


def _word_level_llm(path):
    """A base LLM whose tokenizer lacks the ChatML markers: the processor adds them, the model must have rows."""
    words = ["<unk>", "</s>", "What", "animal", "is", "this", "?", "user", "assistant", "system", "\n"]
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", eos_token="</s>")
    config = LlamaConfig(
        vocab_size=len(words),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        eos_token_id=1,
    )
    LlamaForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


def test_chat_template_tokens_added_for_a_base_llm_fit_the_embeddings(parts, tmp_path):
    text = _word_level_llm(tmp_path / "wordlevel")
    model = PivotForConditionalGeneration.from_vision_text_pretrained(parts["vision"], text)
    processor = PivotProcessor.from_vision_text_pretrained(parts["vision"], text)
    rows = model.get_input_embeddings().weight.shape[0]
    ids = [processor.tokenizer.convert_tokens_to_ids(t) for t in ("<image>", "<|im_start|>", "<|im_end|>")]
    assert ids == [11, 12, 13] and rows == 14 == len(processor.tokenizer)
    assert model.config.image_token_id == processor.image_token_id == 11
    inputs = _chat_inputs(processor)
    assert int(inputs["input_ids"].max()) == 13
    with torch.no_grad():
        assert model(**inputs).logits.shape[-1] == 14


def test_custom_image_token_and_conflicting_arguments(parts):
    vision, text = parts["vision"], parts["qwen2"]
    processor = PivotProcessor.from_vision_text_pretrained(vision, text, image_token="<img>")
    for tokenizer in (processor, processor.tokenizer):
        model = PivotForConditionalGeneration.from_vision_text_pretrained(vision, text, tokenizer=tokenizer)
        assert (
            model.config.image_token_id
            == processor.image_token_id
            == processor.tokenizer.convert_tokens_to_ids("<img>")
        )
    with torch.no_grad():
        assert torch.isfinite(model(**_chat_inputs(processor)).logits).all()
    with pytest.raises(ValueError, match=r"image_token_index=5 conflicts.*'<img>' is id 151665"):
        PivotForConditionalGeneration.from_vision_text_pretrained(
            vision, text, tokenizer=processor, image_token_index=5
        )
    with pytest.raises(ValueError, match=r"image_token='<image>' conflicts with the tokenizer's image token '<img>'"):
        PivotForConditionalGeneration.from_vision_text_pretrained(
            vision, text, tokenizer=processor, image_token="<image>"
        )
    # Without a tokenizer, an explicit id must match the text folder's tokenizer, which the model reads itself.
    with pytest.raises(ValueError, match=r"image_token_index=151936 conflicts.*151665"):
        PivotForConditionalGeneration.from_vision_text_pretrained(vision, text, image_token_index=QWEN_VOCAB_SIZE)


def test_preflight_refuses_a_processor_the_model_cannot_take(parts):
    from pivot_hf.trainer.preflight import check_model_processor

    model = PivotForConditionalGeneration.from_vision_text_pretrained(parts["vision"], parts["qwen2"])
    processor = PivotProcessor.from_vision_text_pretrained(parts["vision"], parts["qwen2"])
    check_model_processor(model.config, processor)  # agrees
    processor.image_processor.size = {"height": 48, "width": 48}
    with pytest.raises(RecipeConfigError, match=r"makes 36 image tokens.*built for 32px images \(16 tokens"):
        check_model_processor(model.config, processor)
    llama = PivotProcessor.from_vision_text_pretrained(parts["vision"], parts["llama"])
    small = PivotForConditionalGeneration.from_vision_text_pretrained(parts["vision"], parts["llama"]).config
    small.text_config.vocab_size = QWEN_TOKENIZER_SIZE  # the embeddings of the LLM before `<image>` was added
    with pytest.raises(RecipeConfigError, match=r"151666 tokens but the model has 151665 embedding rows"):
        check_model_processor(small, llama)


# ------------------------------------------------------------------------------------------ E: LR 0 / end checks
@pytest.mark.parametrize(
    "kwargs, part",
    [
        ({"vision_tower_lr": 0.0}, "vision_tower"),
        ({"projector_lr": 0.0}, "projector"),
        ({"learning_rate": 0.0, "tunable_parts": ["language_model"]}, "language_model"),
    ],
)
def test_tunable_part_with_lr_zero_is_refused_at_parse(tmp_path, kwargs, part):
    for config_class in (PivotSFTConfig, PivotDPOConfig):
        with pytest.raises(RecipeConfigError, match=rf"cannot train: '{part}' has learning rate 0.*Fix"):
            config_class(output_dir=str(tmp_path), **kwargs)
    # A frozen part may have LR 0.
    PivotSFTConfig(output_dir=str(tmp_path), tunable_parts=["projector"], vision_tower_lr=0.0)


def test_lr_zero_names_every_part_and_the_key_it_comes_from(tmp_path):
    # `learning_rate: 0` with no per-part keys: every tunable part falls back to it, so all are named, with that key.
    with pytest.raises(RecipeConfigError) as err:
        PivotDPOConfig(output_dir=str(tmp_path), learning_rate=0.0)
    message = str(err.value)
    for part in ("vision_tower", "projector", "language_model"):
        assert f"'{part}' has learning rate 0 (from `learning_rate`)" in message
    # A part with its own key set is named with that key.
    with pytest.raises(RecipeConfigError, match=r"'projector' has learning rate 0 \(from `projector_lr`\)"):
        PivotDPOConfig(output_dir=str(tmp_path), projector_lr=0.0)


def test_case_e_recipe_refuses_vision_tower_lr_zero_before_loading(tmp_path):
    sft_main = _recipe_main("sft")
    out = tmp_path / "out"
    argv = ["--model_name_or_path", "does-not-exist", "--dataset_name", "nowhere", "--output_dir", str(out)]
    with pytest.raises(RecipeConfigError, match="'vision_tower' has learning rate 0"):
        sft_main(argv + ["--vision_tower_lr", "0.0", "--use_cpu", "true"])
    assert not out.exists()


def test_failing_end_check_saves_a_loadable_model_first(tiny_pivot_factory, tmp_path):
    """LR 1e-47 passes the start check but rounds every fp32 update away: the end check fails, the model is saved."""
    sft_main = _recipe_main("sft")
    tiny = tiny_pivot_factory("siglip", "qwen2")
    start = PivotForConditionalGeneration.from_pretrained(tiny)
    out = tmp_path / "out"
    argv = [
        "--model_name_or_path",
        tiny,
        "--dataset_name",
        str(Path(__file__).parent / "fixtures" / "mmpr-mini"),
        "--output_dir",
        str(out),
        "--max_steps",
        "1",
        "--per_device_train_batch_size",
        "2",
        "--vision_tower_lr",
        "1e-47",
        "--learning_rate",
        "1e-3",
        "--save_strategy",
        "no",
        "--report_to",
        "none",
        "--use_cpu",
        "true",
        "--disable_tqdm",
        "true",
    ]
    with pytest.raises(RuntimeError, match="vision tower was meant to train"):
        sft_main(argv)
    saved = PivotForConditionalGeneration.from_pretrained(out)
    PivotProcessor.from_pretrained(out)
    name = "model.multi_modal_projector.linear_1.weight"
    assert not torch.equal(saved.get_parameter(name), start.get_parameter(name))  # the trained weights
    for n, p in saved.model.vision_tower.named_parameters():
        assert torch.equal(p, start.get_parameter(f"model.vision_tower.{n}"))


@pytest.mark.parametrize("block", ["optimizer", "scheduler"])
def test_deepspeed_blocks_that_drop_part_lrs_are_refused(tmp_path, block):
    from pivot_hf.trainer.tunable import check_distributed_config

    ds = tmp_path / "ds.json"
    ds.write_text(json.dumps({block: {"type": "WarmupLR", "params": {}}, "zero_optimization": {"stage": 2}}))
    args = type("Args", (), {"deepspeed": str(ds), "deepspeed_plugin": None})()
    with pytest.raises(RecipeConfigError, match=rf"defines a `{block}` block.*Fix: remove the `{block}` block"):
        check_distributed_config(args)


def test_run_preflight_on_a_composition(parts):
    from pivot_hf.trainer.preflight import run_preflight

    model_args = PivotModelConfig(vision_model_name_or_path=parts["vision"], text_model_name_or_path=parts["qwen2"])
    processor = PivotProcessor.from_vision_text_pretrained(parts["vision"], parts["qwen2"])
    assert run_preflight(model_args, None, processor) == {"vision_feature_layer": -2}


# ------------------------------------------------------------------------------------------ NaFlex lengths
def test_naflex_length_filter_measures_each_image(tiny_pivot_factory, tmp_path):
    from pivot_hf.data import load_pivot_dataset
    from pivot_hf.data.loader import image_token_measure

    processor = PivotProcessor.from_pretrained(tiny_pivot_factory("siglip2_naflex"))
    processor.image_processor.max_num_patches = 20  # not a square: a tall image gets more patches than a square one
    Image.new("RGB", (64, 64), (10, 200, 10)).save(tmp_path / "square.png")
    Image.new("RGB", (24, 120), (200, 10, 10)).save(tmp_path / "tall.png")
    real = {}
    for name in ("square", "tall"):
        pixels = processor.image_processor(images=[Image.open(tmp_path / f"{name}.png")], return_tensors="np")
        real[name] = processor._count_image_tokens(pixels, 0)
    # Without an image a variable-resolution tower answers its maximum: never less than a tall image needs.
    assert real == {"square": 16, "tall": 20} and processor.num_image_tokens() == 20
    measure = image_token_measure(processor)
    assert measure(str(tmp_path / "tall.png")) == 20 and measure(str(tmp_path / "square.png")) == 16

    rows = [
        {"id": name, "image": f"{name}.png", "conversations": [{"from": "human", "value": "<image>\nWhat?"}]}
        for name in ("square", "tall")
    ]
    for row in rows:
        row["conversations"].append({"from": "gpt", "value": "A coloured block."})
    (tmp_path / "data.json").write_text(json.dumps(rows))

    def real_length(row):
        messages = [dict(m) for m in row["messages"]]
        messages[0]["content"] = [{"type": "image"}, {"type": "text", "text": messages[0]["content"]}]
        text = processor.apply_chat_template(messages, tokenize=False)
        return processor(text=[text], images=[Image.open(row["images"][0])], return_tensors="pt")["input_ids"].shape[1]

    everything, _ = load_pivot_dataset(str(tmp_path / "data.json"), "sft", lazy_images=False)
    lengths = {row["id"]: real_length(row) for row in everything}
    assert lengths["tall"] == lengths["square"] + 4
    limit = lengths["square"] + 1  # tight: the square row fits, the tall one (4 more image tokens) does not
    dataset, report = load_pivot_dataset(
        str(tmp_path / "data.json"),
        "sft",
        tokenizer=processor,
        max_length=limit,
        num_image_tokens=measure,
        lazy_images=False,
    )
    assert [row["id"] for row in dataset] == ["square"]
    assert dict(report.skipped) == {"exceeds_max_length": 1} and report.examples["skipped:exceeds_max_length"] == [
        "tall"
    ]


# ------------------------------------------------------------------------------------------ model card
@pytest.mark.parametrize(
    "summary, needle, absent",
    [
        (
            {"method": "dpo", "loss_type": "sigmoid", "tunable_parts": ["vision_tower"]},
            "post-trained with **PIVOT**",
            None,
        ),
        (
            {"method": "sft", "tunable_parts": ["vision_tower", "projector"]},
            "supervised fine-tuning",
            "with **PIVOT**",
        ),
        ({"method": "sft", "tunable_parts": ["projector"]}, "did not train the encoder", "with **PIVOT**"),
        # The DPO trainer with only TRL's `sft` loss is the SFT control run through dpo.py: no preference objective.
        (
            {"method": "dpo", "loss_type": ["sft"], "tunable_parts": ["vision_tower"]},
            "supervised fine-tuning",
            "with **PIVOT**",
        ),
        (None, "How it was trained is unknown", "with **PIVOT**"),
    ],
)
def test_model_card_describes_the_real_run(tmp_path, summary, needle, absent):
    from transformers import SiglipVisionConfig

    from pivot_hf.export.model_card import FEATURE_LAYER_KEY, PREFIX_TOKENS_KEY, build_model_card, read_run_metadata

    config = SiglipVisionConfig()
    setattr(config, FEATURE_LAYER_KEY, -2)
    setattr(config, PREFIX_TOKENS_KEY, 0)
    if summary is not None:
        (tmp_path / "pivot_run.json").write_text(json.dumps({**summary, "global_step": 5}))
    card = build_model_card(config, repo_id="me/enc", run_metadata=read_run_metadata(str(tmp_path)))
    text = str(card)
    assert needle in text
    if absent:
        assert absent not in text and "dpo" not in card.data.tags
    if "PIVOT" in needle:
        assert "dpo" in card.data.tags and "Stage 2 sigmoid DPO" in text


def test_fsdp1_without_orig_params_is_refused(monkeypatch):
    from pivot_hf.trainer.tunable import check_distributed_config

    args = type("Args", (), {"deepspeed": None, "deepspeed_plugin": None, "fsdp": "full_shard", "fsdp_config": {}})()
    check_distributed_config(args)  # default use_orig_params: the groups survive
    args.fsdp_config = {"use_orig_params": False}
    with pytest.raises(RecipeConfigError, match="use_orig_params: false.*Fix: use FSDP2"):
        check_distributed_config(args)
    args.fsdp_config = {"use_orig_params": False, "version": 2}
    check_distributed_config(args)
