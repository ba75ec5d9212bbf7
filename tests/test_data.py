"""Data issue: MMPR / LLaVA conversion, the paper's variants, accounting, lazy images and TRL collation."""

import json
import os

import numpy as np
import pytest
from PIL import Image

from pivot_hf.data import (
    ConversionReport,
    LlavaConfig,
    MMPRConfig,
    convert_llava,
    convert_mmpr,
    drop_overlong,
    is_new_distribution,
    load_image,
    load_pivot_dataset,
    sample_indices,
)
from pivot_hf.data.text import has_special_tokens, word_count


os.environ.setdefault("HF_HUB_OFFLINE", "1")
HERE = os.path.dirname(__file__)
MMPR = os.path.join(HERE, "fixtures", "mmpr-mini")
LLAVA = os.path.join(HERE, "fixtures", "llava-mini")
TOKENIZER = os.path.join(HERE, "fixtures", "qwen2.5-tokenizer")
QUIET = {"show_progress": False}


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(TOKENIZER)


def _mmpr_rows():
    rows = []
    for name in ("general_vqa_pairs", "reasoning_pairs"):
        with open(os.path.join(MMPR, "annotations", f"{name}.jsonl")) as f:
            rows += [(f"{name}:{i}", json.loads(line)) for i, line in enumerate(f) if line.strip()]
    return rows


# ---------------------------------------------------------------- MMPR on the real-image fixture


def test_mmpr_fixture_all_rows(tokenizer):
    result = convert_mmpr(MMPR, MMPRConfig(num_samples=None, **QUIET), tokenizer)
    report, pref, sft = result.report, result.preference, result.sft
    assert report.total == 10 and report.kept == 10 and report.check()
    assert len(pref) == len(sft) == 10
    assert pref["id"] == sft["id"] == [rid for rid, _ in _mmpr_rows()]  # file order when not sampling
    # 3 questions lacked "<image>\n"; coins.png is grayscale (mode L) and is used twice.
    assert report.converted["image_token_prepended"] == 3
    assert report.converted["image_mode_L_to_rgb"] == 2
    for row, (_, raw) in zip(pref, _mmpr_rows()):
        assert "<image>" not in row["prompt"][0]["content"]
        assert row["prompt"][0]["content"] == raw["question"].replace("<image>\n", "").strip()
        assert row["chosen"] == [{"role": "assistant", "content": raw["chosen"]}]
        assert row["rejected"] == [{"role": "assistant", "content": raw["rejected"]}]
        assert os.path.isabs(row["images"][0]) and row["images"][0].endswith(raw["image"])
    for p, s in zip(pref, sft):
        assert s["messages"] == p["prompt"] + p["chosen"] and s["images"] == p["images"]


def test_mmpr_seed_subset_and_order(tokenizer):
    def ids(seed):
        return convert_mmpr(MMPR, MMPRConfig(num_samples=6, seed=seed, **QUIET), tokenizer).preference["id"]

    first, again = ids(777), ids(777)
    assert first == again and len(first) == 6
    assert ids(1) != first  # another seed, another subset or order
    result = convert_mmpr(MMPR, MMPRConfig(num_samples=6, **QUIET), tokenizer)
    assert result.report.skipped["not_sampled"] == 4 and result.report.check()
    assert result.sft["id"] == result.preference["id"] == first


def test_mmpr_token_limit(tokenizer):
    limit = 40
    result = convert_mmpr(MMPR, MMPRConfig(num_samples=None, max_text_tokens=limit, **QUIET), tokenizer)
    expected = [
        rid
        for rid, raw in _mmpr_rows()
        if len(tokenizer("<image>\n" + raw["question"].replace("<image>\n", "") + raw["chosen"])["input_ids"]) > limit
    ]
    assert expected  # the long-answer row
    assert result.report.skipped["too_many_text_tokens"] == len(expected)
    assert not set(expected) & set(result.preference["id"])
    assert result.report.kept + len(expected) == 10


@pytest.mark.parametrize("variant", ["under30", "nothink"])
def test_mmpr_variants(variant):
    result = convert_mmpr(MMPR, MMPRConfig(num_samples=None, variant=variant, **QUIET))
    if variant == "under30":
        keep = [rid for rid, r in _mmpr_rows() if word_count(r["chosen"]) < 30]
    else:
        keep = [rid for rid, r in _mmpr_rows() if not has_special_tokens(r["chosen"]) and word_count(r["chosen"]) < 60]
    assert result.preference["id"] == keep
    assert result.report.skipped["variant_filtered"] == 10 - len(keep) > 0
    assert all(not has_special_tokens(m[0]["content"]) for m in result.preference["chosen"]) or variant == "under30"


def test_mmpr_new_distribution_ratio():
    rows = _mmpr_rows()
    n_new = sum(is_new_distribution(r["chosen"]) for _, r in rows)
    assert n_new == 1  # the <think> row (the long answer has < 100 words)
    result = convert_mmpr(MMPR, MMPRConfig(num_samples=2, new_distribution_ratio=50, **QUIET))
    kept = [is_new_distribution(m[0]["content"]) for m in result.preference["chosen"]]
    assert len(kept) == 2 and sum(kept) == 1
    result0 = convert_mmpr(MMPR, MMPRConfig(num_samples=4, new_distribution_ratio=0, **QUIET))
    assert not any(is_new_distribution(m[0]["content"]) for m in result0.preference["chosen"])
    assert result.report.check() and result0.report.check()


def test_mmpr_standard_format():
    result = convert_mmpr(MMPR, MMPRConfig(num_samples=None, prompt_format="standard", **QUIET))
    row = result.preference[0]
    assert row["prompt"] == "<image>\nWhat animal is shown in the image?" and isinstance(row["chosen"], str)
    assert result.sft[0]["completion"] == row["chosen"]


# ---------------------------------------------------------------- LLaVA


def test_llava_plain_and_chat():
    images = os.path.join(LLAVA, "images")
    plain, report = convert_llava(
        os.path.join(LLAVA, "pretrain.json"), LlavaConfig(template="plain", image_folder=images, **QUIET)
    )
    assert report.total == report.kept == 4 and report.check()
    assert plain["prompt"] == ["<image>"] * 4
    assert plain[0]["completion"] == "orange tabby cat looking to the side\n"
    assert report.converted["image_token_moved"] == 2  # "...\n<image>" captions prompts
    chat, report = convert_llava(os.path.join(LLAVA, "instruct.json"), LlavaConfig(image_folder=images, **QUIET))
    assert report.kept == 3 and len(chat[0]["messages"]) == 4
    assert chat[0]["messages"][0] == {"role": "user", "content": "What animal is this?"}
    assert chat[2]["images"] == [] and chat[2]["messages"][1]["content"] == "144."


def test_sampling_strategies():
    assert sample_indices(10, "all") == list(range(10))
    assert sample_indices(10, "first:3") == [0, 1, 2]
    assert sample_indices(10, "end:2") == [8, 9]
    assert sample_indices(10, "first:25%") == [0, 1, 2] == sample_indices(10, "25%")
    r = sample_indices(10, "random:4", seed=3)
    assert len(set(r)) == 4 and r == sample_indices(10, "random:4", seed=3)
    with pytest.raises(ValueError):
        sample_indices(10, "middle:3")


def test_llava_yaml_mixture(tmp_path):
    images = os.path.join(LLAVA, "images")
    rows = [
        {
            "id": f"r{i}",
            "image": "cat.jpg",
            "conversations": [{"from": "human", "value": f"q{i}"}, {"from": "gpt", "value": "a"}],
        }
        for i in range(10)
    ]
    (tmp_path / "a.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    (tmp_path / "b.json").write_text(json.dumps(rows))
    (tmp_path / "mix.yaml").write_text(
        "datasets:\n  - json_path: a.jsonl\n    sampling_strategy: first:3\n  - json_path: b.json\n    sampling_strategy: random:40%\n"
    )
    dataset, report = convert_llava(str(tmp_path / "mix.yaml"), LlavaConfig(image_folder=images, **QUIET))
    assert report.total == 20 and report.kept == 7 and report.skipped["not_sampled"] == 13 and report.check()
    assert dataset["id"][:3] == ["r0", "r1", "r2"]
    (tmp_path / "evil.yaml").write_text("datasets: !!python/object/apply:os.system ['echo pwned']\n")
    with pytest.raises(Exception, match="(?i)constructor|tag"):
        convert_llava(str(tmp_path / "evil.yaml"), LlavaConfig(**QUIET))


def test_onevision_parquet(tmp_path):
    import io

    import pyarrow as pa
    import pyarrow.parquet as pq

    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (10, 20, 30)).save(buf, format="PNG")
    conv = [{"from": "human", "value": "<image>\nColour?"}, {"from": "gpt", "value": "Dark blue."}]
    table = pa.table(
        {
            "id": ["ov0", "ov1", "ov2"],
            "image": [{"bytes": buf.getvalue(), "path": "x.png"}, None, {"bytes": b"garbage", "path": "y.png"}],
            "conversations": [conv, conv[:1] + [{"from": "gpt", "value": "text only"}], conv],
        }
    )
    pq.write_table(table, tmp_path / "ov.parquet")
    dataset, report = convert_llava(str(tmp_path / "ov.parquet"), LlavaConfig(**QUIET))
    assert report.total == 3 and report.kept == 2 and report.skipped["image_unreadable"] == 1 and report.check()
    assert np.asarray(load_image(dataset[0]["images"][0])).tolist()[0][0] == [10, 20, 30]
    assert dataset[1]["images"] == []


# ---------------------------------------------------------------- loader, saving, length filter, collators


def test_load_pivot_dataset_lazy_and_saved(tmp_path, tokenizer):
    from pivot_hf.data.cli import main

    dataset, report = load_pivot_dataset(MMPR, "preference", tokenizer=tokenizer, num_samples=5)
    raw = dataset.with_format(None)
    assert isinstance(raw[0]["images"][0], str)  # paths at rest
    image = dataset[0]["images"][0]
    assert isinstance(image, Image.Image) and image.mode == "RGB"  # pixels on access
    assert len(dataset) == report.kept == 5
    # Training drops unused columns; the lazy transform must survive it.
    assert isinstance(dataset.remove_columns(["id", "source"])[0]["images"][0], Image.Image)

    out = tmp_path / "out"
    assert (
        main(
            [
                "convert-mmpr",
                MMPR,
                "--output_dir",
                str(out),
                "--tokenizer",
                TOKENIZER,
                "--num_samples",
                "5",
                "--show_progress",
                "false",
                "--jsonl",
            ]
        )
        == 0
    )
    saved_report = json.loads((out / "conversion_report.json").read_text())
    assert saved_report["kept"] == 5 and saved_report["invariant_ok"]
    assert (out / "conversion_report.md").read_text().startswith("# Data conversion report")
    pref, _ = load_pivot_dataset(str(out), "preference")
    sft, _ = load_pivot_dataset(str(out), "sft")
    assert pref["id"] == sft["id"] == raw["id"]
    assert isinstance(pref[0]["images"][0], Image.Image)
    assert len((out / "sft.jsonl").read_text().splitlines()) == 5
    assert main(["inspect", str(out), "--kind", "sft", "--num_rows", "1"]) == 0


def test_drop_overlong(tokenizer):
    dataset, report = load_pivot_dataset(MMPR, "preference", tokenizer=tokenizer, num_samples=0)
    lengths = {}
    from pivot_hf.data import sequence_lengths

    raw = dataset.with_format(None)
    for row in raw:
        batch = {k: [v] for k, v in row.items()}
        lengths[row["id"]] = sequence_lengths(batch, tokenizer, 576)[0]
    max_length = sorted(lengths.values())[5]  # keeps exactly the 6 shortest (lengths are distinct here)
    kept = drop_overlong(dataset, tokenizer, max_length, 576, report)
    assert len(kept) == sum(v <= max_length for v in lengths.values())
    assert report.skipped["exceeds_max_length"] == 10 - len(kept) and report.kept == len(kept) and report.check()
    assert isinstance(kept[0]["images"][0], Image.Image)  # transform kept
    # Via the entry point, with the paper's 2048 limit and 576 image tokens everything fits.
    full, rep = load_pivot_dataset(
        MMPR, "sft", tokenizer=tokenizer, max_length=2048, num_image_tokens=576, num_samples=0
    )
    assert len(full) == 10 and "exceeds_max_length" not in rep.skipped


def _llava_processor(tokenizer):
    from transformers import LlavaProcessor, SiglipImageProcessor

    template = (
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{% if m['content'] is string %}{{ m['content'] }}"
        "{% else %}{% for p in m['content'] %}{% if p['type'] == 'image' %}<image>\n{% else %}{{ p['text'] }}"
        "{% endif %}{% endfor %}{% endif %}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    tok = __import__("copy").deepcopy(tokenizer)
    tok.add_special_tokens({"additional_special_tokens": ["<image>"]})
    return LlavaProcessor(
        image_processor=SiglipImageProcessor(size={"height": 32, "width": 32}),
        tokenizer=tok,
        patch_size=16,
        vision_feature_select_strategy="full",
        num_additional_image_tokens=0,
        chat_template=template,
        image_token="<image>",
    )


def test_trl_collators(tokenizer):
    from trl.trainer.dpo_trainer import DataCollatorForVisionPreference
    from trl.trainer.sft_trainer import DataCollatorForVisionLanguageModeling

    processor = _llava_processor(tokenizer)
    image_id = processor.tokenizer.convert_tokens_to_ids("<image>")
    pref, _ = load_pivot_dataset(MMPR, "preference", tokenizer=tokenizer, max_length=512, num_image_tokens=4)
    batch = DataCollatorForVisionPreference(processor)([pref[i] for i in range(3)])
    assert batch["pixel_values"].shape == (6, 3, 32, 32)  # chosen and rejected halves
    assert (batch["input_ids"] == image_id).sum(1).tolist() == [4] * 6  # 2x2 patches, one image each
    assert batch["completion_mask"].sum() > 0
    sft, _ = load_pivot_dataset(MMPR, "sft", tokenizer=tokenizer)
    out = DataCollatorForVisionLanguageModeling(processor)([sft[0], sft[1]])
    assert (out["input_ids"] == image_id).sum(1).tolist() == [4, 4]
    # LLaVA chat rows mixed with a text-only row, and plain (caption-only) rows with completion-only loss.
    images = os.path.join(LLAVA, "images")
    chat, _ = load_pivot_dataset(os.path.join(LLAVA, "instruct.json"), "sft", image_folder=images)
    out = DataCollatorForVisionLanguageModeling(processor)([chat[0], chat[2]])
    assert (out["input_ids"] == image_id).sum(1).tolist() == [4, 0]
    plain, _ = load_pivot_dataset(os.path.join(LLAVA, "pretrain.json"), "sft", template="plain", image_folder=images)
    out = DataCollatorForVisionLanguageModeling(processor, completion_only_loss=True)([plain[0]])
    labels = out["labels"][0][out["labels"][0] != -100]
    assert processor.tokenizer.decode(labels) == "orange tabby cat looking to the side\n"


def test_report_invariant_and_markdown():
    report = ConversionReport(source="x")
    report.add_total(3)
    report.keep(1)
    report.skip("broken_json", "a")
    report.skip("image_missing", "b")
    assert report.check()
    md = report.to_markdown()
    assert "`broken_json` | 1" in md and "| a |" in md
    with pytest.raises(KeyError):
        report.skip("made_up_reason")
