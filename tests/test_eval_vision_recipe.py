"""Smoke runs of `recipes/eval_vision.py` for each task on tiny offline data: results.json, summary.md, summary.png."""

import importlib.util
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import skimage.data
import yaml
from PIL import Image

from pivot_hf.testing import build_tiny_llm, build_tiny_pivot, build_tiny_vision


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RECIPE = os.path.join(ROOT, "recipes", "eval_vision.py")
MMPR = os.path.join(ROOT, "tests", "fixtures", "mmpr-mini")
PICTURES = ("astronaut", "chelsea", "coffee", "rocket", "immunohistochemistry", "colorwheel", "hubble_deep_field")


def _picture(name):
    a = getattr(skimage.data, name)()
    return Image.fromarray(a).convert("RGB")


def _recipe():
    spec = importlib.util.spec_from_file_location("eval_vision_recipe", RECIPE)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    from test_eval_vision_features import write_digits_imagefolder

    base = tmp_path_factory.mktemp("recipe")
    # ADE20K layout: real pictures, synthetic masks (4 classes from intensity bands; 0 = unlabeled)
    for split, names in (("training", PICTURES[:5]), ("validation", PICTURES[5:])):
        os.makedirs(base / "ade" / "images" / split)
        os.makedirs(base / "ade" / "annotations" / split)
        for n in names:
            img = _picture(n)
            img.save(base / "ade" / "images" / split / f"{n}.jpg")
            mask = (np.asarray(img.convert("L")) // 64).astype(np.uint8)
            Image.fromarray(mask).save(base / "ade" / "annotations" / split / f"{n}.png")
    # image-caption pairs: two crops of each picture
    os.makedirs(base / "caps")
    with open(base / "caps" / "metadata.jsonl", "w") as f:
        for n in PICTURES:
            img = _picture(n)
            w, h = img.size
            for j, box in enumerate(((0, 0, w // 2, h // 2), (w // 2, h // 2, w, h))):
                img.crop(box).save(base / "caps" / f"{n}-{j}.jpg")
                f.write(json.dumps({"file_name": f"{n}-{j}.jpg", "text": f"part {j} of a picture of {n}"}) + "\n")
    return {
        "base": base,
        "vision": build_tiny_vision(base / "vision", "siglip", seed=0),
        "dino": build_tiny_vision(base / "dino", "dinov2_registers", seed=0),
        "pivot": build_tiny_pivot(base / "pivot", family="siglip", seed=0),
        "llm": build_tiny_llm(base / "llm", "qwen2", seed=0),
        "digits": write_digits_imagefolder(base / "digits"),
    }


def _check_outputs(out_dir, task, n_runs, metric):
    res = json.load(open(os.path.join(out_dir, "results.json")))
    assert res["task"] == task and res["primary_metric"] == metric and len(res["runs"]) == n_runs
    for run in res["runs"]:
        assert metric in run["metrics"] and run["metrics"][metric] is not None
    assert {"settings", "seeds", "data", "versions"} <= set(res)
    summary = open(os.path.join(out_dir, "summary.md")).read()
    assert f"| {res['runs'][0]['label']} |" in summary
    assert Image.open(os.path.join(out_dir, "summary.png")).size[0] > 100
    return res


def test_linear_probe_cli_with_yaml_config(assets, tmp_path):
    # A real subprocess: the script as a user runs it, YAML config + a CLI override.
    cfg = {
        "task": "linear_probe",
        "model_name_or_path": [assets["vision"], assets["dino"]],
        "model_labels": ["siglip", "dinov2"],
        "dataset_name": assets["digits"],
        "output_dir": str(tmp_path / "wrong"),
        "cache_dir": str(tmp_path / "cache"),
        "steps_per_decade": 2,
    }
    with open(tmp_path / "lp.yaml", "w") as f:
        yaml.safe_dump(cfg, f)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    out = tmp_path / "lp"
    proc = subprocess.run(
        [sys.executable, RECIPE, "--config", str(tmp_path / "lp.yaml"), "--output_dir", str(out), "--device", "cpu"],
        capture_output=True, text=True, env=env, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = _check_outputs(out, "linear_probe", 2, "top1")
    assert [r["label"] for r in res["runs"]] == ["siglip", "dinov2"]
    assert res["settings"]["steps_per_decade"] == 2 and res["runs"][0]["metrics"]["best_C"] > 0
    assert res["data"]["train"]["size"] == 60 and res["data"]["test"]["size"] == 25
    # the protocol names the one knob this run changed from the reference sweep
    assert res["protocol"]["differs_from_reference"] == ["steps_per_decade"]
    assert res["protocol"]["knobs"]["c_tie_break"]["value"] == "larger"


def test_prototype_smoke(assets, tmp_path):
    out = tmp_path / "proto"
    _recipe().main(
        ["--task", "prototype", "--model_name_or_path", assets["pivot"], "--source", "projector",
         "--dataset_name", assets["digits"], "--output_dir", str(out), "--cache_dir", str(tmp_path / "c"),
         "--device", "cpu"]
    )  # fmt: skip
    res = _check_outputs(out, "prototype", 1, "top1")
    assert res["runs"][0]["model"]["source"] == "projector"
    assert res["settings"]["prototype_normalize"] is False and res["protocol"]["differs_from_reference"] == []


def test_segmentation_smoke(assets, tmp_path):
    out = tmp_path / "seg"
    _recipe().main(
        ["--task", "segmentation", "--model_name_or_path", assets["vision"], "--dataset_name",
         str(assets["base"] / "ade"), "--output_dir", str(out), "--num_classes", "4", "--num_train_epochs", "2",
         "--seg_batch_size", "2", "--head_hidden", "64", "--seeds", "0", "1", "--cache_dir", str(tmp_path / "c"),
         "--device", "cpu"]
    )  # fmt: skip
    res = _check_outputs(out, "segmentation", 1, "macro_recall_mean")
    det = res["runs"][0]["details"]
    assert det["seeds"] == [0, 1] and len(det["per_seed"]) == 2
    assert all(len(s["history"]) == 2 and 1 <= s["best_epoch"] <= 2 for s in det["per_seed"])
    vals = [s["macro_recall"] for s in det["per_seed"]]
    assert res["runs"][0]["metrics"]["macro_recall_mean"] == pytest.approx(np.mean(vals))
    assert res["runs"][0]["metrics"]["macro_recall_std"] == pytest.approx(np.std(vals, ddof=1))
    # 5 training images in batches of 2 with drop_last: 2 updates per epoch; CPU runs without autocast
    assert all(s["num_steps"] == 4 and s["warmup_steps"] == 500 for s in det["per_seed"])
    proto = res["protocol"]
    assert proto["knobs"]["min_learning_rate"]["value"] == 1e-4 and proto["knobs"]["drop_last"]["value"] is True
    assert set(proto["differs_from_reference"]) == {"batch_size", "epochs", "autocast", "head", "features"}
    assert proto["knobs"]["features"]["value"].startswith("hidden_states[-2]")


def test_alignment_smoke(assets, tmp_path):
    out = tmp_path / "align"
    _recipe().main(
        ["--task", "alignment", "--model_name_or_path", assets["vision"], assets["pivot"], assets["dino"],
         "--text_model_name_or_path", assets["llm"], "--dataset_name", str(assets["base"] / "caps"), "--knn_k", "3",
         "--seeds", "0", "1", "--alignment_max_samples", "10", "--output_dir", str(out), "--cache_dir",
         str(tmp_path / "c"), "--device", "cpu"]
    )  # fmt: skip
    res = _check_outputs(out, "alignment", 3, "alignment_mean")
    det = res["runs"][0]["details"]
    assert det["vision_layers"] == 3  # the 3 block outputs of the tiny tower (embeddings are not a layer)
    assert np.asarray(det["per_seed"][0]["matrix"]).shape == (3, 3)  # x (embeddings + 2 LLM layers)
    # The Pivot was composed from the same encoder: identical vision features, identical alignment.
    assert res["runs"][0]["metrics"]["alignment_mean"] == pytest.approx(res["runs"][1]["metrics"]["alignment_mean"])
    # SigLIP has no CLS token (mean over patches), DINOv2 has one (CLS); both recorded, the difference flagged
    assert [r["details"]["vision_pooling"] for r in res["runs"]] == ["mean", "mean", "cls"]
    proto = res["protocol"]
    assert proto["knobs"]["clamp_method"]["value"] == "mean_per_sample"
    assert proto["knobs"]["caption_max_length"]["value"] is None
    assert {"vision_pooling", "pairs_per_seed"} <= set(proto["differs_from_reference"])
    assert "clamp_method" not in proto["differs_from_reference"]
    assert "Differs from the reference" in open(os.path.join(out, "summary.md")).read()


def test_gradcam_smoke(assets, tmp_path):
    out = tmp_path / "gradcam"
    _recipe().main(
        ["--task", "gradcam", "--model_name_or_path", assets["pivot"], "--dataset_name", MMPR, "--max_samples", "2",
         "--output_dir", str(out), "--device", "cpu"]
    )  # fmt: skip
    res = _check_outputs(out, "gradcam", 1, "dpo_top10_mass")
    samples = res["runs"][0]["details"]["samples"]
    assert len(samples) == 2
    for s in samples:
        assert os.path.isfile(os.path.join(out, s["png"]))
        assert s["dpo_loss"] == pytest.approx(np.log(2), abs=1e-5)  # policy == reference at step 0: -log sigmoid(0)
