"""`make demo` (pivot_hf.demo): its data asks for what the probe measures, its tokenizer is Qwen2.5's on its texts, its
sentence follows the numbers, and the whole script writes the table, the sentence, the JSON, the Markdown and the PNG."""

import json
import re
import sys
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from pivot_hf import demo
from pivot_hf.testing import build_tiny_llm, qwen_tokenizer_path, small_qwen_tokenizer


def test_small_tokenizer_tokenizes_the_demo_texts_as_qwen_does(tmp_path):
    full = AutoTokenizer.from_pretrained(qwen_tokenizer_path())
    conversation = [
        {"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": "<image>\nWhat shape is the red object?"},
        {"role": "assistant", "content": "It is a circle."},
    ]
    rendered = full.apply_chat_template(conversation, tokenize=False)  # other turns than demo_texts() renders
    texts = demo.demo_texts()
    small = AutoTokenizer.from_pretrained(small_qwen_tokenizer(tmp_path / "tok", texts))
    assert len(small) < 1000 < len(full)
    for text in [*texts, rendered]:
        assert small.tokenize(text) == full.tokenize(text), text
    assert small.apply_chat_template(conversation, tokenize=False) == rendered
    # Text it was not cut for still round-trips (byte fallback), in more pieces than the full vocabulary needs.
    other = "Zebra 42 ünïcode"
    assert small.decode(small(other)["input_ids"]) == other
    assert len(small.tokenize(other)) > len(full.tokenize(other))
    assert (small.eos_token, small.pad_token) == (full.eos_token, full.pad_token)
    assert small.convert_ids_to_tokens(small.eos_token_id) == "<|im_end|>"
    llm = build_tiny_llm(tmp_path / "llm", tokenizer_path=tmp_path / "tok")
    assert json.loads((Path(llm) / "config.json").read_text())["vocab_size"] == len(small)


def test_shapes_data_asks_for_colour_and_for_shape(tmp_path):
    paths = demo.make_shapes_data(tmp_path / "d", 12, seed=5)
    meta = json.loads((tmp_path / "d" / "meta.json").read_text())
    assert set(meta) == {"colour", "shape"} and all(m["length"] == 12 for m in meta.values())
    for kind, values in (("colour", demo.COLOURS), ("shape", demo.SHAPES)):
        rows = [json.loads(line) for line in Path(paths[kind]).read_text().splitlines()]
        assert len(rows) == 12
        for row in rows:
            _, colour, shape = Path(row["image"]).stem.split("_")
            right = colour if kind == "colour" else shape
            other = shape if kind == "colour" else colour
            # The question names only the other attribute; the answers differ only in the asked one.
            assert other in row["question"] and not any(v in row["question"] for v in values)
            assert right in row["chosen"].split(" ")[-1]
            wrong = row["rejected"].split(" ")[-1].rstrip(".")
            assert wrong in values and wrong != right
            assert row["chosen"].replace(right, wrong) == row["rejected"]

    from pivot_hf.data import load_pivot_dataset

    dataset, _ = load_pivot_dataset(paths["mmpr"], "preference", num_samples=-1)
    assert len(dataset) == 24  # both questions of every image reach Stage 2


def test_probe_data_labels_the_same_images_by_colour_and_by_shape(tmp_path):
    folders = demo.make_probe_data(tmp_path, num_train=10, num_test=6, seed=0)
    for split, count in (("train", 10), ("test", 6)):
        by = {a: sorted(Path(folders[a], split).glob("*/*.png")) for a in demo.ATTRIBUTES}
        assert [p.name for p in sorted(by["colour"], key=lambda p: p.name)] == sorted(p.name for p in by["shape"])
        assert len(by["colour"]) >= count  # plus one image per class the random draw missed
        for attribute, position in (("colour", 1), ("shape", 2)):
            assert all(p.parent.name == p.stem.split("_")[position] for p in by[attribute])


def test_probe_data_has_every_class_in_both_splits_whatever_the_count(tmp_path):
    """The probe refuses a test class without train images: small `--probe_images` must not draw one (it did, after
    all the training, with `--probe_images 4`)."""
    for count in (1, 2, 4, 5):
        folders = demo.make_probe_data(tmp_path / str(count), num_train=count, num_test=count, seed=3000)
        for attribute, classes in (("colour", set(demo.COLOURS)), ("shape", set(demo.SHAPES))):
            for split in ("train", "test"):
                assert {p.name for p in Path(folders[attribute], split).iterdir()} == classes, (count, split)
    # A draw that already covers every class is kept as it is (the default demo's images do not change).
    big = demo.make_probe_data(tmp_path / "big", num_train=120, num_test=120, seed=3000)
    assert len(list(Path(big["colour"], "train").glob("*/*.png"))) == 120


def test_the_sentence_follows_the_numbers():
    assert demo.compare([0.8, 0.82, 0.81], [0.6], 0.01)[0] == "above"
    assert demo.compare([0.4, 0.42, 0.41], [0.6], 0.01)[0] == "below"
    assert demo.compare([0.5, 0.7, 0.6], [0.58, 0.62, 0.6], 0.01)[0] == "level with"  # inside the seed spread
    assert demo.compare([0.605], [0.6], 0.01)[0] == "level with"  # under one test image
    probe = {
        "colour": {"base": [0.7], "sft": [0.70, 0.72, 0.71], "pivot": [0.90, 0.91, 0.92]},
        "shape": {"base": [0.6], "sft": [0.3, 0.9, 0.6], "pivot": [0.40, 0.41, 0.42]},
    }
    sentence = demo.verdict(probe, num_test=100, num_seeds=3)
    assert "3 seeds, 100 probe test images" in sentence
    assert "on colour above the base encoder (+0.210) and above SFT (+0.200)" in sentence
    assert "on shape below the base encoder (-0.190) and level with SFT (-0.190)" in sentence
    flipped = {a: {"base": v["base"], "sft": v["pivot"], "pivot": v["sft"]} for a, v in probe.items()}
    assert "on colour level with the base encoder (+0.010) and below SFT (-0.200)" in demo.verdict(flipped, 100, 3)


def test_a_failed_training_job_stops_the_demo_with_its_log(tmp_path):
    ok = [sys.executable, "-c", "print('fine')"]
    bad = [sys.executable, "-c", "import sys; print('the reason'); sys.exit(3)"]
    seconds = demo.run_jobs([("a", ok, tmp_path / "a.log"), ("b", ok, tmp_path / "b.log")], parallel=2)
    assert set(seconds) == {"a", "b"} and (tmp_path / "a.log").read_text() == "fine\n"
    with pytest.raises(SystemExit, match="(?s)b failed.*the reason"):
        demo.run_jobs([("b", bad, tmp_path / "b.log")], parallel=2)


@pytest.mark.slow
def test_demo_end_to_end_writes_the_table_sentence_and_chart(tmp_path, capsys):
    argv = ["--output_dir", str(tmp_path), "--seeds", "2", "--train_images", "8", "--eval_images", "4"]
    argv += ["--probe_images", "12", "--stage1_steps", "2", "--stage2_steps", "2"]
    summary = demo.main(argv)
    printed = capsys.readouterr().out
    assert "class = colour" in printed and "class = shape" in printed
    assert summary["sentence"] in printed and "At this toy scale (2 seeds, 12 probe test images)" in printed
    # Per-seed spread: SFT and PIVOT have one probe value per seed, the shared base encoder one in all.
    for attribute in demo.ATTRIBUTES:
        assert [len(summary["probe"][attribute][e]) for e in demo.ENCODERS] == [1, 2, 2]
        assert all(0 <= v <= 1 for e in demo.ENCODERS for v in summary["probe"][attribute][e])
    assert re.search(r"pivot\s+2\s+\d\.\d{3} ± \d\.\d{3}", printed)
    png = (tmp_path / "probe.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    markdown = (tmp_path / "results.md").read_text()
    assert summary["sentence"] in markdown and "![probe](probe.png)" in markdown
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["probe"] == summary["probe"] and saved["cpu_seconds"]["user"] > 0
    # Every Stage-2 run trained the vision tower (the thing PIVOT exports).
    for name, entry in saved["mllm"].items():
        if entry["method"] != "stage1":
            changed, total = entry["vision_changed"]
            assert changed == total > 0, name
