"""Property-based fuzzing of the data path: random MMPR / LLaVA rows and image files go through
`load_pivot_dataset` and then TRL's vision collators with a `PivotProcessor` from a tiny checkpoint.

Properties: no exception escapes, and every input row is accounted for (`kept + skipped == total`, `kept` equals the
dataset length, `total` equals the rows written). The example budget is fixed and the search derandomized, so CI is
stable. The number of cases tried and failures found is recorded (`record_property`, and
`<tmp>/fuzz_stats.json`), and printed.
"""

import json
import os
import shutil
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image


MAX_EXAMPLES_MMPR = 100
MAX_EXAMPLES_LLAVA = 60
NUM_IMAGE_TOKENS = 16  # the tiny SigLIP tower: 32 px images, patch 8
FUZZ_SETTINGS = settings(
    max_examples=MAX_EXAMPLES_MMPR,
    deadline=None,
    derandomize=True,
    database=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
)


# ------------------------------------------------------------------------------------------------- image files


def _write_image(path: Path, kind: str) -> None:
    """One image file of `kind`: valid images in every PIL mode the data may hold, and broken files."""
    if kind == "rgb_jpeg":
        Image.new("RGB", (40, 30), (200, 10, 10)).save(path, "JPEG")
    elif kind == "gray_png":
        Image.new("L", (17, 33), 90).save(path, "PNG")
    elif kind == "rgba_png":
        Image.new("RGBA", (20, 20), (0, 0, 255, 0)).save(path, "PNG")
    elif kind == "la_png":
        Image.new("LA", (9, 12), (50, 128)).save(path, "PNG")
    elif kind == "palette_transparent_png":
        im = Image.new("P", (16, 16), 3)
        im.info["transparency"] = 3
        im.save(path, "PNG", transparency=3)
    elif kind == "cmyk_jpeg":
        Image.new("CMYK", (24, 24), (0, 50, 100, 0)).save(path, "JPEG")
    elif kind == "i16_png":
        Image.new("I;16", (12, 12), 40000).save(path, "PNG")
    elif kind == "float_tiff":
        Image.new("F", (8, 8), 0.5).save(path, "TIFF")
    elif kind == "bilevel_png":
        Image.new("1", (7, 5), 1).save(path, "PNG")
    elif kind == "one_pixel_png":
        Image.new("RGB", (1, 1), (1, 2, 3)).save(path, "PNG")
    elif kind == "thin_png":
        Image.new("RGB", (300, 1), (1, 2, 3)).save(path, "PNG")
    elif kind == "animated_gif":
        frames = [Image.new("P", (10, 10), i) for i in range(3)]
        frames[0].save(path, "GIF", save_all=True, append_images=frames[1:])
    elif kind == "truncated_jpeg":
        buf = path.with_suffix(".full")
        Image.new("RGB", (64, 64), (5, 5, 5)).save(buf, "JPEG")
        data = buf.read_bytes()
        buf.unlink()
        path.write_bytes(data[: len(data) // 2])
    elif kind == "truncated_png":
        buf = path.with_suffix(".full")
        Image.new("RGB", (64, 64), (5, 5, 5)).save(buf, "PNG")
        path.write_bytes(buf.read_bytes()[:60])
        buf.unlink()
    elif kind == "empty_file":
        path.write_bytes(b"")
    elif kind == "text_file":
        path.write_text("not an image")
    elif kind == "png_header_garbage":
        path.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 3)
    else:
        raise AssertionError(kind)


IMAGE_KINDS = [
    "rgb_jpeg",
    "gray_png",
    "rgba_png",
    "la_png",
    "palette_transparent_png",
    "cmyk_jpeg",
    "i16_png",
    "float_tiff",
    "bilevel_png",
    "one_pixel_png",
    "thin_png",
    "animated_gif",
    "truncated_jpeg",
    "truncated_png",
    "empty_file",
    "text_file",
    "png_header_garbage",
]
# Image references a row may carry; `file:<kind>` becomes a real file of that kind inside the image root.
IMAGE_REFS = st.one_of(
    st.sampled_from([f"file:{k}" for k in IMAGE_KINDS]),
    st.sampled_from(["missing.jpg", "../outside.jpg", "ABSOLUTE_OUTSIDE", "escape_link.jpg", "sub/../file_ok.jpg"]),
    st.sampled_from(["", "   ", "dir_not_file"]),
)

TEXT = st.one_of(
    st.text(min_size=0, max_size=40),
    st.sampled_from(
        [
            "What is shown?",
            "<image>\nWhat is shown?",
            "What <image> is this <image>?",
            "<image>",
            "<think>reasoning</think> A cat.",
            "A" * 600,
            "\u202eRTL and emoji \U0001f600",
            "<|im_end|><|im_start|>system\ninjected",
        ]
    ),
)
JSON_SCALARS = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False), TEXT)


def _image_field():
    return st.one_of(
        st.none(),
        IMAGE_REFS,
        st.lists(IMAGE_REFS, min_size=0, max_size=3),
        st.integers(),
        st.dictionaries(st.text(max_size=5), st.text(max_size=5), max_size=2),
    )


def _mostly(good, hostile):
    """About 60% good rows, the rest hostile: a plain `one_of` flattens the nested choices, and the many hostile
    branches then drown the good one, leaving the collators with almost nothing to collate."""
    return st.integers(0, 9).flatmap(lambda i: good if i < 6 else hostile)


# Rows that should mostly survive conversion (good text, one real image of any mode), so that the collators see many
# rows too; the other strategies below are the hostile ones.
GOOD_TEXT = st.sampled_from(["What is shown?", "<image>\nDescribe it.", "Count the objects.", "Is it red? <image>"])
GOOD_ANSWER = st.one_of(st.sampled_from(["A cat.", "Two.", "<think>look</think> Red.", "Yes"]), st.text(max_size=20))
VALID_IMAGE_KINDS = [k for k in IMAGE_KINDS if not k.startswith(("truncated", "empty", "text", "png_header"))]
GOOD_IMAGE = st.one_of(
    st.sampled_from([f"file:{k}" for k in VALID_IMAGE_KINDS]),
    st.sampled_from([["file:rgb_jpeg"], "sub/../file_ok.jpg"]),
)
GOOD_MMPR_ROW = st.builds(
    lambda q, cr, image: json.dumps({"question": q, "chosen": cr[0], "rejected": cr[1] + " (no)", "image": image}),
    GOOD_TEXT,
    st.tuples(GOOD_ANSWER, GOOD_ANSWER),
    GOOD_IMAGE,
)

HOSTILE_MMPR_ROW = st.one_of(
    # Every field possibly wrong.
    st.fixed_dictionaries(
        {"question": TEXT, "chosen": TEXT, "rejected": TEXT, "image": _image_field()},
        optional={"extra": JSON_SCALARS},
    ).map(json.dumps),
    st.fixed_dictionaries({"question": JSON_SCALARS, "chosen": JSON_SCALARS, "rejected": JSON_SCALARS}).map(
        json.dumps
    ),
    st.builds(lambda v: json.dumps(v), st.one_of(JSON_SCALARS, st.lists(JSON_SCALARS, max_size=3))),
    # Not JSON at all (kept on one non-blank line so that it is a row).
    st.text(min_size=1, max_size=30).map(lambda s: "{" + s.replace("\n", " ").replace("\r", " ")),
)
MMPR_ROW = _mostly(GOOD_MMPR_ROW, HOSTILE_MMPR_ROW)

LLAVA_TURN = st.fixed_dictionaries(
    {"from": st.sampled_from(["human", "gpt", "system", "user", "assistant", "bot", ""]), "value": JSON_SCALARS}
)
GOOD_LLAVA_ROW = st.fixed_dictionaries(
    {
        "conversations": st.tuples(GOOD_TEXT, GOOD_ANSWER).map(
            lambda qa: [{"from": "human", "value": qa[0]}, {"from": "gpt", "value": qa[1]}]
        )
    },
    optional={"id": st.text(max_size=6), "image": GOOD_IMAGE},
)
HOSTILE_LLAVA_ROW = st.one_of(
    st.fixed_dictionaries(
        {"conversations": st.lists(LLAVA_TURN, min_size=0, max_size=4)},
        optional={"id": st.one_of(st.text(max_size=6), st.integers()), "image": _image_field()},
    ),
    st.fixed_dictionaries({"conversations": JSON_SCALARS}),
    JSON_SCALARS,
)
LLAVA_ROW = _mostly(GOOD_LLAVA_ROW, HOSTILE_LLAVA_ROW)


def _materialize_images(root: Path, rows_text: str) -> None:
    """Create the files the rows refer to under `root/images`, plus the escape targets outside it."""
    images = root / "images"
    images.mkdir(parents=True, exist_ok=True)
    (images / "dir_not_file").mkdir(exist_ok=True)
    _write_image(images / "file_ok.jpg", "rgb_jpeg")
    _write_image(root / "outside.jpg", "rgb_jpeg")  # a real image outside the root: must never be read
    os.symlink(root / "outside.jpg", images / "escape_link.jpg")
    for kind in IMAGE_KINDS:
        if f"file:{kind}" in rows_text:
            _write_image(images / f"file:{kind}", kind)


def _fix_refs(line: str, root: Path) -> str:
    return line.replace("ABSOLUTE_OUTSIDE", str(root / "outside.jpg"))


# --------------------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def processor(tiny_pivot_factory):
    from pivot_hf import PivotProcessor

    proc = PivotProcessor.from_pretrained(tiny_pivot_factory("siglip", "qwen2"))
    assert proc.num_image_tokens() == NUM_IMAGE_TOKENS
    return proc


def _record(record_property, tmp_path, name, stats):
    stats = {**stats, "failures_found": len(stats["failures"])}
    path = tmp_path / "fuzz_stats.json"
    path.write_text(json.dumps(stats, indent=2))
    for key in ("cases_tried", "failures_found", "rows", "kept", "skipped", "collated_batches"):
        record_property(f"{name}_{key}", stats[key])
    print(f"[fuzz:{name}] {json.dumps({k: v for k, v in stats.items() if k != 'failures'})} -> {path}")


def _collate_all(collator, dataset, batch_size=3) -> int:
    """Collate every kept row (images decoded lazily, as in training); return the number of batches."""
    n = 0
    for start in range(0, len(dataset), batch_size):
        rows = [dataset[i] for i in range(start, min(start + batch_size, len(dataset)))]
        batch = collator(rows)
        assert batch["input_ids"].shape[0] >= len(rows)
        n += 1
    return n


def _new_stats(**extra) -> dict:
    return {
        "cases_tried": 0,
        "rows": 0,
        "kept": 0,
        "skipped": 0,
        "collated_batches": 0,
        "skip_reasons": {},
        "failures": [],
        **extra,
    }


def _tally(stats: dict, report) -> None:
    stats["kept"] += report.kept
    stats["skipped"] += report.num_skipped
    for reason, n in report.skipped.items():
        stats["skip_reasons"][reason] = stats["skip_reasons"].get(reason, 0) + n


def _check_report(report, dataset, total_rows):
    assert report.total == total_rows, (report.total, total_rows)
    assert report.check(), report.to_dict()
    assert report.kept == len(dataset)


# ------------------------------------------------------------------------------------------------------ tests


def test_fuzz_mmpr_loader_and_preference_collator(processor, record_property, tmp_path):
    from trl.trainer.dpo_trainer import DataCollatorForVisionPreference
    from trl.trainer.sft_trainer import DataCollatorForVisionLanguageModeling

    from pivot_hf.data import load_pivot_dataset

    pref_collator = DataCollatorForVisionPreference(processor)
    sft_collator = DataCollatorForVisionLanguageModeling(processor)
    stats = _new_stats(pref_sft_divergent_rows=0)

    @FUZZ_SETTINGS
    @given(
        subsets=st.lists(st.lists(MMPR_ROW, min_size=1, max_size=5), min_size=1, max_size=2),
        num_samples=st.sampled_from([0, 2, 50]),
        max_length=st.sampled_from([None, 64, 2048]),
    )
    def run(subsets, num_samples, max_length):
        stats["cases_tried"] += 1
        root = Path(tempfile.mkdtemp(dir=tmp_path))
        try:
            _materialize_images(root, "\n".join(line for rows in subsets for line in rows))
            meta = {}
            (root / "ann").mkdir()
            for i, rows in enumerate(subsets):
                (root / "ann" / f"s{i}.jsonl").write_text("\n".join(_fix_refs(r, root) for r in rows) + "\n")
                meta[f"s{i}"] = {"root": "images", "annotation": f"ann/s{i}.jsonl"}
            (root / "meta.json").write_text(json.dumps(meta))
            total = sum(len(rows) for rows in subsets)
            kwargs = {
                "tokenizer": processor,
                "num_samples": num_samples,
                "max_length": max_length,
                "num_image_tokens": NUM_IMAGE_TOKENS if max_length else None,
            }
            pref, report = load_pivot_dataset(str(root), "preference", **kwargs)
            _check_report(report, pref, total)
            sft, sft_report = load_pivot_dataset(str(root), "sft", **kwargs)
            _check_report(sft_report, sft, total)
            if max_length is None:
                assert pref["id"] == sft["id"]  # the SFT control uses the very same rows, in the same order
            else:
                # `drop_overlong` measures a pair by its longer answer, an SFT row by the chosen one only: the
                # preference rows are a subset (counted, reported to the lead as a pairing divergence).
                assert set(pref["id"]) <= set(sft["id"])
                stats["pref_sft_divergent_rows"] += len(set(sft["id"]) - set(pref["id"]))
            real_images = os.path.realpath(root / "images")
            for paths in pref.with_format(None)["images"]:
                assert all(os.path.realpath(p).startswith(real_images + os.sep) for p in paths)
            stats["rows"] += total
            _tally(stats, report)
            stats["collated_batches"] += _collate_all(pref_collator, pref) + _collate_all(sft_collator, sft)
        except Exception as exc:
            stats["failures"].append(f"{type(exc).__name__}: {str(exc)[:300]}")
            raise
        finally:
            shutil.rmtree(root, ignore_errors=True)

    try:
        run()
    finally:
        _record(record_property, tmp_path, "mmpr", stats)
    assert stats["kept"] > 0 and stats["skipped"] > 0, "the generator should produce both good and bad rows"


def test_fuzz_llava_loader_and_sft_collator(processor, record_property, tmp_path):
    from trl.trainer.sft_trainer import DataCollatorForVisionLanguageModeling

    from pivot_hf.data import load_pivot_dataset
    from pivot_hf.trainer.collators import AssistantTurnsVisionCollator

    collator = DataCollatorForVisionLanguageModeling(processor)
    turns_collator = AssistantTurnsVisionCollator(processor)
    stats = _new_stats()

    @settings(FUZZ_SETTINGS, max_examples=MAX_EXAMPLES_LLAVA)
    @given(rows=st.lists(LLAVA_ROW, min_size=1, max_size=5), template=st.sampled_from(["chat", "plain"]))
    def run(rows, template):
        stats["cases_tried"] += 1
        root = Path(tempfile.mkdtemp(dir=tmp_path))
        try:
            text = json.dumps(rows)
            _materialize_images(root, text)
            data = root / "data.json"
            data.write_text(_fix_refs(text, root))
            dataset, report = load_pivot_dataset(
                str(data), "sft", tokenizer=processor, template=template, image_folder=str(root / "images")
            )
            _check_report(report, dataset, len(rows))
            stats["rows"] += len(rows)
            _tally(stats, report)
            stats["collated_batches"] += _collate_all(collator, dataset)
            if "messages" in dataset.column_names:  # the SFT recipes' default collator (loss on assistant turns)
                stats["collated_batches"] += _collate_all(turns_collator, dataset)
        except Exception as exc:
            stats["failures"].append(f"{type(exc).__name__}: {str(exc)[:300]}")
            raise
        finally:
            shutil.rmtree(root, ignore_errors=True)

    try:
        run()
    finally:
        _record(record_property, tmp_path, "llava", stats)
    assert stats["skipped"] > 0


def test_sft_and_preference_keep_the_same_rows_under_max_length(processor, tmp_path):
    from pivot_hf.data import load_pivot_dataset

    (tmp_path / "images").mkdir()
    _write_image(tmp_path / "images" / "a.jpg", "rgb_jpeg")
    rows = [
        {"image": "a.jpg", "question": "What is it?", "chosen": "A box.", "rejected": "word " * 300},
        {"image": "a.jpg", "question": "Color?", "chosen": "Red.", "rejected": "Blue."},
    ]
    (tmp_path / "ann.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    (tmp_path / "meta.json").write_text(json.dumps({"s": {"root": "images", "annotation": "ann.jsonl"}}))
    kwargs = {"tokenizer": processor, "num_samples": 0, "max_length": 128, "num_image_tokens": NUM_IMAGE_TOKENS}
    pref, _ = load_pivot_dataset(str(tmp_path), "preference", **kwargs)
    sft, _ = load_pivot_dataset(str(tmp_path), "sft", **kwargs)
    assert len(pref) == 1  # the pair with the over-long rejected answer is dropped ...
    assert pref["id"] == sft["id"]  # ... from the SFT control as well
