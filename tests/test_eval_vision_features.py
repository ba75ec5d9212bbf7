"""Feature extraction (exported encoders and Pivot checkpoints), the disk cache, and the dataset readers."""

import json
import os

import numpy as np
import pytest
import skimage.data
import torch
from PIL import Image
from sklearn.datasets import load_digits

import pivot_hf  # noqa: F401
from pivot_hf.evaluation import runner
from pivot_hf.evaluation.data import load_ade20k, load_caption_pairs, load_classification_dataset
from pivot_hf.evaluation.features import FeatureCache, VisionBackbone, extract_features
from pivot_hf.testing import build_tiny_pivot, build_tiny_vision


def write_digits_imagefolder(root, classes=(0, 1, 2, 3, 4), n_train=12, n_test=5):
    """ImageFolder train/test of real scikit-learn digits (8x8, upscaled to 32 px RGB)."""
    x, y = load_digits(return_X_y=True)
    for c in classes:
        idx = np.flatnonzero(y == c)
        for split, rows in (("train", idx[:n_train]), ("test", idx[n_train : n_train + n_test])):
            os.makedirs(os.path.join(root, split, f"digit{c}"), exist_ok=True)
            for i in rows:
                img = Image.fromarray((x[i].reshape(8, 8) * 255 / 16).astype(np.uint8)).resize((32, 32))
                img.convert("RGB").save(os.path.join(root, split, f"digit{c}", f"{i}.png"))
    return str(root)


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    base = tmp_path_factory.mktemp("features")
    return {
        "vision": build_tiny_vision(base / "vision", "siglip", seed=0),
        "vision_other": build_tiny_vision(base / "vision_other", "siglip", seed=1),
        "pivot": build_tiny_pivot(base / "pivot", family="siglip", seed=0),
        "digits": write_digits_imagefolder(base / "digits"),
        "base": base,
    }


def _images():
    return [Image.fromarray(skimage.data.astronaut()), Image.fromarray(skimage.data.coffee())]


def test_exported_encoder_and_pivot_give_the_same_encoder_features(assets):
    enc = VisionBackbone.from_pretrained(assets["vision"], device="cpu")
    piv = VisionBackbone.from_pretrained(assets["pivot"], source="encoder", device="cpu")
    proj = VisionBackbone.from_pretrained(assets["pivot"], source="projector", device="cpu")
    inputs = enc.preprocess(_images())
    a, b = enc.encode(inputs["pixel_values"]), piv.encode(inputs["pixel_values"])
    torch.testing.assert_close(a, b)  # same weights (the Pivot was composed from this encoder), same layer (-2)
    assert a.shape == (2, 16, 32)  # 32 px / patch 8 -> 16 patch tokens, no CLS in SigLIP
    assert enc.fingerprint() == piv.fingerprint() and proj.fingerprint() != piv.fingerprint()
    expected = torch.stack(piv.model.get_image_features(inputs["pixel_values"]).pooler_output)
    torch.testing.assert_close(proj.encode(inputs["pixel_values"]), expected)
    # the hidden-state stack used by the alignment probe agrees with the feature layer
    torch.testing.assert_close(enc.encode_all_layers(inputs["pixel_values"])[-2], a)


def test_feature_cache_reuses_features_and_misses_on_new_weights(assets, tmp_path):
    cache = FeatureCache(str(tmp_path / "cache"))
    images = _images()
    bb = VisionBackbone.from_pretrained(assets["vision"], device="cpu")
    f1 = extract_features(bb, images, 2, "data-v1", cache=cache, batch_size=1)
    assert (cache.hits, cache.misses, bb.num_images_encoded) == (0, 1, 2)
    bb2 = VisionBackbone.from_pretrained(assets["vision"], device="cpu")  # a fresh load of the same weights
    f2 = extract_features(bb2, images, 2, "data-v1", cache=cache)
    assert (cache.hits, bb2.num_images_encoded) == (1, 0)
    np.testing.assert_array_equal(np.asarray(f1), np.asarray(f2))
    assert isinstance(f2, np.memmap) or isinstance(getattr(f2, "base", None), np.memmap)
    other = VisionBackbone.from_pretrained(assets["vision_other"], device="cpu")
    extract_features(other, images, 2, "data-v1", cache=cache)  # different weights -> miss
    extract_features(bb2, images, 2, "data-v2", cache=cache)  # different data -> miss
    extract_features(bb2, images, 2, "data-v1", pooling="none", cache=cache)  # different pooling -> miss
    assert (cache.hits, cache.misses) == (1, 4)
    # DataLoader workers decode in parallel; rows stay in image order
    f3 = extract_features(bb2, images[::-1] * 2, 4, "data-v3", cache=None, batch_size=3, num_workers=1)
    np.testing.assert_allclose(np.asarray(f3), np.concatenate([f1[::-1], f1[::-1]]), rtol=1e-5, atol=1e-6)
    entries = [e for e in os.listdir(tmp_path / "cache") if not e.startswith(".")]
    assert len(entries) == 4  # no temporary folders left behind
    for e in entries:
        assert sorted(os.listdir(tmp_path / "cache" / e)) == ["features.npy", "meta.json"]


def test_rerunning_a_probe_hits_the_cache(assets, tmp_path):
    args = runner.EvalVisionArguments(
        task="prototype",
        model_name_or_path=[assets["vision"]],
        dataset_name=assets["digits"],
        output_dir=str(tmp_path / "out1"),
        cache_dir=str(tmp_path / "cache"),
        device="cpu",
    )
    first = runner.run(args)
    assert first["cache"]["hits"] == 0 and first["cache"]["misses"] == 2  # train + test encoded
    args.output_dir = str(tmp_path / "out2")
    second = runner.run(args)
    assert second["cache"]["hits"] == 2 and second["cache"]["misses"] == 0
    r1 = json.load(open(first["results"]))
    r2 = json.load(open(second["results"]))
    assert r1["runs"][0]["images_encoded"] == 85 and r2["runs"][0]["images_encoded"] == 0
    assert r1["runs"][0]["metrics"]["top1"] == r2["runs"][0]["metrics"]["top1"]


def test_dataset_readers(assets, tmp_path):
    import datasets

    # ImageFolder with train/test
    splits = load_classification_dataset(assets["digits"])
    assert len(splits["train"]) == 60 and len(splits["test"]) == 25
    assert splits["train"].class_names == [f"digit{c}" for c in range(5)]
    img, label = splits["test"][7]
    assert img.mode == "RGB" and label == 1
    sub = splits["train"].subset([0, 5, 13])
    assert len(sub) == 3 and sub.fingerprint != splits["train"].fingerprint
    # A `save_to_disk` folder (DatasetDict with an Image and a ClassLabel column)
    feats = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=["a", "b"])})
    pics = [Image.fromarray(skimage.data.astronaut()).resize((40, 40)), Image.fromarray(skimage.data.camera())]
    ds = datasets.Dataset.from_dict({"image": pics * 2, "label": [0, 1, 0, 1]}, features=feats)
    datasets.DatasetDict({"train": ds, "validation": ds.select([0, 1])}).save_to_disk(str(tmp_path / "saved"))
    hf = load_classification_dataset(str(tmp_path / "saved"))
    assert len(hf["train"]) == 4 and len(hf["test"]) == 2 and hf["train"].class_names == ["a", "b"]
    assert hf["train"][1][0].mode == "RGB" and hf["train"][1][1] == 1
    # ADE20K layout
    for split in ("training", "validation"):
        os.makedirs(tmp_path / "ade" / "images" / split)
        os.makedirs(tmp_path / "ade" / "annotations" / split)
        Image.fromarray(skimage.data.coffee()).save(tmp_path / "ade" / "images" / split / "a.jpg")
        Image.fromarray((skimage.data.coffee()[..., 0] // 64).astype(np.uint8)).save(
            tmp_path / "ade" / "annotations" / split / "a.png"
        )
    ade = load_ade20k(str(tmp_path / "ade"))
    image, mask = ade["train"][0]
    assert image.size == (600, 400) and mask.shape == (400, 600) and mask.max() <= 3
    # caption pairs (imagefolder metadata.jsonl convention)
    os.makedirs(tmp_path / "caps")
    with open(tmp_path / "caps" / "metadata.jsonl", "w") as f:
        for i, name in enumerate(("astronaut", "coffee")):
            Image.fromarray(getattr(skimage.data, name)()).save(tmp_path / "caps" / f"{i}.jpg")
            f.write(json.dumps({"file_name": f"{i}.jpg", "text": f"a photo of {name}"}) + "\n")
    pairs = load_caption_pairs(str(tmp_path / "caps"))
    assert len(pairs) == 2 and pairs[1][1] == "a photo of coffee"


def test_review_regressions_layer_naflex_pooling_and_hidden_folders(tiny_pivot_factory, tmp_path):
    """A Pivot checkpoint is read at the requested layer; NaFlex token lists pool per image; hidden folders are not
    classes."""
    import numpy as np
    from PIL import Image

    from pivot_hf.evaluation.data import load_classification_dataset
    from pivot_hf.evaluation.features import VisionBackbone, pool_tokens

    path = tiny_pivot_factory("siglip")
    pixel_values = torch.randn(2, 3, 32, 32)
    deep = VisionBackbone.from_pretrained(path, "encoder", -1, device="cpu").encode(pixel_values)
    shallow = VisionBackbone.from_pretrained(path, "encoder", 1, device="cpu").encode(pixel_values)
    assert not torch.allclose(deep, shallow)
    model = VisionBackbone.from_pretrained(path, "encoder", 1, device="cpu").model
    torch.testing.assert_close(shallow, model.get_vision_features(pixel_values, vision_feature_layer=1))

    ragged = [torch.ones(3, 4), torch.zeros(5, 4)]
    torch.testing.assert_close(pool_tokens(ragged, "mean"), torch.stack([torch.ones(4), torch.zeros(4)]))

    for name in ("cat", "dog", ".ipynb_checkpoints"):
        (tmp_path / "data" / name).mkdir(parents=True)
    for name in ("cat", "dog"):
        for i in range(3):
            Image.fromarray(np.full((8, 8, 3), i * 40, np.uint8)).save(tmp_path / "data" / name / f"{i}.png")
    assert load_classification_dataset(str(tmp_path / "data"))["train"].class_names == ["cat", "dog"]
