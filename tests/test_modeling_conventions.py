"""The Pivot model behaves like a transformers model where LLaVA does, for a SigLIP, a DINOv2 and a SigLIP2-NaFlex
tower: tuple outputs, per-image image outputs, torch.export, partial-checkpoint init, deprecated argument names, the
processor's save/load round trip and token counts, the image-text-to-text pipeline, and checkpoints written by an
earlier pivot_hf.

The models are the tiny checkpoints of tests/fixtures/pivot-checkpoints (saved by pivot_hf before the feature-layer
cut moved to construction, with the logits that code gave): loading them is fast and checks that old checkpoints keep
their logits.
"""

import json
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModel, AutoModelForImageTextToText, pipeline
from transformers.modeling_outputs import ModelOutput

import pivot_hf  # noqa: F401  (registers the Auto classes)
from pivot_hf import PivotForConditionalGeneration, PivotProcessor
from pivot_hf.modeling_pivot import FeatureLayerBlocks, find_encoder_layers
from pivot_hf.testing import build_tiny_llm, build_tiny_vision, small_qwen_tokenizer


FIXTURES = Path(__file__).parent / "fixtures" / "pivot-checkpoints"
FAMILIES = ["siglip", "dinov2", "siglip2_naflex"]
VISION_KEYS = ("pixel_attention_mask", "spatial_shapes")


def _load(family, model_class=PivotForConditionalGeneration, **kwargs):
    """The checkpoint, its inputs, and the logits the loaded model gives on this machine (what the other views of the
    same model must reproduce exactly). The logits stored with the checkpoint were computed on another CPU, whose SIMD
    width changes float32 summation order: `test_checkpoint_of_the_previous_code_gives_its_logits` compares them."""
    model = model_class.from_pretrained(FIXTURES / family, **kwargs).eval()
    inputs = load_file(str(FIXTURES / family / "io.safetensors"))
    inputs.pop("expected_logits")
    with torch.no_grad():
        expected = model(**inputs).logits
    return model, inputs, expected


def _stored_logits(family):
    return load_file(str(FIXTURES / family / "io.safetensors"))["expected_logits"]


def _vision(inputs):
    return {k: inputs[k] for k in VISION_KEYS if k in inputs}


def _assert_same(a, b, path="output"):
    """Equal nested outputs: a ModelOutput compares as its `to_tuple()`, lists and tuples item by item."""
    a = a.to_tuple() if isinstance(a, ModelOutput) else a
    b = b.to_tuple() if isinstance(b, ModelOutput) else b
    if isinstance(a, (tuple, list)):
        assert isinstance(b, (tuple, list)) and len(a) == len(b), f"{path}: {type(a)} vs {type(b)}"
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_same(x, y, f"{path}[{i}]")
    elif isinstance(a, torch.Tensor):
        assert torch.equal(a, b), path
    else:
        assert a == b, path


def _whole_tower(model):
    """The model's tower as its own class builds it (not cut at the feature layer), same weights."""
    tower = AutoModel.from_config(model.config.vision_config)
    tower.load_state_dict(model.model.vision_tower.state_dict())
    return tower.eval()


@pytest.mark.parametrize("family", FAMILIES)
def test_checkpoint_of_the_previous_code_gives_its_logits(family, tmp_path):
    model, _, logits = _load(family)
    # float32 tolerance (torch.testing's defaults): another CPU reorders sums by ~1e-7; a wrong feature layer, a
    # missing weight or a changed projector moves logits by ~1e-1.
    torch.testing.assert_close(logits, _stored_logits(family))
    # The cut left every weight of the checkpoint in the model, under its name: saving writes the same tensors.
    model.save_pretrained(tmp_path)
    old = load_file(str(FIXTURES / family / "model.safetensors"))
    new = load_file(str(tmp_path / "model.safetensors"))
    assert set(old) == set(new) and all(torch.equal(old[k], new[k]) for k in old)


@pytest.mark.parametrize("family", FAMILIES)
def test_tuple_and_dict_outputs_agree_also_after_auto_class_reload(family, tmp_path):
    model, inputs, _ = _load(family, AutoModelForImageTextToText)
    model.save_pretrained(tmp_path / "saved")
    reloaded = AutoModelForImageTextToText.from_pretrained(tmp_path / "saved").eval()
    assert type(reloaded) is PivotForConditionalGeneration
    for candidate in (model, reloaded):
        for flags in ({"use_cache": False}, {"use_cache": False, "output_hidden_states": True}):
            with torch.no_grad():
                as_dict = candidate(**inputs, **flags)
                as_tuple = candidate(**inputs, **flags, return_dict=False)
                base_dict = candidate.model(**inputs, **flags)
                base_tuple = candidate.model(**inputs, **flags, return_dict=False)
            assert isinstance(as_tuple, tuple) and isinstance(base_tuple, tuple)
            _assert_same(as_tuple, as_dict)
            _assert_same(base_tuple, base_dict)
        candidate.config.return_dict = False  # the config's switch, as transformers reads it
        with torch.no_grad():
            _assert_same(candidate(**inputs, **flags), as_dict)
        candidate.config.return_dict = True
    # The base model loads through AutoModel too.
    base = AutoModel.from_pretrained(tmp_path / "saved").eval()
    with torch.no_grad():
        _assert_same(base(**inputs, use_cache=False, return_dict=False), reloaded.model(**inputs, use_cache=False))


@pytest.mark.parametrize("family", FAMILIES)
def test_image_outputs_are_per_image_and_carry_the_towers_outputs(family):
    model, inputs, _ = _load(family, attn_implementation="eager")  # sdpa returns no attention weights
    pixel_values, vision = inputs["pixel_values"], _vision(inputs)
    tokens_per_image = (inputs["input_ids"] == model.config.image_token_id).sum(dim=1).tolist()
    with torch.no_grad():
        features = model.get_image_features(pixel_values, **vision, output_hidden_states=True, output_attentions=True)
        as_tuple = model.get_image_features(pixel_values, **vision, return_dict=False)
        plain = model.get_image_features(pixel_values, **vision)
        out = model(**inputs)
        whole = _whole_tower(model)(pixel_values=pixel_values, output_hidden_states=True, **vision)

    # One projected (tokens_i, text_hidden) tensor per image, in forward's image_outputs as well.
    pooled = features.pooler_output
    assert isinstance(pooled, list) and [p.shape for p in pooled] == [
        (n, model.config.text_config.hidden_size) for n in tokens_per_image
    ]
    assert isinstance(out.image_outputs.pooler_output, list)
    _assert_same(out.image_outputs.pooler_output, pooled)
    # last_hidden_state is the tower's output at the feature layer, one tensor (padding and prefix tokens included).
    cut = find_encoder_layers(model.model.vision_tower)[2].num_used
    assert isinstance(features.last_hidden_state, torch.Tensor)
    torch.testing.assert_close(features.last_hidden_state, whole.hidden_states[cut], rtol=0, atol=0)
    # Asked-for hidden states / attentions are the tower's, up to the block it stops at; not returned unasked.
    assert len(features.hidden_states) == cut + 1 and len(features.attentions) == cut
    for ours, reference in zip(features.hidden_states, whole.hidden_states):
        torch.testing.assert_close(ours, reference, rtol=0, atol=0)
    assert plain.hidden_states is None and plain.attentions is None and out.image_outputs.hidden_states is None
    assert isinstance(as_tuple, tuple)
    _assert_same(as_tuple, plain)


@pytest.mark.parametrize("family", FAMILIES)
def test_torch_export_gives_the_eager_outputs(family):
    from transformers.exporters.configs import DynamoConfig
    from transformers.exporters.exporter_dynamo import DynamoExporter

    model, inputs, expected = _load(family)
    exported = DynamoExporter().export(model, dict(inputs), config=DynamoConfig())
    with torch.no_grad():
        torch.testing.assert_close(exported(**inputs).logits, expected, rtol=0, atol=0)
    # A plain torch.export of the model (what the exporter wraps) runs the same program.
    program = torch.export.export(model, args=(), kwargs=dict(inputs), strict=False)
    torch.testing.assert_close(program.module()(**inputs).logits, expected, rtol=0, atol=0)


def test_torch_export_with_dynamic_shapes_serves_another_text_length():
    """`DynamoConfig(dynamic=True)`, as for LLaVA: the exported program runs a prompt of another length exactly."""
    from transformers.exporters.configs import DynamoConfig
    from transformers.exporters.exporter_dynamo import DynamoExporter

    model, inputs, _ = _load("siglip")
    exported = DynamoExporter().export(model, dict(inputs), config=DynamoConfig(dynamic=True))
    shorter = {**inputs, "input_ids": inputs["input_ids"][:, 2:], "attention_mask": inputs["attention_mask"][:, 2:]}
    with torch.no_grad():
        torch.testing.assert_close(exported(**shorter).logits, model(**shorter).logits, rtol=0, atol=0)


@pytest.mark.parametrize("family", FAMILIES)
def test_partial_checkpoint_inits_missing_tower_weights_as_the_towers_own_class(family, tmp_path):
    """Missing tower weights get the tower class's own init: equal to what the tower class itself loads from the same
    partial checkpoint with the same seed (SigLIP's per-block init included)."""
    model, _, _ = _load(family)

    def dropped(name):
        return ".0." in name or "embeddings" in name or "head" in name or "post_layernorm" in name

    model.save_pretrained(tmp_path / "pivot")
    weights = load_file(str(tmp_path / "pivot" / "model.safetensors"))
    prefix = "model.vision_tower."
    kept = {k: v for k, v in weights.items() if not (k.startswith(prefix) and dropped(k[len(prefix) :]))}
    assert len(kept) < len(weights)
    save_file(kept, str(tmp_path / "pivot" / "model.safetensors"), metadata={"format": "pt"})
    tower = _whole_tower(model)
    tower.save_pretrained(tmp_path / "tower")
    tower_weights = load_file(str(tmp_path / "tower" / "model.safetensors"))
    tower_kept = {k: v for k, v in tower_weights.items() if not dropped(k)}
    save_file(tower_kept, str(tmp_path / "tower" / "model.safetensors"), metadata={"format": "pt"})

    torch.manual_seed(0)
    partial = PivotForConditionalGeneration.from_pretrained(tmp_path / "pivot")
    torch.manual_seed(0)
    reference = type(tower).from_pretrained(tmp_path / "tower")
    ours = partial.model.vision_tower.state_dict()
    missing = [k for k in reference.state_dict() if dropped(k)]
    assert missing
    for name in missing:
        assert torch.equal(ours[name], reference.state_dict()[name]), name
    source = model.state_dict()
    for name, tensor in partial.state_dict().items():
        if not (name.startswith(prefix) and dropped(name[len(prefix) :])):
            assert torch.equal(tensor, source[name]), name


def test_old_cache_argument_name_warns_and_our_calls_do_not(recwarn):
    model, inputs, _ = _load("siglip")
    with torch.no_grad():
        first = model(**inputs, use_cache=True)
        cache = first.cache if hasattr(first, "cache") else first.past_key_values
        step = {"input_ids": inputs["input_ids"][:, -1:], "attention_mask": torch.ones_like(inputs["input_ids"])}
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            old = model(**step, past_key_values=cache, use_cache=True)
    if hasattr(first, "cache"):  # transformers >= 5.24 renamed it; the old name is deprecated as in LLaVA
        assert any(issubclass(w.category, FutureWarning) and "past_key_values" in str(w.message) for w in caught)
        # The warning points at the caller, not at pivot_hf.
        assert all("pivot_hf" not in w.filename for w in caught if "past_key_values" in str(w.message))
    assert old.logits.shape == (2, 1, model.config.text_config.vocab_size)
    # generate() (with a KV cache) and a plain forward raise no deprecation warning of their own.
    recwarn.clear()
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        warnings.simplefilter("error", DeprecationWarning)
        model.generate(**inputs, max_new_tokens=3, do_sample=False)


# --------------------------------------------------------------------------------------------------------- processor
@pytest.fixture(scope="module")
def tiny_checkpoints(tmp_path_factory):
    """A tiny Pivot checkpoint with a processor per family, over a cut-down Qwen tokenizer (fast to build)."""
    root = tmp_path_factory.mktemp("conventions")
    tokenizer = small_qwen_tokenizer(root / "tokenizer", ["What is in the picture? A photo of a cat."])
    text = build_tiny_llm(root / "llm", tokenizer_path=tokenizer)
    paths = {}
    for family in FAMILIES:
        vision = build_tiny_vision(root / f"vision-{family}", family)
        processor = PivotProcessor.from_vision_text_pretrained(vision, text)
        model = PivotForConditionalGeneration.from_vision_text_pretrained(vision, text, tokenizer=processor)
        paths[family] = root / family
        model.save_pretrained(paths[family])
        processor.save_pretrained(paths[family])
    return paths


@pytest.mark.parametrize("family", FAMILIES)
def test_processor_round_trip_and_multimodal_token_counts(family, tiny_checkpoints, sample_images, tmp_path):
    processor = PivotProcessor.from_pretrained(tiny_checkpoints[family])
    before = processor.to_dict()
    processor.save_pretrained(tmp_path / "once")
    assert processor.to_dict() == before, "save_pretrained changed the processor in memory"
    reloaded = PivotProcessor.from_pretrained(tmp_path / "once")
    assert reloaded.to_dict() == before
    reloaded.save_pretrained(tmp_path / "twice")
    once = json.loads((tmp_path / "once" / "processor_config.json").read_text())
    assert once == json.loads((tmp_path / "twice" / "processor_config.json").read_text())
    # auto_map names the processor once, at the top (what AutoProcessor with remote code reads).
    assert once["auto_map"] == {"AutoProcessor": "processing_pivot.PivotProcessor"}
    assert "auto_map" not in once["image_processor"]

    # What vLLM asks: the count the processor writes into the text, per (height, width).
    images = [sample_images[0], sample_images[1].resize((24, 64))]
    counts = processor._get_num_multimodal_tokens(image_sizes=[(im.height, im.width) for im in images])
    for image, count in zip(images, counts.num_image_tokens):
        encoded = processor(images=[image], text=[f"{processor.image_token}\nWhat?"], return_tensors="pt")
        assert int((encoded["input_ids"] == processor.image_token_id).sum()) == count
    assert counts.num_image_patches == [1, 1]
    with pytest.raises(ValueError, match="not_an_option"):  # options it has are applied (test below)
        processor._get_num_multimodal_tokens(image_sizes=[(32, 32)], not_an_option=4)


@pytest.mark.parametrize("family", FAMILIES)
def test_image_text_to_text_pipeline_as_the_llava_docs_show(family, tiny_checkpoints, sample_images):
    pipe = pipeline("image-text-to-text", model=str(tiny_checkpoints[family]))
    assert isinstance(pipe.model, PivotForConditionalGeneration)
    messages = [
        {
            "role": "user",
            "content": [
                {"type": "image", "image": sample_images[0]},
                {"type": "text", "text": "What is in the picture?"},
            ],
        }
    ]
    out = pipe(text=messages, max_new_tokens=3, generate_kwargs={"do_sample": False})
    assert out[0]["generated_text"][-1]["role"] == "assistant"
    # The pipeline's answer is the model's greedy continuation of the processor's inputs.
    processor = pipe.processor
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    inputs = processor(images=[sample_images[0]], text=[prompt], return_tensors="pt")
    generated = pipe.model.generate(**inputs, max_new_tokens=3, do_sample=False)
    answer = processor.decode(generated[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    assert out[0]["generated_text"][-1]["content"] == answer


def test_tower_is_cut_once_at_construction_and_wrappers_on_it_run():
    """The tower's own forward stops at the feature layer (no per-call copies), so a wrapper put on the tower's forward
    (an exporter's, PEFT's) is what the model runs."""
    model, inputs, expected = _load("siglip")
    tower = model.model.vision_tower
    _, _, blocks = find_encoder_layers(tower)
    assert isinstance(blocks, FeatureLayerBlocks) and blocks.num_used == len(blocks) - 1
    calls = []
    original = tower.forward

    def wrapped(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    tower.forward = wrapped
    try:
        with torch.no_grad():
            assert torch.equal(model(**inputs).logits, expected)
    finally:
        del tower.forward
    assert calls == [1]


@pytest.mark.parametrize("family", FAMILIES)
def test_a_whole_model_pickles_and_deep_copies_with_its_cut_tower(family, tmp_path):
    import copy
    import io

    model, inputs, expected = _load(family)
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    for clone in (torch.load(buffer, weights_only=False), copy.deepcopy(model)):
        with torch.no_grad():
            assert torch.equal(clone(**inputs).logits, expected)
        assert clone.model.feature_cut == model.model.feature_cut


def test_the_first_save_of_a_composed_model_maps_automodel(tiny_checkpoints):
    config = json.loads((tiny_checkpoints["siglip"] / "config.json").read_text())
    assert config["auto_map"]["AutoModel"] == "modeling_pivot.PivotModel"
    assert config["auto_map"]["AutoModelForImageTextToText"] == "modeling_pivot.PivotForConditionalGeneration"


@pytest.mark.parametrize("layer", [0, 1, -1])
def test_to_llava_gives_the_logits_at_every_feature_layer(layer):
    model, inputs, _ = _load("siglip", vision_feature_layer=layer)
    with torch.no_grad():
        assert torch.equal(model.to_llava().eval()(**inputs).logits, model(**inputs).logits)


def test_multimodal_token_counts_take_processing_options_as_the_call_does(tiny_pivot_factory):
    """What vLLM passes as `mm_processor_kwargs` (e.g. `max_num_patches` for NaFlex) changes the count exactly as it
    changes the processor call; an option the image processor lacks is refused by name."""
    from PIL import Image
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(tiny_pivot_factory("siglip2_naflex"))
    image = Image.new("RGB", (300, 100))
    for options in ({}, {"max_num_patches": 64}):
        written = processor(images=[image], text=["<image>hi"], return_tensors="pt", **options)["input_ids"]
        counted = processor._get_num_multimodal_tokens(image_sizes=[(100, 300)], **options).num_image_tokens
        assert counted == [int((written == processor.image_token_id).sum())]
    assert processor.image_processor.max_num_patches != 64  # the processor itself is left as it was
    with pytest.raises(ValueError, match="bogus"):
        processor._get_num_multimodal_tokens(image_sizes=[(100, 300)], bogus=1)
