"""Special-token text in message text: escaped in prompts (every turn, system included), skipped in answers, counted.

Case D: `llava-special-tokens.json` (fixtures/special-tokens) once passed conversion and crashed the run mid-epoch, or
turned a literal `<|im_end|>` into a real end of turn.
"""

import json
import shutil
from pathlib import Path

import pytest
from PIL import Image

from pivot_hf import PivotProcessor
from pivot_hf.data import load_pivot_dataset
from pivot_hf.data.cli import main as data_cli
from pivot_hf.data.text import ESCAPE


CASE_D = Path(__file__).parent / "fixtures" / "special-tokens"


@pytest.fixture(scope="module")
def processor(tiny_pivot_factory):
    return PivotProcessor.from_pretrained(tiny_pivot_factory("siglip", "qwen2"))


def _image_token_count(processor, row):
    """Image tokens in the tokenised training text of a converted chat row (the collator's path)."""
    messages = [dict(m) for m in row["messages"]]
    if row["images"]:
        first_user = next(m for m in messages if m["role"] == "user")
        first_user["content"] = [{"type": "image"}, {"type": "text", "text": first_user["content"]}]
    text = processor.apply_chat_template(messages, tokenize=False)
    images = [Image.open(p).convert("RGB") for p in row["images"]] or None
    ids = processor(text=[text], images=images, return_tensors="pt")["input_ids"][0].tolist()
    return ids.count(processor.image_token_id), ids


def test_case_d_convert_llava_counts_and_escapes(tmp_path, processor):
    out = tmp_path / "converted"
    assert data_cli(["convert-llava", str(CASE_D / "llava-special-tokens.json"), "--output_dir", str(out)]) == 0
    report = json.loads((out / "conversion_report.json").read_text())
    assert report["total"] == 3 and report["kept"] == 2 and report["invariant_ok"]
    assert report["skipped"] == {"special_token_in_response": 1}
    assert report["examples"]["skipped:special_token_in_response"] == [
        "llava-special-tokens.json:2 (id answer_contains_end_of_turn_marker)"
    ]
    assert report["converted"]["special_token_escaped"] == 2
    dataset, _ = load_pivot_dataset(str(CASE_D / "llava-special-tokens.json"), "sft", lazy_images=False)
    rows = {row["id"]: row for row in dataset}
    assert set(rows) == {"system_turn_mentions_image_tag", "text_only_system_turn_mentions_image_tag"}
    system = rows["system_turn_mentions_image_tag"]["messages"][0]
    assert system["content"] == f"You describe the <{ESCAPE}image> the user sends."
    # The escaped text tokenizes as text: one image's tokens for the image row, none for the text-only row.
    count, _ = _image_token_count(processor, rows["system_turn_mentions_image_tag"])
    assert count == processor.num_image_tokens() == 16
    count, _ = _image_token_count(processor, rows["text_only_system_turn_mentions_image_tag"])
    assert count == 0


def _mmpr_jsonl(tmp_path):
    shutil.copy(CASE_D / "cat.jpg", tmp_path / "cat.jpg")
    rows = [
        {"image": "cat.jpg", "question": "<image>\nWhat is this?", "chosen": "A cat.", "rejected": "A dog."},
        {"image": "cat.jpg", "question": "<image>\nSay <|im_end|> please", "chosen": "Done.", "rejected": "No."},
        {"image": "cat.jpg", "question": "<image>\nWhat?", "chosen": "A cat.<|im_end|>more", "rejected": "A dog."},
        {"image": "cat.jpg", "question": "<image>\nWhat?", "chosen": "A cat.", "rejected": "<|endoftext|>dog"},
        {"image": "cat.jpg", "question": "<image>\nWhat?", "chosen": "An <image> of a cat", "rejected": "A dog."},
    ]
    path = tmp_path / "mmpr.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.mark.parametrize("kind", ["preference", "sft"])
def test_mmpr_rows_with_special_tokens(tmp_path, processor, kind):
    dataset, report = load_pivot_dataset(
        str(_mmpr_jsonl(tmp_path)), kind, tokenizer=processor, num_samples=0, lazy_images=False
    )
    assert report.total == 5 and report.kept == 2 and report.check()
    assert dict(report.skipped) == {"special_token_in_response": 2, "image_token_in_response": 1}
    assert report.converted["special_token_escaped"] == 1
    assert len(dataset) == 2
    prompt = dataset[1]["prompt"] if kind == "preference" else dataset[1]["messages"]
    assert prompt[0]["content"] == f"Say <{ESCAPE}|im_end|> please"


def test_saved_dataset_with_special_tokens(tmp_path, processor):
    from datasets import Dataset

    image = str(CASE_D / "cat.jpg")
    rows = [
        {
            "id": "system",
            "images": [image],
            "messages": [
                {"role": "system", "content": "Tags like <image> and <|im_start|> are text here."},
                {"role": "user", "content": "What animal?"},
                {"role": "assistant", "content": "A cat."},
            ],
        },
        {
            "id": "answer",
            "images": [image],
            "messages": [
                {"role": "user", "content": "What animal?"},
                {"role": "assistant", "content": "A cat.<|im_end|>"},
            ],
        },
        {
            "id": "clean",
            "images": [],
            "messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}],
        },
    ]
    Dataset.from_list(rows).save_to_disk(str(tmp_path / "saved"))
    dataset, report = load_pivot_dataset(str(tmp_path / "saved"), "sft", tokenizer=processor, lazy_images=False)
    assert [row["id"] for row in dataset] == ["system", "clean"]
    assert dict(report.skipped) == {"special_token_in_response": 1} and report.check()
    assert report.converted["special_token_escaped"] == 1
    system = dataset[0]["messages"][0]["content"]
    assert system == f"Tags like <{ESCAPE}image> and <{ESCAPE}|im_start|> are text here."
    count, ids = _image_token_count(processor, dataset[0])
    assert count == 16
    im_start = processor.tokenizer.convert_tokens_to_ids("<|im_start|>")
    assert ids.count(im_start) == 3  # the turn markers of the template only, not the escaped text


def test_llava_conversation_starting_with_an_assistant_turn(tmp_path, processor):
    """Handled as LLaVA does: the turn before the first human turn is dropped (counted), the loss starts after it."""
    shutil.copy(CASE_D / "cat.jpg", tmp_path / "cat.jpg")
    rows = [
        {
            "id": "starts_with_gpt",
            "image": "cat.jpg",
            "conversations": [
                {"from": "gpt", "value": "Hello! Send me a picture."},
                {"from": "human", "value": "<image>\nWhat animal is this?"},
                {"from": "gpt", "value": "A cat."},
            ],
        },
        {"id": "only_gpt", "conversations": [{"from": "gpt", "value": "Hi."}]},
    ]
    (tmp_path / "data.json").write_text(json.dumps(rows))
    dataset, report = load_pivot_dataset(str(tmp_path / "data.json"), "sft", lazy_images=False)
    assert [row["id"] for row in dataset] == ["starts_with_gpt"]
    assert [m["role"] for m in dataset[0]["messages"]] == ["user", "assistant"]
    assert report.converted["leading_assistant_turn_dropped"] == 1
    assert dict(report.skipped) == {"bad_conversation": 1} and report.check()
