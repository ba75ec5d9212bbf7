"""Encoder analysis tools: per-layer relative change and weight merging."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from pivot_hf.analysis import (
    AnalyzeEncodersArguments,
    layer_change,
    layer_group,
    load_vision_state,
    merge_state_dicts,
    run,
)
from pivot_hf.testing import build_tiny_vision


@pytest.fixture(scope="module")
def encoders(tmp_path_factory):
    """A tiny SigLIP tower, a copy with only block 1 edited, and an unrelated tower of the same shape."""
    root = tmp_path_factory.mktemp("encoders")
    base = build_tiny_vision(root / "base", family="siglip", num_layers=3, seed=0)
    other = build_tiny_vision(root / "other", family="siglip", num_layers=3, seed=1)
    edited = build_tiny_vision(root / "edited", family="siglip", num_layers=3, seed=0)
    state = load_file(f"{edited}/model.safetensors")
    name = "encoder.layers.1.mlp.fc1.weight"
    state[name] = state[name] + 0.01
    save_file(state, f"{edited}/model.safetensors", {"format": "pt"})
    return {"base": base, "other": other, "edited": edited}


def test_identical_encoders_change_nothing(encoders):
    results = layer_change(encoders["base"], encoders["base"])
    assert results["total_relative_change"] == 0.0
    assert all(layer["relative_change"] == 0.0 and layer["fraction_changed"] == 0.0 for layer in results["layers"])
    assert results["most_changed"] is None and results["changed_groups"] == []
    blocks = [layer["block_index"] for layer in results["layers"] if layer["block_index"] is not None]
    assert blocks == [0, 1, 2]  # network order, not the safetensors file's alphabetical one


def test_single_block_edit_is_found(encoders):
    results = layer_change(encoders["base"], encoders["edited"])
    assert results["most_changed"] == "encoder.layers.1"
    assert results["most_changed_block_index"] == 1
    assert results["changed_groups"] == ["encoder.layers.1"]
    layer = next(x for x in results["layers"] if x["group"] == "encoder.layers.1")
    assert layer["relative_change"] > 0 and layer["max_abs_change"] == pytest.approx(0.01, rel=1e-3)


def test_pivot_checkpoint_names_line_up_with_a_standalone_encoder(encoders):
    standalone = load_vision_state(encoders["base"])
    # A Pivot checkpoint keeps the tower under `model.vision_tower.` next to the LLM's weights.
    pivot_state = {f"model.vision_tower.{k}": v for k, v in standalone.items()}
    pivot_state["model.language_model.embed_tokens.weight"] = torch.zeros(4, 4)
    assert layer_change(pivot_state, encoders["base"])["total_relative_change"] == 0.0
    # A Hub dual encoder (`vision_model.` + a text half) lines up too: the wrapper is dropped, the text half ignored.
    dual = {
        **{f"vision_model.{k}": v for k, v in standalone.items()},
        "text_model.embeddings.token_embedding.weight": torch.ones(3, 3),
        "logit_scale": torch.ones(1),
    }
    assert set(load_vision_state(dual)) == set(standalone)


def test_merge_endpoints_are_exact(encoders):
    a, b = load_vision_state(encoders["base"]), load_vision_state(encoders["other"])
    at0, _ = merge_state_dicts(a, b, 0.0)
    at1, _ = merge_state_dicts(a, b, 1.0)
    half, stats = merge_state_dicts(a, b, 0.5)
    assert all(torch.equal(at0[k], a[k]) for k in a)
    assert all(torch.equal(at1[k], b[k]) for k in b)
    key = "encoder.layers.0.mlp.fc1.weight"
    torch.testing.assert_close(half[key], (a[key] + b[key]) / 2)
    assert stats["merged_tensors"] > 0 and stats["only_in_other"] == []
    # Bf16 endpoints are exact too.
    a16, b16 = {k: v.bfloat16() for k, v in a.items()}, {k: v.bfloat16() for k, v in b.items()}
    assert all(torch.equal(merge_state_dicts(a16, b16, 1.0)[0][k], b16[k]) for k in b16)


def test_merge_only_selected_blocks(encoders):
    a, b = load_vision_state(encoders["base"]), load_vision_state(encoders["other"])
    merged, _ = merge_state_dicts(a, b, 1.0, blocks=[2])
    for name in a:
        index = layer_group(name)[1]
        assert torch.equal(merged[name], b[name] if index == 2 else a[name]), name


def test_cli_writes_results_plots_and_loadable_encoders(encoders, tmp_path):
    from transformers import AutoModel

    change = run(
        AnalyzeEncodersArguments(
            task="layer_change",
            base_model_name_or_path=encoders["base"],
            tuned_model_name_or_path=encoders["edited"],
            output_dir=str(tmp_path / "change"),
        )
    )
    assert json.loads(open(change["results"]).read())["most_changed_block_index"] == 1
    assert open(change["plot"], "rb").read(8) == b"\x89PNG\r\n\x1a\n"

    merge = run(
        AnalyzeEncodersArguments(
            task="merge",
            base_model_name_or_path=encoders["base"],
            tuned_model_name_or_path=encoders["other"],
            alphas=[0.0, 0.5, 1.0],
            output_dir=str(tmp_path / "merge"),
        )
    )
    results = json.loads(open(merge["results"]).read())
    assert [row["alpha"] for row in results["sweep"]] == [0.0, 0.5, 1.0]
    assert results["sweep"][0]["distance_to_base"] == 0.0 and results["sweep"][-1]["distance_to_other"] == 0.0
    assert open(merge["plot"], "rb").read(4) == b"\x89PNG"
    # The alpha=1 folder loads with plain transformers and holds the other encoder's weights exactly.
    model = AutoModel.from_pretrained(results["sweep"][-1]["encoder_dir"])
    other = load_vision_state(encoders["other"])
    assert all(torch.equal(v, other[k]) for k, v in model.state_dict().items() if k in other)
