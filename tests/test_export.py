"""Encoder export: drop-in and truncated exports per family, fresh-process loading without pivot_hf, model
card, Hub upload through a recording fake HfApi, atomic writes, projector reuse and a Stage-3 run from the export."""

import importlib.util
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from huggingface_hub import ModelCard, ModelCardData
from safetensors.torch import save_file
from transformers import AutoImageProcessor, AutoModel

import pivot_hf.export.encoder as export_mod
from pivot_hf import PivotForConditionalGeneration, PivotProcessor
from pivot_hf.export import (
    apply_projector_reuse,
    check_model_card,
    export_encoder,
    feature_layer_of,
    load_projector,
    recorded_base_model,
)


REPO = Path(__file__).resolve().parents[1]
# "siglip_dual" is a SigLIP dual encoder whose vision half is taken: the layout of google/siglip2-*-patch16-384 (fixed
# resolution SigLIP2 loads as `siglip`); "siglip2_naflex" is Siglip2VisionModel with variable patch grids.
FAMILIES = ["siglip", "siglip_dual", "siglip2_naflex", "clip", "dinov2"]
SECRET = "hf_pivotTESTtoken0123456789abcdefXYZ"


def _load_recipe(name):
    spec = importlib.util.spec_from_file_location(f"recipe_{name}", REPO / "recipes" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _write_run_files(folder: Path):
    """What a training run leaves beside its checkpoint, including a credential that must never be published."""
    (folder / "training_args.json").write_text(
        json.dumps({"learning_rate": 1e-6, "beta": 0.1, "num_train_epochs": 3, "hub_token": SECRET, "seed": 42})
    )
    (folder / "pivot_run.json").write_text(
        json.dumps({"dataset_name": "OpenGVLab/MMPR-v1.2", "tunable_parts": ["vision_tower", "projector"]})
    )
    state = {"global_step": 7, "epoch": 3.0, "log_history": [{"loss": 0.69, "step": 1}, {"loss": 0.5, "step": 7}]}
    (folder / "trainer_state.json").write_text(json.dumps(state))
    results = folder / "eval" / "linear_probe"
    results.mkdir(parents=True)
    doc = {"task": "linear_probe", "primary_metric": "top1", "runs": [{"label": "pivot", "metrics": {"top1": 0.8125}}]}
    (results / "results.json").write_text(json.dumps(doc))


@pytest.fixture(scope="module")
def trained(tiny_pivot_factory, tmp_path_factory):
    """family -> a Pivot checkpoint whose tower and projector moved away from the originals (as after PIVOT)."""
    root = tmp_path_factory.mktemp("trained")
    cache = {}

    def make(family):
        if family not in cache:
            source = tiny_pivot_factory(family)
            model = PivotForConditionalGeneration.from_pretrained(source)
            generator = torch.Generator().manual_seed(1)
            with torch.no_grad():
                for module in (model.model.vision_tower, model.model.multi_modal_projector):
                    for param in module.parameters():
                        param.add_(0.05 * torch.randn(param.shape, generator=generator))
            target = root / family
            model.save_pretrained(target)
            PivotProcessor.from_pretrained(source).save_pretrained(target)
            _write_run_files(target)
            cache[family] = str(target)
        return cache[family]

    return make


def _features_plain(model, inputs, layer, prefix):
    """The trained features with nothing but transformers: hidden_states[layer], prefix tokens dropped."""
    kwargs = {k: inputs[k] for k in ("pixel_attention_mask", "spatial_shapes") if k in inputs}
    out = model(pixel_values=inputs["pixel_values"], output_hidden_states=True, **kwargs)
    feats = out.hidden_states[layer][:, prefix:]
    if "pixel_attention_mask" in inputs:
        return [f[m.bool()] for f, m in zip(feats, inputs["pixel_attention_mask"])]
    return list(feats)


@pytest.fixture(scope="module")
def exports(trained, sample_images, tmp_path_factory):
    """Drop-in and truncated exports of every family, with what the MLLM computes on them (for the fresh process)."""
    root = tmp_path_factory.mktemp("exports")
    entries = []
    for family in FAMILIES:
        checkpoint = trained(family)
        model = PivotForConditionalGeneration.from_pretrained(checkpoint).eval()
        for truncate in (False, True):
            name = f"{family}-{'trunc' if truncate else 'full'}"
            folder = export_encoder(
                checkpoint,
                root / name,
                truncate_to_feature_layer=truncate,
                export_projector=(family == "siglip"),
                projector_layers=2,
                base_model="google/siglip2-so400m-patch16-384" if family == "siglip" else None,
                datasets=["OpenGVLab/MMPR-v1.2"],
            )
            processor = AutoImageProcessor.from_pretrained(folder)
            inputs = dict(processor(images=sample_images[:2], return_tensors="pt"))
            kwargs = {k: inputs[k] for k in ("pixel_attention_mask", "spatial_shapes") if k in inputs}
            with torch.no_grad():
                expected = model.get_vision_features(inputs["pixel_values"], **kwargs)
            expected = list(expected)
            io = {f"in.{k}": v.contiguous() for k, v in inputs.items()}
            io |= {f"expected.{i}": e.contiguous() for i, e in enumerate(expected)}
            save_file(io, str(root / f"{name}.io.safetensors"))
            tower = {k: v.contiguous() for k, v in model.model.vision_tower.state_dict().items()}
            save_file(tower, str(root / f"{name}.tower.safetensors"))
            entries.append(
                {
                    "name": name,
                    "family": family,
                    "truncate": truncate,
                    "folder": folder,
                    "checkpoint": checkpoint,
                    "io": str(root / f"{name}.io.safetensors"),
                    "tower": str(root / f"{name}.tower.safetensors"),
                }
            )
    return entries


def test_exports_match_the_trained_tower(exports, trained, sample_images):
    for entry in exports:
        folder = Path(entry["folder"])
        files = {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()}
        assert {"config.json", "model.safetensors", "preprocessor_config.json", "README.md"} <= files, entry["name"]
        assert not [f for f in files if f.endswith((".bin", ".pt", ".pth", ".pkl", ".ckpt"))]  # safetensors only
        assert not list(folder.parent.glob(f".{folder.name}.*"))  # no temporary folder left behind

        pivot = PivotForConditionalGeneration.from_pretrained(entry["checkpoint"]).eval()
        tower = pivot.model.vision_tower
        encoder = AutoModel.from_pretrained(folder).eval()
        assert type(encoder) is type(tower) and type(encoder).__module__.startswith("transformers.")
        config = encoder.config
        num_layers = tower.config.num_hidden_layers
        original = tower.state_dict()
        exported = encoder.state_dict()
        for key, value in exported.items():  # bit for bit, same dtype
            assert value.dtype == original[key].dtype and torch.equal(value, original[key]), (entry["name"], key)
        if entry["truncate"]:
            assert config.num_hidden_layers == num_layers - 1 and config.pivot_vision_feature_layer == -1
            assert config.pivot_truncated_to_feature_layer is True
            assert not any(k.startswith("head.") for k in exported)  # the SigLIP pooling head was dropped
        else:
            assert set(exported) == set(original)  # drop-in: the whole tower, same names
            assert config.num_hidden_layers == num_layers and config.pivot_vision_feature_layer == -2
        assert config.pivot_vision_num_prefix_tokens == pivot.config.vision_num_prefix_tokens

        # Features at the recorded layer, computed with plain transformers, equal the MLLM's pre-projector features.
        processor = AutoImageProcessor.from_pretrained(folder)
        inputs = dict(processor(images=sample_images[:2], return_tensors="pt"))
        kwargs = {k: inputs[k] for k in ("pixel_attention_mask", "spatial_shapes") if k in inputs}
        with torch.no_grad():
            reference = list(pivot.get_vision_features(inputs["pixel_values"], **kwargs))
            got = _features_plain(
                encoder, inputs, config.pivot_vision_feature_layer, config.pivot_vision_num_prefix_tokens
            )
        for r, g in zip(reference, got):
            torch.testing.assert_close(g, r, rtol=0, atol=0)
        if entry["truncate"] and entry["family"] == "clip":
            # CLIP applies no final norm to last_hidden_state: after truncation it IS the feature.
            with torch.no_grad():
                last = encoder(pixel_values=inputs["pixel_values"]).last_hidden_state[:, 1:]
            torch.testing.assert_close(last, torch.stack(reference), rtol=0, atol=0)


@pytest.mark.compat
def test_exports_load_in_a_process_without_pivot_hf(exports, tmp_path):
    manifest = tmp_path / "manifest.json"
    manifest.write_text(json.dumps(exports))
    script = textwrap.dedent(
        f"""
        import json, sys
        sys.modules["pivot_hf"] = None  # any import of pivot_hf now raises ImportError
        import torch
        from safetensors.torch import load_file
        from transformers import AutoImageProcessor, AutoModel, AutoProcessor
        from PIL import Image
        images = [Image.open(p).convert("RGB") for p in sorted(__import__("glob").glob({str(REPO / "tests/fixtures/llava-mini/images/*.jpg")!r}))][:2]
        for entry in json.load(open({str(manifest)!r})):
            model = AutoModel.from_pretrained(entry["folder"]).eval()
            processor = AutoImageProcessor.from_pretrained(entry["folder"])
            assert type(model).__module__.startswith("transformers."), type(model)
            config = model.config
            tower = load_file(entry["tower"])
            for key, value in model.state_dict().items():
                assert torch.equal(value, tower[key]), (entry["name"], key)
            io = load_file(entry["io"])
            inputs = dict(processor(images=images, return_tensors="pt"))
            for key, value in inputs.items():
                assert torch.equal(value, io["in." + key]), (entry["name"], key)
            kwargs = {{k: inputs[k] for k in ("pixel_attention_mask", "spatial_shapes") if k in inputs}}
            with torch.no_grad():
                out = model(pixel_values=inputs["pixel_values"], output_hidden_states=True, **kwargs)
            feats = out.hidden_states[config.pivot_vision_feature_layer][:, config.pivot_vision_num_prefix_tokens:]
            for i, f in enumerate(feats):
                if "pixel_attention_mask" in inputs:
                    f = f[inputs["pixel_attention_mask"][i].bool()]
                torch.testing.assert_close(f, io[f"expected.{{i}}"], rtol=0, atol=0)
        print("PLAIN_OK", len(json.load(open({str(manifest)!r}))))
        """
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, env=env)
    assert f"PLAIN_OK {len(exports)}" in result.stdout, result.stderr[-4000:]


def test_model_card_metadata_and_validation(exports):
    entry = next(e for e in exports if e["name"] == "siglip-full")
    text = (Path(entry["folder"]) / "README.md").read_text()
    card = ModelCard(text)
    data = card.data
    assert data.base_model == "google/siglip2-so400m-patch16-384"
    assert data.library_name == "transformers" and data.pipeline_tag == "image-feature-extraction"
    assert data.datasets == ["OpenGVLab/MMPR-v1.2"]
    assert "pivot" in data.tags and "siglip_vision_model" in data.tags
    assert ModelCardData(**data.to_dict()).to_dict() == data.to_dict()
    check_model_card(card)
    # Recipe (from training_args.json / pivot_run.json / trainer_state.json), feature layer, evaluation, usage.
    for needle in ("learning_rate | 1e-06", "beta | 0.1", "global_step | 7", "hidden_states[-2]", "0.8125"):
        assert needle in text, needle
    assert "AutoModel.from_pretrained(" in text and "projector/" in text
    assert SECRET not in text and "hub_token" not in text
    try:  # the Hub's own validation needs the network; offline it must fail for that reason only
        card.validate()
    except Exception as err:
        assert isinstance(err, ConnectionError | OSError) or "offline" in str(err).lower(), repr(err)


def test_recorded_base_model():
    from transformers import SiglipVisionConfig

    config = SiglipVisionConfig()
    config._name_or_path = "/some/local/folder"
    assert recorded_base_model(config) is None
    config._name_or_path = "google/siglip-so400m-patch14-384"
    assert recorded_base_model(config) == "google/siglip-so400m-patch14-384"
    config.pivot_base_vision_model = "google/siglip2-so400m-patch16-384"
    assert recorded_base_model(config) == "google/siglip2-so400m-patch16-384"


class FakeHfApi:
    """Records the calls the real HfApi would get, and the files present at upload time."""

    calls = []

    def __init__(self, *args, **kwargs):
        FakeHfApi.calls.append(("init", args, kwargs))

    def create_repo(self, repo_id, **kwargs):
        FakeHfApi.calls.append(("create_repo", repo_id, kwargs))
        return type("RepoUrl", (), {"repo_id": repo_id})()

    def create_branch(self, repo_id, **kwargs):
        FakeHfApi.calls.append(("create_branch", repo_id, kwargs))

    def upload_folder(self, **kwargs):
        folder = Path(kwargs["folder_path"])
        files = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())
        FakeHfApi.calls.append(("upload_folder", files, kwargs))
        return type("CommitInfo", (), {"commit_url": f"https://huggingface.co/{kwargs['repo_id']}/commit/abc"})()


def test_push_to_hub_with_fake_api(trained, tmp_path, monkeypatch, caplog, capsys):
    monkeypatch.setattr(export_mod, "HfApi", FakeHfApi)
    monkeypatch.setenv("HF_TOKEN", SECRET)
    FakeHfApi.calls = []
    out = tmp_path / "pushed"
    argv = [
        "--model_name_or_path", trained("siglip"), "--output_dir", str(out), "--export_projector", "true",
        "--base_model", "google/siglip2-so400m-patch16-384", "--push_to_hub", "true",
        "--hub_model_id", "someone/pivot-siglip", "--hub_private_repo", "true", "--hub_revision", "v1",
        "--hub_commit_message", "PIVOT encoder",
    ]  # fmt: skip
    caplog.set_level("DEBUG")
    result = _load_recipe("export_encoder").main(argv)
    assert result["url"].startswith("https://huggingface.co/someone/pivot-siglip")

    by_name = {call[0]: call for call in FakeHfApi.calls}
    _, repo_id, kwargs = by_name["create_repo"]
    assert repo_id == "someone/pivot-siglip" and kwargs["private"] is True and kwargs["exist_ok"] is True
    assert by_name["create_branch"][2]["branch"] == "v1"
    _, files, kwargs = by_name["upload_folder"]
    assert files == [
        "README.md",
        "config.json",
        "model.safetensors",
        "preprocessor_config.json",
        "projector/model.safetensors",
        "projector/projector_config.json",
    ]
    assert kwargs["revision"] == "v1" and kwargs["commit_message"] == "PIVOT encoder"
    assert kwargs["folder_path"] == str(out) and kwargs["repo_id"] == "someone/pivot-siglip"
    assert all(call[2].get("token") in (None, SECRET) for call in FakeHfApi.calls)  # from HF_TOKEN, nowhere else

    # The token appears in no written file, no log record and no console output.
    for path in out.rglob("*"):
        if path.is_file():
            assert SECRET.encode() not in path.read_bytes(), path
    captured = capsys.readouterr()
    assert SECRET not in caplog.text and SECRET not in captured.out and SECRET not in captured.err
    assert "someone/pivot-siglip" in (out / "README.md").read_text()  # usage snippet names the repo


def test_push_without_token_fails_before_any_call(trained, tmp_path, monkeypatch):
    monkeypatch.setattr(export_mod, "HfApi", FakeHfApi)
    monkeypatch.setattr(export_mod, "get_token", lambda: None)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    FakeHfApi.calls = []
    folder = export_encoder(trained("siglip"), tmp_path / "enc", verify=False)
    with pytest.raises(OSError, match="token"):
        export_mod.push_encoder_to_hub(folder, "someone/pivot-siglip")
    assert FakeHfApi.calls == []


def test_in_memory_bf16_export_and_multi_layer_features(trained, tmp_path):
    model = PivotForConditionalGeneration.from_pretrained(trained("clip")).to(torch.bfloat16).eval()
    model.config.vision_feature_layer = [-3, -2]  # LLaVA's multi-layer option: concatenated along channels
    processor = AutoImageProcessor.from_pretrained(trained("clip"))
    folder = export_encoder(model, tmp_path / "bf16", image_processor=processor, truncate_to_feature_layer=True)
    encoder = AutoModel.from_pretrained(folder, dtype="auto")
    assert encoder.dtype == torch.bfloat16 and encoder.config.pivot_vision_feature_layer == [1, -1]
    tower = model.model.vision_tower.state_dict()
    assert all(torch.equal(v, tower[k]) for k, v in encoder.state_dict().items())
    with pytest.raises(FileNotFoundError, match="export_projector"):
        load_projector(folder)  # exported without --export_projector


def test_export_is_atomic(trained, tmp_path, monkeypatch):
    checkpoint = trained("siglip")
    target = tmp_path / "enc"

    def fail(*args, **kwargs):
        raise RuntimeError("simulated crash during verification")

    monkeypatch.setattr(export_mod, "_verify_export", fail)
    with pytest.raises(RuntimeError, match="simulated"):
        export_encoder(checkpoint, target)
    assert not target.exists() and os.listdir(tmp_path) == []  # nothing half-written, nothing loadable

    monkeypatch.undo()
    export_encoder(checkpoint, target, verify=False)
    before = sorted(os.listdir(target))
    with pytest.raises(FileExistsError):
        export_encoder(checkpoint, target)
    monkeypatch.setattr(export_mod, "_verify_export", fail)
    with pytest.raises(RuntimeError, match="simulated"):
        export_encoder(checkpoint, target, truncate_to_feature_layer=True, overwrite_output_dir=True)
    assert sorted(os.listdir(target)) == before and AutoModel.from_pretrained(target).config.num_hidden_layers == 3
    assert [p for p in os.listdir(tmp_path) if p.startswith(".")] == []


def _tiny_llm(tiny_pivot_factory) -> str:
    return str(Path(tiny_pivot_factory("siglip") + "-parts") / "llm-qwen2")  # written by build_tiny_pivot


def test_projector_reuse_rules(exports, trained, tiny_pivot_factory):
    full = next(e for e in exports if e["name"] == "siglip-full")["folder"]
    trunc = next(e for e in exports if e["name"] == "siglip-trunc")["folder"]
    assert feature_layer_of(full) == -2 and feature_layer_of(trunc) == -1
    tensors, meta = load_projector(full)
    assert meta["num_layers"] == 2 and set(tensors) == {f"linear_{i}.{k}" for i in (1, 2) for k in ("weight", "bias")}
    source = PivotForConditionalGeneration.from_pretrained(trained("siglip")).model.multi_modal_projector
    assert torch.equal(tensors["linear_1.weight"], source.linear_1.weight)

    model = PivotForConditionalGeneration.from_vision_text_pretrained(full, _tiny_llm(tiny_pivot_factory))
    assert apply_projector_reuse(model, full, 0, freeze=True) == []  # 0: the fresh projector stays
    copied = apply_projector_reuse(model, full + "/projector/model.safetensors", 2, freeze=False)
    assert len(copied) == 4 and all(p.requires_grad for p in model.model.multi_modal_projector.parameters())
    for name in ("linear_1", "linear_2"):
        assert torch.equal(getattr(model.model.multi_modal_projector, name).weight, getattr(source, name).weight)
    apply_projector_reuse(model, trained("siglip"), 1, freeze=True)  # straight from a Pivot checkpoint
    assert not model.model.multi_modal_projector.linear_1.weight.requires_grad
    with pytest.raises(ValueError, match="projector_init_from"):
        apply_projector_reuse(model, None, 1, freeze=True)


def test_stage3_from_export_with_real_sft_script(exports, tiny_pivot_factory, tmp_path):
    """Stage 3a "1+1" through recipes/sft.py: encoder frozen and bit-identical, the reused first projector layer
    frozen and bit-identical, the new second layer and the LLM trained."""
    from transformers import AutoModelForCausalLM

    export = next(e for e in exports if e["name"] == "siglip-trunc")["folder"]
    llm = _tiny_llm(tiny_pivot_factory)
    out = tmp_path / "stage3"
    argv = [
        "--config", str(REPO / "recipes/paper/stage3/3a_reuse1.yaml"),
        "--vision_model_name_or_path", export, "--projector_init_from", export, "--text_model_name_or_path", llm,
        "--dataset_name", str(REPO / "tests/fixtures/llava-mini/pretrain.json"),
        "--image_folder", str(REPO / "tests/fixtures/llava-mini/images"),
        "--tunable_parts", "projector,language_model", "--learning_rate", "1e-2",
        "--max_steps", "2", "--per_device_train_batch_size", "2", "--gradient_accumulation_steps", "1",
        "--bf16", "false", "--dtype", "float32", "--gradient_checkpointing", "false", "--max_length", "512",
        "--attn_implementation", "eager", "--save_strategy", "no", "--logging_steps", "1", "--report_to", "none",
        "--dataloader_num_workers", "0", "--output_dir", str(out),
    ]  # fmt: skip
    _load_recipe("sft").main(argv)

    trained_model = PivotForConditionalGeneration.from_pretrained(out)
    encoder = AutoModel.from_pretrained(export)
    tower = trained_model.model.vision_tower.state_dict()
    for key, value in encoder.state_dict().items():
        assert torch.equal(tower[key], value), key  # the published encoder is untouched
    tensors, _ = load_projector(export)
    projector = trained_model.model.multi_modal_projector
    assert torch.equal(projector.linear_1.weight, tensors["linear_1.weight"])  # reused and frozen
    assert torch.equal(projector.linear_1.bias, tensors["linear_1.bias"])
    assert not torch.equal(projector.linear_2.weight, tensors["linear_2.weight"])  # a new layer, trained
    base_llm = AutoModelForCausalLM.from_pretrained(llm)
    before = base_llm.model.layers[0].mlp.down_proj.weight
    after = trained_model.model.language_model.layers[0].mlp.down_proj.weight
    assert not torch.equal(before, after)  # the LLM trained
    # A model reading the wrong layer of a truncated export is refused instead of silently misusing the projector.
    wrong = PivotForConditionalGeneration.from_vision_text_pretrained(export, llm, vision_feature_layer=-2)
    with pytest.raises(ValueError, match="pivot_vision_feature_layer"):
        apply_projector_reuse(wrong, export, 1, freeze=True)


@pytest.mark.parametrize("recipe", sorted(p.name for p in (REPO / "recipes" / "paper" / "stage3").glob("*.yaml")))
def test_stage3_recipes_parse_with_the_sft_parser(recipe):
    from pivot_hf.configs import PivotModelConfig, PivotScriptArguments, PivotSFTConfig, parse_recipe_args

    argv = [
        "--config",
        str(REPO / "recipes" / "paper" / "stage3" / recipe),
        "--bf16",
        "false",
    ]  # bf16 needs a GPU to parse
    _, model_args, training_args = parse_recipe_args([PivotScriptArguments, PivotModelConfig, PivotSFTConfig], argv)
    assert "vision_tower" not in training_args.tunable_parts  # Stage 3 never trains the published encoder
    if recipe.startswith("3a"):
        assert training_args.tunable_parts == ["projector"] and training_args.learning_rate == 1e-3
        # The feature layer comes from the exported encoder (-1 once truncated), so the recipe must not pin it.
        assert model_args.vision_model_name_or_path and model_args.vision_feature_layer is None
    else:
        assert training_args.tunable_parts == ["projector", "language_model"] and training_args.learning_rate == 1e-5
    reuse = 1 if "reuse1" in recipe else 2 if "reuse2" in recipe else 0
    # 3a loads the reused layers; 3b continues from 3a's checkpoint and only needs the export again to keep a frozen
    # reused layer frozen ("1+1").
    needs_export = bool(reuse) if recipe.startswith("3a") else reuse == 1
    assert (model_args.projector_init_from is not None) == needs_export
    if needs_export:
        assert model_args.projector_reuse_layers == reuse and model_args.freeze_reused_projector == (reuse == 1)


@pytest.mark.parametrize(("family", "layer"), [("vit_mae", -2), ("clip", [-3, -2])])
def test_model_card_usage_snippet_gives_the_mllm_features(family, layer, tiny_pivot_factory, sample_images, tmp_path):
    """The card's code, run as a user would (folder for the repo id), reproduces the MLLM's visual features, for the
    families where plain `model(**inputs)` is not enough (MAE shuffles patches) and for several feature layers."""
    import re

    model = PivotForConditionalGeneration.from_pretrained(tiny_pivot_factory(family)).eval()
    model.config.vision_feature_layer = layer
    folder = export_encoder(model, tmp_path / "export", image_processor=_processor_of(family, tiny_pivot_factory))
    card = (Path(folder) / "README.md").read_text()
    code = re.search(r"```python\n(.*?)```", card, re.S).group(1)
    image_path = tmp_path / "image.png"  # lossless, so the snippet sees exactly the pixels compared below
    sample_images[0].save(image_path)
    code = code.replace('"image.jpg"', repr(str(image_path)))
    code = re.sub(r'from_pretrained\("[^"]*"\)', f"from_pretrained({str(folder)!r})", code)
    namespace = {}
    exec(compile(code, "model_card_snippet", "exec"), namespace)  # noqa: S102 - our own generated snippet
    processor = PivotProcessor.from_pretrained(tiny_pivot_factory(family))
    pixel_values = processor.image_processor(images=sample_images[0], return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        expected = model.get_vision_features(pixel_values)
    torch.testing.assert_close(namespace["features"], expected, rtol=1e-5, atol=1e-5)


def _processor_of(family, tiny_pivot_factory):
    return PivotProcessor.from_pretrained(tiny_pivot_factory(family)).image_processor
