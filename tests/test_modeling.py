"""The Pivot MLLM for every vision family: features, generation, save/load, gradients, LLaVA interop, real shapes."""

import json
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import save_file
from transformers import (
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForImageTextToText,
    AutoProcessor,
    LlavaForConditionalGeneration,
)

import pivot_hf
from pivot_hf import PivotConfig, PivotForConditionalGeneration, PivotProcessor
from pivot_hf.modeling_pivot import find_encoder_layers, resolve_feature_layer
from pivot_hf.testing import VISION_FAMILIES, build_tiny_llm, build_tiny_vision, real_shape_pivot_config


def _inputs(processor, images, question="What is in the picture?"):
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return processor(images=images, text=[text] * len(images), return_tensors="pt", padding=True)


def _whole_tower(model):
    """The model's tower as its own transformers class builds it (no feature-layer cut), with the same weights."""
    tower = AutoModel.from_config(model.config.vision_config)
    tower.load_state_dict(model.model.vision_tower.state_dict())
    return tower.eval()


def _hidden_states_reference(model, pixel_values, **vision_inputs):
    """Independent computation: run the whole tower with output_hidden_states and index it like LLaVA does."""
    config = model.config
    out = _whole_tower(model)(pixel_values=pixel_values, output_hidden_states=True, **vision_inputs)
    return out.hidden_states[config.vision_feature_layer][:, config.vision_num_prefix_tokens :]


@pytest.mark.parametrize(
    "family", [pytest.param(f, marks=pytest.mark.compat) if f == "siglip" else f for f in VISION_FAMILIES]
)
def test_family_forward_generate_save_load_and_gradients(family, tiny_pivot_factory, sample_images, tmp_path):
    path = tiny_pivot_factory(family)
    model = PivotForConditionalGeneration.from_pretrained(path).eval()
    processor = PivotProcessor.from_pretrained(path)
    images = [sample_images[0], sample_images[1].resize((24, 64))]
    inputs = _inputs(processor, images)

    # The processor wrote exactly as many image tokens as the tower produces for each image.
    features = model.get_vision_features(
        inputs["pixel_values"], **{k: inputs[k] for k in ("pixel_attention_mask", "spatial_shapes") if k in inputs}
    )
    per_image = [f.shape[0] for f in features]
    assert (inputs["input_ids"] == processor.image_token_id).sum(dim=1).tolist() == per_image

    # Features equal the tower's own hidden state at the feature layer (the truncated run changes nothing).
    if family != "siglip2_naflex" and family != "vit_mae":
        torch.testing.assert_close(features, _hidden_states_reference(model, inputs["pixel_values"]))

    with torch.no_grad():
        logits = model(**inputs).logits
    assert torch.isfinite(logits).all()

    generated = model.generate(**inputs, max_new_tokens=4, do_sample=False)
    assert generated.shape[0] == 2 and generated.shape[1] > inputs["input_ids"].shape[1]

    # save -> load gives identical logits
    model.save_pretrained(tmp_path / "saved")
    reloaded = PivotForConditionalGeneration.from_pretrained(tmp_path / "saved").eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**inputs).logits, logits, rtol=0, atol=0)
    assert not list((tmp_path / "saved").glob("*.bin")), "checkpoints are safetensors only"

    # A backward pass puts gradient on every block that produces the feature layer, and on nothing above it.
    model.train()
    model(**inputs, labels=inputs["input_ids"]).loss.backward()
    _, _, layers = find_encoder_layers(model.model.vision_tower)
    used = resolve_feature_layer(model.config.vision_feature_layer, len(layers))
    for index, block in enumerate(layers):
        grads = [p.grad for p in block.parameters()]
        if index < used:
            assert all(g is not None and g.abs().sum() > 0 for g in grads), f"block {index} got no gradient"
        else:
            assert all(g is None for g in grads), f"block {index} is above the feature layer but got gradient"
    unreached = set(model.unreached_vision_parameter_names())
    no_grad = {
        n
        for n, p in model.named_parameters()
        if n.startswith("model.vision_tower.") and (p.grad is None or not p.grad.any())
    }
    # MAE's sin-cos position table is fixed by design: frozen although a gradient reaches it.
    fixed = {"model.vision_tower.embeddings.position_embeddings"} if family == "vit_mae" else set()
    assert unreached == no_grad | fixed


@pytest.mark.parametrize("family", ["siglip", "clip"])
def test_llava_conversion_identical_logits(family, tiny_pivot_factory, sample_images):
    path = tiny_pivot_factory(family)
    model = PivotForConditionalGeneration.from_pretrained(path).eval()
    inputs = _inputs(PivotProcessor.from_pretrained(path), sample_images[:2])
    with torch.no_grad():
        reference = model(**inputs).logits
        llava = model.to_llava().eval()
        assert isinstance(llava, LlavaForConditionalGeneration)
        torch.testing.assert_close(llava(**inputs).logits, reference, rtol=1e-5, atol=1e-5)
        back = PivotForConditionalGeneration.from_llava(llava).eval()
        torch.testing.assert_close(back(**inputs).logits, reference, rtol=1e-5, atol=1e-5)


def test_llava_conversion_refuses_what_llava_cannot_run(tiny_pivot_factory):
    model = PivotForConditionalGeneration.from_pretrained(tiny_pivot_factory("dinov2_registers"))
    with pytest.raises(ValueError, match="prefix tokens"):
        model.to_llava()


@pytest.mark.compat
def test_composition_from_local_folders_with_real_tokenizer(tmp_path, sample_images):
    vision = build_tiny_vision(tmp_path / "vision", "siglip_dual")  # a dual encoder, like the Hub's SigLIP2 repos
    text = build_tiny_llm(tmp_path / "llm", "qwen2")
    processor = PivotProcessor.from_vision_text_pretrained(vision, text)
    model = PivotForConditionalGeneration.from_vision_text_pretrained(vision, text, tokenizer=processor.tokenizer)

    tokenizer = processor.tokenizer
    assert len(tokenizer) == 151665 + 1 and tokenizer.convert_tokens_to_ids("<image>") == 151665
    assert model.config.image_token_id == 151665
    assert model.get_input_embeddings().weight.shape[0] >= len(tokenizer)
    assert model.config.vision_config.model_type == "siglip_vision_model"
    # The LLM's own chat template (ChatML) with the official system prompt, <image> first in the user turn.
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Hi"}]}]
    rendered = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert rendered == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\n<image>\nHi<|im_end|>\n<|im_start|>assistant\n"
    )
    inputs = processor(images=[sample_images[0]], text=[rendered], return_tensors="pt")
    num_tokens = int((inputs["input_ids"] == model.config.image_token_id).sum())
    assert (
        num_tokens == model.get_vision_features(inputs["pixel_values"]).shape[1] == processor.num_image_tokens() == 16
    )

    # A text whose image-token count does not match the features is a clear error, not a shape crash.
    bad = inputs["input_ids"].clone()
    bad[0, (bad[0] == model.config.image_token_id).nonzero()[0]] = tokenizer.pad_token_id
    with pytest.raises(ValueError, match="15 image tokens but the vision tower produced 16"):
        model(input_ids=bad, pixel_values=inputs["pixel_values"])


def test_composed_weights_are_the_pretrained_ones(tmp_path):
    vision = build_tiny_vision(tmp_path / "vision", "dinov2")
    text = build_tiny_llm(tmp_path / "llm", "llama")
    model = PivotForConditionalGeneration.from_vision_text_pretrained(vision, text)
    # Loaded independently (transformers may rename keys between the file and the module tree, so compare modules).
    reference_vision = AutoModel.from_pretrained(vision).state_dict()
    tower = model.model.vision_tower.state_dict()
    assert tower.keys() == reference_vision.keys()
    for name, tensor in reference_vision.items():
        torch.testing.assert_close(tower[name], tensor, rtol=0, atol=0)
    reference_llm = AutoModelForCausalLM.from_pretrained(text)
    vocab = reference_llm.lm_head.weight.shape[0]  # the composed model has one more row: the <image> token
    assert model.lm_head.weight.shape[0] == vocab + 1 and model.config.image_token_id == vocab
    torch.testing.assert_close(model.lm_head.weight[:vocab], reference_llm.lm_head.weight, rtol=0, atol=0)
    for name, tensor in reference_llm.model.state_dict().items():
        mine = model.model.language_model.state_dict()[name]
        torch.testing.assert_close(mine[:vocab] if name == "embed_tokens.weight" else mine, tensor, rtol=0, atol=0)


@pytest.mark.parametrize(("family", "dual_class"), [("siglip_dual", "SiglipModel"), ("clip_dual", "CLIPModel")])
def test_dual_encoder_checkpoints_give_their_vision_half(family, dual_class, tmp_path):
    import transformers

    vision = build_tiny_vision(tmp_path / "vision", family)
    text = build_tiny_llm(tmp_path / "llm")
    model = PivotForConditionalGeneration.from_vision_text_pretrained(vision, text)
    dual = getattr(transformers, dual_class).from_pretrained(vision)
    tower = model.model.vision_tower
    # transformers 5 flattened SigLIP's vision model but not CLIP's: compare the transformer bodies themselves.
    tower = getattr(tower, "vision_model", tower).state_dict()
    reference = dual.vision_model
    reference = getattr(reference, "vision_model", reference).state_dict()
    assert tower.keys() == reference.keys()
    for name, tensor in reference.items():
        torch.testing.assert_close(tower[name], tensor, rtol=0, atol=0)


def test_base_llm_without_chat_template_gets_chatml(tmp_path, sample_images):
    vision = build_tiny_vision(tmp_path / "vision", "siglip")
    text = build_tiny_llm(tmp_path / "llm", "llama")
    config_file = tmp_path / "llm" / "tokenizer_config.json"
    tokenizer_config = json.loads(config_file.read_text())
    tokenizer_config.pop("chat_template", None)
    config_file.write_text(json.dumps(tokenizer_config))
    for extra in ("chat_template.jinja", "chat_template.json"):
        (tmp_path / "llm" / extra).unlink(missing_ok=True)
    processor = PivotProcessor.from_vision_text_pretrained(vision, text)
    messages = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Hi"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "Hello."}]},
    ]
    assert processor.apply_chat_template(messages, tokenize=False) == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n<image>\nHi<|im_end|>\n"
        "<|im_start|>assistant\nHello.<|im_end|>\n"
    )


@pytest.mark.compat
def test_auto_classes_and_remote_code_without_pivot_hf(tiny_pivot_factory, sample_images, tmp_path):
    path = tiny_pivot_factory("siglip")
    assert isinstance(AutoModelForImageTextToText.from_pretrained(path), PivotForConditionalGeneration)
    assert isinstance(AutoProcessor.from_pretrained(path), PivotProcessor)
    with open(f"{path}/config.json") as f:
        config = json.load(f)
    assert config["auto_map"]["AutoModelForImageTextToText"] == "modeling_pivot.PivotForConditionalGeneration"

    model = PivotForConditionalGeneration.from_pretrained(path).eval()
    inputs = _inputs(PivotProcessor.from_pretrained(path), sample_images[:1])
    with torch.no_grad():
        expected = model(**inputs).logits
    save_file(
        {k: v.contiguous() for k, v in inputs.items()} | {"expected": expected}, str(tmp_path / "io.safetensors")
    )

    # A fresh interpreter in which `import pivot_hf` is impossible loads the checkpoint through `auto_map`.
    script = textwrap.dedent(
        f"""
        import sys
        sys.modules["pivot_hf"] = None  # any import of pivot_hf now raises ImportError
        import torch
        from safetensors.torch import load_file
        from transformers import AutoModelForImageTextToText, AutoProcessor
        model = AutoModelForImageTextToText.from_pretrained({path!r}, trust_remote_code=True).eval()
        processor = AutoProcessor.from_pretrained({path!r}, trust_remote_code=True)
        assert type(processor).__name__ == "PivotProcessor" and "pivot_hf" not in type(model).__module__
        io = load_file({str(tmp_path / "io.safetensors")!r})
        expected = io.pop("expected")
        with torch.no_grad():
            logits = model(**io).logits
        torch.testing.assert_close(logits, expected, rtol=0, atol=0)
        print("REMOTE_OK")
        """
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert "REMOTE_OK" in result.stdout, result.stderr[-3000:]


@pytest.mark.parametrize(
    ("vision", "tokens"), [("siglip2-so400m-patch16-384", 576), ("siglip-so400m-patch14-384", 729)]
)
def test_real_shape_on_meta_device(vision, tokens):
    config = real_shape_pivot_config(vision, "Qwen2.5-1.5B-Instruct")
    assert config.image_seq_length == tokens
    with torch.device("meta"):
        model = PivotForConditionalGeneration(config)
    total = sum(p.numel() for p in model.parameters())
    unreached = set(model.unreached_vision_parameter_names())
    used = sum(p.numel() for n, p in model.named_parameters() if n not in unreached)
    head = sum(p.numel() for n, p in model.named_parameters() if n.startswith("model.vision_tower.head."))
    assert model.lm_head.weight is model.model.language_model.embed_tokens.weight  # Qwen2.5-1.5B ties them
    # 1.98 B as the checkpoints come (head kept); 1.95 B reach the loss (the authors delete head and last block).
    assert abs(total / 1e9 - 1.98) < 0.01, total
    assert abs(used / 1e9 - 1.95) < 0.01, used
    assert head > 0 and all(n in unreached for n, _ in model.named_parameters() if ".head." in n)
    projector = model.model.multi_modal_projector
    assert (projector.linear_1.in_features, projector.linear_1.out_features) == (1152, 1536)
    assert (projector.linear_2.in_features, projector.linear_2.out_features) == (1536, 1536)


def test_processor_counts_tokens_from_the_processed_size(tmp_path, sample_images):
    """The count follows the image processor's output, not the config's image_size (DINOv2 crops to 224, say)."""
    vision = build_tiny_vision(tmp_path / "vision", "dinov2")
    text = build_tiny_llm(tmp_path / "llm")
    processor = PivotProcessor.from_vision_text_pretrained(vision, text)
    processor.image_processor.crop_size = {"height": 48, "width": 48}
    processor.image_processor.size = {"shortest_edge": 48}
    model = PivotForConditionalGeneration.from_vision_text_pretrained(vision, text, tokenizer=processor.tokenizer)
    inputs = _inputs(processor, sample_images[:1])
    assert (inputs["input_ids"] == processor.image_token_id).sum() == 36 == processor.num_image_tokens()
    assert model.get_vision_features(inputs["pixel_values"]).shape[1] == 36


def test_unreachable_feature_layer_is_a_clear_error():
    with pytest.raises(ValueError, match="vision_feature_layer=-9 cannot be reached by a vision tower with 3 layers"):
        PivotConfig(
            vision_config={"model_type": "siglip_vision_model", "num_hidden_layers": 3},
            text_config={"model_type": "qwen2"},
            vision_feature_layer=-9,
        )


def test_feature_layer_zero_reads_the_embeddings(tiny_pivot_factory, sample_images):
    model = PivotForConditionalGeneration.from_pretrained(tiny_pivot_factory("siglip")).eval()
    pixel_values = _inputs(PivotProcessor.from_pretrained(tiny_pivot_factory("siglip")), sample_images[:1])[
        "pixel_values"
    ]
    with torch.no_grad():
        expected = _whole_tower(model)(pixel_values=pixel_values, output_hidden_states=True).hidden_states[0]
        for layer in (0, -(model.config.vision_config.num_hidden_layers + 1)):
            torch.testing.assert_close(model.get_vision_features(pixel_values, vision_feature_layer=layer), expected)


def test_multi_layer_features_concatenate(tiny_pivot_factory, sample_images):
    model = PivotForConditionalGeneration.from_pretrained(tiny_pivot_factory("clip")).eval()
    pixel_values = _inputs(PivotProcessor.from_pretrained(tiny_pivot_factory("clip")), sample_images[:1])[
        "pixel_values"
    ]
    both = model.get_vision_features(pixel_values, vision_feature_layer=[-3, -2])
    first = model.get_vision_features(pixel_values, vision_feature_layer=-3)
    second = model.get_vision_features(pixel_values, vision_feature_layer=-2)
    torch.testing.assert_close(both, torch.cat([first, second], dim=-1))


def test_package_registers_auto_classes():
    from transformers import AutoConfig

    assert AutoConfig.for_model("pivot").__class__ is PivotConfig
    assert pivot_hf.__version__


@pytest.mark.parametrize(
    ("model_type", "prefix"),
    [("deit", 2), ("dinov3_vit", 5), ("ijepa", 0), ("aimv2_vision_model", 0), ("beit", 1)],
)
def test_other_vit_families_compose_train_and_generate(model_type, prefix):
    """Families outside the table: prefix tokens are probed, final norms / heads found, and gradients reach the rest."""
    from transformers import AutoConfig

    small = {"hidden_size": 32, "num_hidden_layers": 3, "num_attention_heads": 2, "intermediate_size": 64}
    extra = {"num_register_tokens": 4} if model_type == "dinov3_vit" else {}
    tower = AutoModel.from_config(AutoConfig.for_model(model_type, image_size=32, patch_size=8, **small, **extra))
    llm = AutoModelForCausalLM.from_config(
        AutoConfig.for_model(
            "llama", hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, vocab_size=300
        )
    )
    model = PivotForConditionalGeneration.from_vision_text_models(tower, llm)
    assert model.config.vision_num_prefix_tokens == prefix
    pixel_values = torch.randn(2, 3, 32, 32)
    assert model.get_vision_features(pixel_values).shape[1] == 16  # a 4x4 patch grid, prefix tokens dropped
    input_ids = torch.tensor([[1, 2] + [model.config.image_token_id] * 16 + [3, 4]] * 2)
    model(input_ids=input_ids, pixel_values=pixel_values, labels=input_ids).loss.backward()
    unreached = set(model.unreached_vision_parameter_names())
    for name, param in model.named_parameters():
        if name.startswith("model.vision_tower.") and ".layer" in name and name not in unreached:
            assert param.grad is not None and param.grad.any(), name
    assert all(model.get_parameter(n).grad is None for n in unreached)
    assert model.generate(input_ids=input_ids[:1], pixel_values=pixel_values[:1], max_new_tokens=2).shape[1] == 22
