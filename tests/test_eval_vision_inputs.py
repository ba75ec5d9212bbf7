"""Bad inputs to `recipes/eval_vision.py` are refused with a clear error before any image is encoded."""

import json
import os
import shutil

import pytest

from pivot_hf.evaluation.features import VisionBackbone
from pivot_hf.evaluation.runner import EvalVisionArguments, run
from pivot_hf.testing import build_tiny_pivot, build_tiny_vision


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    from test_eval_vision_features import write_digits_imagefolder
    from test_eval_vision_recipe import _picture

    base = tmp_path_factory.mktemp("inputs")
    os.makedirs(base / "caps")
    with open(base / "caps" / "metadata.jsonl", "w") as f:
        for n in ("astronaut", "chelsea", "coffee", "rocket", "colorwheel"):
            _picture(n).resize((32, 32)).save(base / "caps" / f"{n}.jpg")
            f.write(json.dumps({"file_name": f"{n}.jpg", "text": f"a picture of {n}"}) + "\n")
    return {
        "base": base,
        "siglip": build_tiny_vision(base / "siglip", "siglip", seed=0),
        "dino": build_tiny_vision(base / "dino", "dinov2_registers", seed=0),
        "pivot": build_tiny_pivot(base / "pivot", family="siglip", seed=0),
        "one_class": write_digits_imagefolder(base / "one_class", classes=(0,), n_train=6, n_test=3),
        "one_per_class": write_digits_imagefolder(base / "one_per_class", classes=(0, 1, 2), n_train=1, n_test=2),
    }


def _args(tmp_path, **kw):
    return EvalVisionArguments(output_dir=str(tmp_path / "out"), cache_dir=str(tmp_path / "cache"), device="cpu", **kw)


@pytest.mark.parametrize(
    "task,extra",
    [("segmentation", {}), ("linear_probe", {}), ("alignment", {"alignment_max_samples": 20})],
)
def test_repeated_seeds_are_refused(tmp_path, task, extra):
    # [0, 0] reruns one draw: its mean counts it twice and its std reads 0, as if the result did not vary
    with pytest.raises(ValueError, match=r"repeats \[0\]"):
        _args(tmp_path, task=task, model_name_or_path=["m"], seeds=[0, 1, 0], **extra)
    assert _args(tmp_path, task=task, model_name_or_path=["m"], seeds=[0, 1], **extra).seeds == [0, 1]


def test_alignment_knobs_out_of_range_are_refused(tmp_path):
    # 1.5 used to pass silently as "no clamp" while results.json recorded 1.5
    with pytest.raises(ValueError, match=r"clamp_quantile must lie in \(0, 1\].*1.5"):
        _args(tmp_path, task="alignment", model_name_or_path=["m"], clamp_quantile=1.5)
    with pytest.raises(ValueError, match="alignment_max_samples 10 leaves no room for --knn_k 10"):
        _args(tmp_path, task="alignment", model_name_or_path=["m"], alignment_max_samples=10, seeds=[0, 1])


@pytest.mark.parametrize("task", ["linear_probe", "prototype"])
def test_one_class_is_refused_before_encoding(assets, tmp_path, task):
    bb = VisionBackbone.from_pretrained(assets["siglip"], device="cpu")
    args = _args(tmp_path, task=task, model_name_or_path=[assets["siglip"]], dataset_name=assets["one_class"])
    with pytest.raises(ValueError, match=r"holds 1 class \(\['digit0'\], 6 images\); a classifier needs at least 2"):
        run(args, backbones=[bb])
    assert bb.num_images_encoded == 0


def test_linear_probe_without_a_validation_image_is_refused_before_encoding(assets, tmp_path):
    # one train image per class: nothing to hold out for choosing C (it used to fail inside sklearn after encoding)
    bb = VisionBackbone.from_pretrained(assets["siglip"], device="cpu")
    args = _args(tmp_path, task="linear_probe", model_name_or_path=["m"], dataset_name=assets["one_per_class"])
    with pytest.raises(ValueError, match=r"no usable validation split.*'digit0': 1, 'digit1': 1, 'digit2': 1"):
        run(args, backbones=[bb])
    assert bb.num_images_encoded == 0
    # the prototype probe has no validation split, so the same data is fine there
    args = _args(tmp_path, task="prototype", model_name_or_path=["m"], dataset_name=assets["one_per_class"])
    run(args, backbones=[bb])
    assert bb.num_images_encoded == 3 + 6


def test_test_class_without_train_images_is_refused(assets, tmp_path):
    from test_eval_vision_features import write_digits_imagefolder

    root = write_digits_imagefolder(tmp_path / "digits", classes=(0, 1), n_train=4, n_test=2)
    extra = write_digits_imagefolder(tmp_path / "extra", classes=(7,), n_train=1, n_test=2)
    shutil.move(os.path.join(extra, "test", "digit7"), os.path.join(root, "test", "digit7"))
    bb = VisionBackbone.from_pretrained(assets["siglip"], device="cpu")
    args = _args(tmp_path, task="prototype", model_name_or_path=["m"], dataset_name=root)
    # its 2 test images used to be dropped without a word, shrinking the test set
    with pytest.raises(ValueError, match=r"Test classes \['digit7'\] .* have no train folder"):
        run(args, backbones=[bb])
    assert bb.num_images_encoded == 0


def test_cls_pooling_on_a_family_without_cls_is_refused_before_any_model_runs(assets, tmp_path):
    from pivot_hf.evaluation.features import model_prefix_tokens

    dino = VisionBackbone.from_pretrained(assets["dino"], device="cpu")
    siglip = VisionBackbone.from_pretrained(assets["siglip"], device="cpu")
    args = _args(
        tmp_path, task="alignment", model_name_or_path=[assets["dino"], assets["siglip"]],
        dataset_name=str(assets["base"] / "caps"), knn_k=2, alignment_pooling="cls",
    )  # fmt: skip
    with pytest.raises(ValueError, match=f"{assets['siglip']}: --alignment_pooling cls: .* no CLS token"):
        run(args, backbones=[dino, siglip])
    assert dino.num_images_encoded == 0  # the DINOv2 model listed first was not encoded either
    # without preloaded backbones the check reads each config (no weights), with the loaded towers' answer
    for name in ("siglip", "dino", "pivot"):
        source = "projector" if name == "pivot" else "encoder"
        assert (
            model_prefix_tokens(assets[name])
            == VisionBackbone.from_pretrained(assets[name], source, device="cpu").num_prefix_tokens()
        )
    assert model_prefix_tokens(assets["dino"]) == 5 and model_prefix_tokens(assets["siglip"]) == 0


def test_knn_k_not_below_the_pairs_is_refused_before_encoding(assets, tmp_path):
    bb = VisionBackbone.from_pretrained(assets["siglip"], device="cpu")
    args = _args(
        tmp_path, task="alignment", model_name_or_path=[assets["siglip"]], dataset_name=str(assets["base"] / "caps"),
        knn_k=5,
    )  # fmt: skip
    with pytest.raises(ValueError, match=r"--knn_k 5 needs more than 5 pairs per seed, but each seed scores 5"):
        run(args, backbones=[bb])
    assert bb.num_images_encoded == 0


def test_unreadable_image_names_the_file_and_caches_nothing(assets, tmp_path):
    from test_eval_vision_features import write_digits_imagefolder

    root = write_digits_imagefolder(tmp_path / "digits", classes=(0, 1), n_train=4, n_test=2)
    bad = os.path.join(root, "train", "digit1", sorted(os.listdir(os.path.join(root, "train", "digit1")))[0])
    with open(bad, "wb") as f:
        f.write(b"not an image")
    bb = VisionBackbone.from_pretrained(assets["siglip"], device="cpu")
    args = _args(tmp_path, task="prototype", model_name_or_path=["m"], dataset_name=root)
    with pytest.raises(ValueError, match=f"image 4 cannot be read .*{bad}.*Replace or remove that file"):
        run(args, backbones=[bb])
    cached = [f for _, _, fs in os.walk(tmp_path / "cache") for f in fs]
    assert not any(f.endswith(".safetensors") or f.endswith(".npy") for f in cached), cached


def test_empty_caption_is_refused_before_encoding(assets, tmp_path):
    caps = tmp_path / "caps"
    shutil.copytree(assets["base"] / "caps", caps)
    rows = [json.loads(line) for line in open(caps / "metadata.jsonl")]
    rows[3]["text"] = "  "  # no token to average: a zero feature vector whose neighbours would be arbitrary
    with open(caps / "metadata.jsonl", "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    bb = VisionBackbone.from_pretrained(assets["siglip"], device="cpu")
    args = _args(tmp_path, task="alignment", model_name_or_path=["m"], dataset_name=str(caps), knn_k=2)
    with pytest.raises(ValueError, match=r"1 of 5 captions .* are empty or not text \(rows \[3\]\)"):
        run(args, backbones=[bb])
    assert bb.num_images_encoded == 0


def test_gradcam_with_several_seeds_is_refused(tmp_path):
    # fixed weights, fixed sample: the seeds used to be recorded in results.json though nothing they seed exists
    with pytest.raises(ValueError, match=r"gradcam with seeds \[0, 1\]: .* no randomness"):
        _args(tmp_path, task="gradcam", model_name_or_path=["m"], seeds=[0, 1])
    assert _args(tmp_path, task="gradcam", model_name_or_path=["m"]).seeds == [0]


def test_mask_ids_outside_num_classes_are_refused_before_encoding(assets, tmp_path):
    import numpy as np
    from PIL import Image

    from test_eval_vision_recipe import _picture

    root = tmp_path / "ade"
    for split, names in (("training", ("astronaut", "chelsea")), ("validation", ("coffee",))):
        os.makedirs(root / "images" / split)
        os.makedirs(root / "annotations" / split)
        for n in names:
            img = _picture(n).resize((64, 64))
            img.save(root / "images" / split / f"{n}.jpg")
            Image.fromarray((np.asarray(img.convert("L")) // 32).astype(np.uint8)).save(
                root / "annotations" / split / f"{n}.png"
            )  # ids 0..7
    bb = VisionBackbone.from_pretrained(assets["siglip"], device="cpu")
    args = _args(
        tmp_path, task="segmentation", model_name_or_path=["m"], dataset_name=str(root), num_classes=4,
        seg_batch_size=1, seeds=[0],
    )  # fmt: skip
    # ids 4..7 used to be dropped from the labels without a word
    with pytest.raises(ValueError, match=r"astronaut.png holds class ids 0\.\.7, outside 0\.\.3 \(--num_classes 4\)"):
        run(args, backbones=[bb])
    assert bb.num_images_encoded == 0
    args.num_classes = 8
    run(args, backbones=[bb])
    assert bb.num_images_encoded == 3
