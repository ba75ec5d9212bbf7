"""Data issue: malformed rows and images are converted or skipped with a counted reason; memory stays flat."""

import gc
import json
import os
import tempfile

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from pivot_hf.data import LazyImages, LlavaConfig, MMPRConfig, convert_llava, convert_mmpr, load_image


os.environ.setdefault("HF_HUB_OFFLINE", "1")
QUIET = {"show_progress": False}


def _make_images(root: str) -> dict[str, str]:
    """Write one file per troublesome case into `root`; return name -> relative path."""
    os.makedirs(root, exist_ok=True)
    files = {}

    def save(name, image, **kw):
        image.save(os.path.join(root, name), **kw)
        files[name.split(".")[0]] = name

    save("rgb.jpg", Image.new("RGB", (16, 16), (200, 10, 10)))
    save("gray.png", Image.new("L", (16, 16), 77))
    save("la.png", Image.new("LA", (16, 16), (77, 0)))
    pal = Image.new("P", (16, 16), 1)
    pal.putpalette([0, 0, 0, 0, 255, 0] + [0] * 762)
    save("pal.png", pal)
    save("rgba.png", Image.new("RGBA", (16, 16), (0, 0, 255, 0)))  # fully transparent
    save("cmyk.jpg", Image.new("CMYK", (16, 16), (0, 0, 0, 0)))  # no ink = white
    arr16 = np.full((16, 16), 65535, dtype=np.uint16)
    arr16[0, 0] = 257 * 128
    save("i16.png", Image.fromarray(arr16))  # uint16 -> mode I;16
    save("tiny.png", Image.new("RGB", (1, 1), (1, 2, 3)))
    save("anim.gif", Image.new("P", (16, 16), 0))
    save("big.png", Image.new("1", (1200, 1000), 0))  # 1.2 MP: over the test's 1 MP limit
    buf = os.path.join(root, "full.jpg")
    Image.new("RGB", (64, 64), (5, 5, 5)).save(buf, quality=90)
    with open(buf, "rb") as f:
        data = f.read()
    with open(os.path.join(root, "truncated.jpg"), "wb") as f:
        f.write(data[: len(data) // 2])
    files["truncated"] = "truncated.jpg"
    with open(os.path.join(root, "notimage.jpg"), "w") as f:
        f.write("this is text, not a JPEG")
    files["notimage"] = "notimage.jpg"
    outside = os.path.join(os.path.dirname(root), "outside.jpg")
    Image.new("RGB", (4, 4)).save(outside)
    os.symlink(outside, os.path.join(root, "link.jpg"))
    files["link"] = "link.jpg"
    files["dotdot"] = "../outside.jpg"
    files["absolute"] = outside
    files["missing"] = "nope.jpg"
    return files


def _row(image, question="<image>\nWhat is it?", chosen="A thing.", rejected="Another thing."):
    return {"image": image, "question": question, "chosen": chosen, "rejected": rejected}


@pytest.fixture()
def malformed_mmpr(tmp_path):
    """An MMPR folder holding one row per case of the issue, with the expected outcome of each."""
    root = tmp_path / "mmpr" / "images"
    img = _make_images(str(root))
    cases = [  # (line, expected reason or "kept")
        *[(_row(img[k]), "kept") for k in ("rgb", "gray", "la", "pal", "rgba", "cmyk", "i16", "tiny", "anim")],
        (_row(img["big"]), "image_too_large"),
        (_row(img["truncated"]), "image_unreadable"),
        (_row(img["notimage"]), "image_unreadable"),
        (_row(img["missing"]), "image_missing"),
        (_row(img["dotdot"]), "path_escapes_root"),
        (_row(img["absolute"]), "path_escapes_root"),
        (_row(img["link"]), "path_escapes_root"),
        (_row(img["rgb"], question=""), "invalid_text"),
        (_row(img["rgb"], chosen=None), "invalid_text"),
        (_row(img["rgb"], rejected=42), "invalid_text"),
        ({"image": img["rgb"], "question": "q?", "chosen": "c"}, "invalid_text"),
        (_row(img["rgb"], chosen="Same.", rejected="Same."), "chosen_equals_rejected"),
        (_row(img["rgb"], question="What is it?"), "kept"),  # missing <image>: prepended
        (_row(img["rgb"], question="<image>\n<image>\nWhat is it?"), "kept"),  # repeated: deduplicated
        (_row(img["rgb"], question="What is it?\n<image>"), "kept"),  # misplaced: moved
        (_row(img["rgb"], chosen="See <image> here."), "image_token_in_response"),
        (_row([img["rgb"], img["gray"]]), "multi_image"),
        (_row([img["rgb"]]), "kept"),  # a one-element list is single-image
        (_row(None), "no_image"),
        (_row(""), "no_image"),
        (_row(7), "invalid_image_field"),
        ('{"image": "rgb.jpg", "question": ', "broken_json"),
        ("[1, 2, 3]", "not_an_object"),
    ]
    ann = tmp_path / "mmpr" / "bad.jsonl"
    ann.write_text("\n".join(c if isinstance(c, str) else json.dumps(c) for c, _ in cases) + "\n\n")
    meta = {
        "bad": {
            "root": "images",
            "annotation": "bad.jsonl",
            "data_augment": False,
            "repeat_time": 1,
            "length": len(cases),
        }
    }
    (tmp_path / "mmpr" / "meta.json").write_text(json.dumps(meta))
    return str(tmp_path / "mmpr"), [expected for _, expected in cases]


def test_malformed_mmpr_every_row_accounted(malformed_mmpr):
    folder, expected = malformed_mmpr
    result = convert_mmpr(folder, MMPRConfig(num_samples=None, max_image_pixels=1_000_000, **QUIET))
    report = result.report
    want = {}
    for reason in expected:
        if reason != "kept":
            want[reason] = want.get(reason, 0) + 1
    assert report.total == len(expected)
    assert report.kept == expected.count("kept") == len(result.preference) == len(result.sft)
    assert dict(report.skipped) == want
    assert report.check()
    assert result.preference["id"] == [f"bad:{i}" for i, r in enumerate(expected) if r == "kept"]
    for key in ("image_token_prepended", "image_token_deduplicated", "image_token_moved"):
        assert report.converted[key] == 1
    for mode in ("L", "LA", "P", "RGBA", "CMYK", "I;16"):
        assert report.converted[f"image_mode_{mode}_to_rgb"] >= 1
    assert report.converted["gif_first_frame_to_rgb"] == 1
    assert all(p[0]["content"] == "What is it?" for p in result.preference["prompt"])
    # Example ids are reported for every reason.
    assert report.examples["skipped:path_escapes_root"] == [
        f"bad:{i}" for i, r in enumerate(expected) if r == "path_escapes_root"
    ]
    # Every kept image decodes to RGB through the lazy transform, with the expected colours.
    decoded = {
        os.path.basename(p[0]): img
        for p, img in zip(result.preference["images"], LazyImages()({"images": result.preference["images"]})["images"])
    }
    pixels = {name: np.asarray(imgs[0]) for name, imgs in decoded.items()}
    assert all(imgs[0].mode == "RGB" for imgs in decoded.values())
    assert pixels["i16.png"][0, 0].tolist() == [128] * 3 and pixels["i16.png"][1, 1].tolist() == [255] * 3
    assert pixels["rgba.png"][0, 0].tolist() == [255, 255, 255]  # transparent -> white, not the hidden blue
    assert pixels["la.png"][0, 0].tolist() == [255, 255, 255]
    assert pixels["cmyk.jpg"][0, 0].min() >= 250
    assert pixels["gray.png"][0, 0].tolist() == [77] * 3
    assert pixels["pal.png"][0, 0].tolist() == [0, 255, 0]
    assert pixels["tiny.png"].shape == (1, 1, 3)


def test_image_helpers(tmp_path):
    with pytest.raises(ValueError, match="more than"):
        Image.new("RGB", (100, 100)).save(tmp_path / "x.png")
        load_image(str(tmp_path / "x.png"), max_pixels=50)
    assert load_image(Image.new("I;16", (2, 2), 65535)).getpixel((0, 0)) == (255, 255, 255)


def test_malformed_llava(tmp_path):
    img = _make_images(str(tmp_path / "images"))

    def conv(*turns):
        return [{"from": f, "value": v} for f, v in turns]

    cases = [
        ({"id": "ok", "image": img["rgb"], "conversations": conv(("human", "<image>\nQ"), ("gpt", "A"))}, "kept"),
        ({"id": "txt", "conversations": conv(("human", "<image>\nQ"), ("gpt", "A"))}, "kept"),  # token removed
        (
            {"id": "rep", "image": img["rgb"], "conversations": conv(("human", "<image> <image> Q"), ("gpt", "A"))},
            "kept",
        ),
        (
            {"id": "tail", "image": img["rgb"], "conversations": conv(("human", "Q"), ("gpt", "A"), ("human", "Q2"))},
            "kept",
        ),
        ({"id": "role", "conversations": conv(("alien", "Q"), ("gpt", "A"))}, "bad_conversation"),
        ({"id": "noconv", "image": img["rgb"]}, "bad_conversation"),
        ({"id": "onlygpt", "conversations": conv(("gpt", "A"))}, "bad_conversation"),
        ({"id": "empty", "conversations": conv(("human", "Q"), ("gpt", ""))}, "invalid_text"),
        (
            {"id": "resp", "image": img["rgb"], "conversations": conv(("human", "Q"), ("gpt", "<image>"))},
            "image_token_in_response",
        ),
        (
            {"id": "multi", "image": [img["rgb"], img["gray"]], "conversations": conv(("human", "Q"), ("gpt", "A"))},
            "multi_image",
        ),
        (
            {"id": "esc", "image": img["dotdot"], "conversations": conv(("human", "Q"), ("gpt", "A"))},
            "path_escapes_root",
        ),
        (
            {"id": "trunc", "image": img["truncated"], "conversations": conv(("human", "Q"), ("gpt", "A"))},
            "image_unreadable",
        ),
        ("not json {", "broken_json"),
        ('"a string"', "not_an_object"),
    ]
    path = tmp_path / "data.jsonl"
    path.write_text("\n".join(c if isinstance(c, str) else json.dumps(c) for c, _ in cases))
    dataset, report = convert_llava(str(path), LlavaConfig(image_folder=str(tmp_path / "images"), **QUIET))
    assert report.total == len(cases) and report.check()
    assert dataset["id"] == [c["id"] for c, r in cases if r == "kept"]
    assert report.skipped["bad_conversation"] == 3 and report.skipped["broken_json"] == 1
    assert report.converted["image_token_removed_text_only"] == 1 and report.converted["image_token_deduplicated"] == 1
    assert report.converted["trailing_user_turn_dropped"] == 1
    assert dataset[2]["messages"][0]["content"] == "Q"
    # Multi-image rows are kept on request; a broken whole JSON array is one counted record.
    _, report = convert_llava(
        str(path), LlavaConfig(image_folder=str(tmp_path / "images"), allow_multi_image=True, **QUIET)
    )
    assert "multi_image" not in report.skipped
    (tmp_path / "broken.json").write_text('[{"id": 1,')
    dataset, report = convert_llava(str(tmp_path / "broken.json"), LlavaConfig(**QUIET))
    assert len(dataset) == 0 and report.skipped["broken_json"] == 1 and report.check()


def _rss() -> int:
    import psutil

    return psutil.Process().memory_info().rss


def test_memory_flat_over_20k_rows(tmp_path):
    folder = tmp_path / "big"
    (folder / "images").mkdir(parents=True)
    for i in range(8):
        rng = np.random.default_rng(i)
        Image.fromarray(rng.integers(0, 255, (96, 96, 3), dtype=np.uint8)).save(folder / "images" / f"{i}.png")
    with open(folder / "a.jsonl", "w") as f:
        for i in range(20000):
            f.write(
                json.dumps(_row(f"{i % 8}.png", question=f"Question {i}?", chosen=f"Answer {i}.", rejected="No."))
                + "\n"
            )
    (folder / "meta.json").write_text(json.dumps({"a": {"root": "images", "annotation": "a.jsonl"}}))
    result = convert_mmpr(str(folder), MMPRConfig(num_samples=None, **QUIET))
    assert result.report.kept == 20000 and result.report.check()
    dataset = result.preference.with_transform(LazyImages())
    gc.collect()
    samples = []
    n = 0
    for batch in dataset.iter(batch_size=250):
        n += sum(len(x) for x in batch["images"])
        assert isinstance(batch["images"][0][0], Image.Image)
        del batch
        samples.append(_rss())
    assert n == 20000
    warm = max(samples[: len(samples) // 10])  # after 2K rows
    peak = max(samples)
    # 20K decoded 96x96 images hold ~550 MB; flat iteration must stay within a few MB of the warm-up level.
    assert peak - warm < 40 * 2**20, (warm / 2**20, peak / 2**20)


_IMAGE_KINDS = ["rgb", "gray", "i16", "rgba", "truncated", "notimage", "missing", "dotdot", "absolute", "link", "big"]


@pytest.fixture(scope="module")
def image_pool():
    with tempfile.TemporaryDirectory() as d:
        root = os.path.join(d, "pool", "images")
        yield root, _make_images(root)


text = st.one_of(
    st.none(),
    st.integers(),
    st.just(""),
    st.text(max_size=20),
    st.sampled_from(["<image>", "<image>\nQ?", "Q <image>", "<think>x</think> y"]),
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    rows=st.lists(
        st.one_of(
            st.builds(
                lambda q, c, r, im: {"question": q, "chosen": c, "rejected": r, "image": im},
                text,
                text,
                text,
                st.one_of(
                    st.sampled_from(_IMAGE_KINDS),
                    st.lists(st.sampled_from(_IMAGE_KINDS), max_size=2),
                    st.none(),
                    st.integers(),
                ),
            ),
            st.text(max_size=10),  # raw (mostly broken) JSON lines
        ),
        max_size=12,
    ),
    num_samples=st.one_of(st.none(), st.integers(1, 8)),
)
def test_property_no_exception_and_accounting(image_pool, rows, num_samples):
    root, img = image_pool
    folder = os.path.dirname(root)
    lines = []
    for row in rows:
        if isinstance(row, dict):
            image = row["image"]
            if isinstance(image, str):
                image = img[image]
            elif isinstance(image, list):
                image = [img[x] for x in image]
            lines.append(json.dumps({**row, "image": image}))
        elif row.strip():
            lines.append(row.replace("\n", " ").replace("\r", " "))
    with open(os.path.join(folder, "ann.jsonl"), "w") as f:
        f.write("\n".join(lines))
    with open(os.path.join(folder, "meta.json"), "w") as f:
        json.dump({"p": {"root": "images", "annotation": "ann.jsonl"}}, f)
    result = convert_mmpr(folder, MMPRConfig(num_samples=num_samples, max_image_pixels=1_000_000, **QUIET))
    report = result.report
    assert report.check()
    assert report.total == len([ln for ln in lines if ln.strip()])
    assert len(result.preference) == len(result.sft) == report.kept
    assert result.preference["id"] == result.sft["id"]
    if num_samples is not None:
        assert report.kept <= num_samples
    for images in LazyImages()({"images": result.preference["images"]})["images"]:
        assert images[0].mode == "RGB"


def test_exif_orientation_bom_files_and_length_estimates(tmp_path, tiny_pivot_factory):
    """Review regressions: EXIF-rotated photos load upright; UTF-8 BOMs do not lose rows; the max_length filter
    measures rows with the processor's own template (a base LLM's tokenizer may render shorter than training does);
    a saved conversion keeps SFT and DPO on the same rows under max_length."""
    import json

    from PIL import Image
    from trl.trainer.dpo_trainer import DataCollatorForVisionPreference

    from pivot_hf import PivotProcessor
    from pivot_hf.cli import main as cli_main
    from pivot_hf.data import load_image, load_pivot_dataset, sequence_lengths

    images = tmp_path / "images"
    images.mkdir()
    exif = Image.new("RGB", (40, 20)).getexif()
    exif[0x0112] = 6  # "rotate 90 CW to view": the stored 40x20 pixels are a 20x40 photo
    Image.new("RGB", (40, 20), (200, 10, 10)).save(images / "rotated.jpg", exif=exif)
    assert load_image(str(images / "rotated.jpg")).size == (20, 40)

    rows = [
        {"image": "rotated.jpg", "question": "What colour?", "chosen": "Red.", "rejected": "word " * 60},
        {"image": "rotated.jpg", "question": "<image>\nAnd now?", "chosen": "Still red.", "rejected": "Blue."},
    ]
    (tmp_path / "ann.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n", encoding="utf-8-sig")
    meta = {"s": {"root": "images", "annotation": "ann.jsonl"}}
    (tmp_path / "meta.json").write_text(json.dumps(meta), encoding="utf-8-sig")
    processor = PivotProcessor.from_pretrained(tiny_pivot_factory("siglip"))
    n_img = processor.num_image_tokens()
    data, report = load_pivot_dataset(str(tmp_path), "preference", num_samples=0, **QUIET)
    assert len(data) == 2 and report.check()  # the BOM cost no row

    # The estimate bounds what TRL's collator really builds for each row.
    collate = DataCollatorForVisionPreference(processor=processor)
    raw = data.with_format(None)
    estimates = sequence_lengths(raw[:2], processor, n_img)
    for i, estimate in enumerate(estimates):
        batch = collate([dict(data[i])])
        real = int(batch["attention_mask"].sum(dim=1).max())
        assert real <= estimate <= real + 2, (real, estimate)

    # Saved conversion: the SFT control keeps exactly the pairs the preference set keeps under max_length.
    out = tmp_path / "saved"
    assert cli_main(["data", "convert-mmpr", str(tmp_path), "--output_dir", str(out), "--show_progress", "false"]) == 0
    limit = max(estimates) - 1  # drops the pair with the long rejected answer
    kwargs = {"tokenizer": processor, "num_samples": 0, "max_length": limit, "num_image_tokens": n_img}
    preference, _ = load_pivot_dataset(str(out), "preference", **kwargs)
    sft, _ = load_pivot_dataset(str(out), "sft", **kwargs)
    assert len(preference) == 1 and preference["id"] == sft["id"]
