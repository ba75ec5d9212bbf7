"""MMPR (`OpenGVLab/MMPR-v1.2` layout) -> TRL preference rows and the paired SFT rows.

Format choice (TRL 1.16): rows are *conversational* with plain-string contents, e.g.
`{"images": [path], "prompt": [{"role": "user", "content": "What is shown?"}], "chosen": [{"role": "assistant",
"content": "A cat."}], "rejected": [...]}`. For vision rows `DPOTrainer` skips its own tokenisation and hands raw rows
to `DataCollatorForVisionPreference`, which calls `prepare_multimodal_messages(prompt, images)`: that inserts exactly
`len(images)` `{"type": "image"}` parts at the start of the first user turn, which is where the authors' recipe puts
`<image>\n`. String contents therefore cannot get a placeholder/image count mismatch, keep one simple Arrow schema for
image and text-only rows, and leave the rendering of the image token to the processor's chat template. The `<image>`
text itself is stripped from the question (it would otherwise be expanded a second time). `prompt_format="standard"`
gives plain strings instead (`prompt="<image>\\n..."`), for processors without a chat template.

The SFT rows come from the very same sampled rows: `{"images": [path], "messages": [user question, assistant chosen]}`
(the conversational language-modeling format `DataCollatorForVisionLanguageModeling` accepts).
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import numpy as np
from tqdm.auto import tqdm

from .contract import image_string_problem
from .images import DEFAULT_MAX_IMAGE_PIXELS, ImageCheck, check_image, resolve_image_path
from .report import ConversionReport
from .text import (
    IMAGE_TOKEN,
    escape_special_tokens,
    has_special_tokens,
    image_token_repair,
    special_tokens_in,
    strip_image_tokens,
    valid_text,
    word_count,
)


logger = logging.getLogger(__name__)


@dataclass
class MMPRConfig:
    """Rules of the authors' MMPR subset, plus the paper's data variants."""

    num_samples: int | None = field(
        default=20000, metadata={"help": "Rows to keep (seeded sample). None keeps every valid row, in file order."}
    )
    seed: int = field(default=777, metadata={"help": "Seed of the sample (the authors used 777)."})
    max_text_tokens: int | None = field(
        default=1500,
        metadata={"help": "Drop rows whose prompt + chosen exceed this many text tokens (needs a tokenizer)."},
    )
    variant: Literal["none", "under30", "nothink"] = field(
        default="none",
        metadata={
            "help": "Paper Table F: 'under30' = chosen < 30 words; 'nothink' = no <think>/<review> and < 60 words."
        },
    )
    new_distribution_ratio: float | None = field(
        default=None,
        metadata={
            "help": "Paper Fig. B: percentage (0-100) of kept rows drawn from the 'new distribution' (chosen > 100 "
            "words or containing <think>/<review>); the rest from the other rows. None: no quota."
        },
    )
    subsets: list[str] | None = field(default=None, metadata={"help": "Only these meta.json subsets (default: all)."})
    prompt_format: Literal["conversational", "standard"] = field(
        default="conversational",
        metadata={"help": "TRL row format: role/content messages (default) or plain strings with '<image>\\n'."},
    )
    max_image_pixels: int = field(
        default=DEFAULT_MAX_IMAGE_PIXELS, metadata={"help": "Skip larger images (decompression-bomb guard)."}
    )
    min_image_side: int = field(default=1, metadata={"help": "Skip images with a side shorter than this."})
    verify_images: bool = field(
        default=True, metadata={"help": "Decode every kept image once during conversion (pixels are not kept)."}
    )
    chunk_size: int = field(default=512, metadata={"help": "Rows validated and tokenised per batch."})
    show_progress: bool = field(default=True, metadata={"help": "Show tqdm progress bars."})


@dataclass
class MMPRConversion:
    """The paired outputs of one MMPR conversion: same rows, same order."""

    preference: Any  # datasets.Dataset
    sft: Any  # datasets.Dataset
    report: ConversionReport


def _read_meta(folder: str) -> dict[str, dict]:
    with open(os.path.join(folder, "meta.json"), encoding="utf-8-sig") as f:
        meta = json.load(f)
    if not isinstance(meta, dict):
        raise ValueError(f"{folder}/meta.json must map subset names to {{root, annotation, ...}}")
    return meta


def _index_lines(path: str) -> np.ndarray:
    """Byte offsets of the non-empty lines of a JSONL file: random access without holding the file in memory."""
    offsets = []
    pos = 0
    with open(path, "rb") as f:
        for line in f:
            if line.strip():
                offsets.append(pos)
            pos += len(line)
    return np.asarray(offsets, dtype=np.int64)


def is_new_distribution(chosen: str) -> bool:
    """The paper's 'new distribution' rows: long answers (> 100 words) or reasoning markers."""
    return word_count(chosen) > 100 or has_special_tokens(chosen)


def _variant_ok(chosen: str, variant: str) -> bool:
    if variant == "under30":
        return word_count(chosen) < 30
    if variant == "nothink":
        return not has_special_tokens(chosen) and word_count(chosen) < 60
    return True


def convert_mmpr_record(
    obj: Any,
    record_id: str,
    root: str,
    config: MMPRConfig,
    report: ConversionReport,
    image_cache: dict[str, ImageCheck] | None = None,
) -> dict | None:
    """Validate one MMPR annotation; return a candidate dict or None after counting the skip reason in `report`."""
    if not isinstance(obj, dict):
        report.skip("not_an_object", record_id)
        return None
    question, chosen, rejected = obj.get("question"), obj.get("chosen"), obj.get("rejected")
    if not (valid_text(question) and valid_text(chosen) and valid_text(rejected)):
        report.skip("invalid_text", record_id)
        return None
    image = obj.get("image")
    if isinstance(image, list | tuple):
        if len(image) > 1:
            report.skip("multi_image", record_id)
            return None
        image = image[0] if image else None
    if image is None or (isinstance(image, str) and not image.strip()):
        report.skip("no_image", record_id)
        return None
    if not isinstance(image, str):
        report.skip("invalid_image_field", record_id)
        return None
    if IMAGE_TOKEN in chosen or IMAGE_TOKEN in rejected:
        report.skip("image_token_in_response", record_id)
        return None
    if special_tokens_in(chosen) or special_tokens_in(rejected):
        report.skip("special_token_in_response", record_id)
        return None
    chosen, rejected = chosen.strip(), rejected.strip()
    if chosen == rejected:
        report.skip("chosen_equals_rejected", record_id)
        return None
    if not _variant_ok(chosen, config.variant):
        report.skip("variant_filtered", record_id)
        return None
    path, reason = resolve_image_path(root, image)
    reason = image_string_problem(image) or reason  # a URL / inline string is named as such, never fetched
    if reason is not None:
        report.skip(reason, record_id)
        return None
    check = image_cache.get(path) if image_cache is not None else None
    if check is None:
        if config.verify_images:
            check = check_image(path, config.max_image_pixels, config.min_image_side)
        else:
            check = ImageCheck(True)
        if image_cache is not None:
            image_cache[path] = check
    if not check.ok:
        report.skip(check.reason, record_id)
        return None
    question_text, count, at_start = strip_image_tokens(question)
    if not question_text:
        report.skip("invalid_text", record_id)
        return None
    repairs = []
    found = special_tokens_in(question_text)
    if found:  # `<image>` left after the placeholders were stripped is impossible; control tokens are escaped
        question_text = escape_special_tokens(question_text, found)
        repairs.append("special_token_escaped")
    repair = image_token_repair(count, at_start)
    if repair:
        repairs.append(repair)
    if check.format == "GIF" or path.lower().endswith(".gif"):
        repairs.append("gif_first_frame_to_rgb")
    if check.mode and check.mode != "RGB":
        repairs.append(f"image_mode_{check.mode}_to_rgb")
    return {
        "id": record_id,
        "image": path,
        "question": question_text,
        "chosen": chosen,
        "rejected": rejected,
        "new_distribution": is_new_distribution(chosen),
        "repairs": repairs,
    }


def build_rows(candidate: dict, source: str, prompt_format: str) -> tuple[dict, dict]:
    """One validated candidate -> (preference row, SFT row) in TRL's format."""
    images = [candidate["image"]]
    q, c, r = candidate["question"], candidate["chosen"], candidate["rejected"]
    if prompt_format == "standard":
        prompt = f"{IMAGE_TOKEN}\n{q}"
        pref = {
            "id": candidate["id"],
            "source": source,
            "images": images,
            "prompt": prompt,
            "chosen": c,
            "rejected": r,
        }
        sft = {"id": candidate["id"], "source": source, "images": images, "prompt": prompt, "completion": c}
        return pref, sft
    pref = {
        "id": candidate["id"],
        "source": source,
        "images": images,
        "prompt": [{"role": "user", "content": q}],
        "chosen": [{"role": "assistant", "content": c}],
        "rejected": [{"role": "assistant", "content": r}],
    }
    sft = {
        "id": candidate["id"],
        "source": source,
        "images": images,
        "messages": [{"role": "user", "content": q}, {"role": "assistant", "content": c}],
    }
    return pref, sft


def _text_token_counts(tokenizer, candidates: list[dict]) -> list[int]:
    # The authors counted the LLaVA-style text: "<image>\n" + question, then the chosen answer.
    texts = [f"{IMAGE_TOKEN}\n{c['question']}{c['chosen']}" for c in candidates]
    ids = tokenizer(texts, add_special_tokens=False)["input_ids"]
    return [len(x) for x in ids]


def convert_mmpr(folder: str, config: MMPRConfig | None = None, tokenizer=None) -> MMPRConversion:
    """Convert a local MMPR folder (`meta.json` + JSONL annotations + image roots) into paired DPO / SFT datasets.

    Rows are visited in the order of a seeded permutation of all annotation lines (file order when `num_samples` is
    None), validated, and kept until `num_samples` rows passed every rule. Unvisited rows count as `not_sampled`, so
    `report.kept + sum(report.skipped.values()) == report.total` always holds. Only line offsets are held in memory.
    """
    config = config or MMPRConfig()
    folder = os.path.abspath(folder)
    report = ConversionReport(source=folder)
    files: list[tuple[str, str, str]] = []  # (subset, annotation path, image root)
    for name, entry in _read_meta(folder).items():
        if config.subsets is not None and name not in config.subsets:
            continue
        if not isinstance(entry, dict) or not isinstance(entry.get("annotation"), str):
            report.notes.append(f"subset {name!r}: no annotation path in meta.json, ignored")
            continue
        ann = os.path.join(folder, entry["annotation"])
        root = os.path.join(folder, entry.get("root") or "")
        if not os.path.isfile(ann):
            report.notes.append(f"subset {name!r}: annotation file {ann} not found, ignored")
            continue
        files.append((name, ann, root))
    return convert_mmpr_files(files, config, tokenizer, report)


def convert_mmpr_files(
    files: list[tuple[str, str, str]],
    config: MMPRConfig | None = None,
    tokenizer=None,
    report: ConversionReport | None = None,
) -> MMPRConversion:
    """Convert MMPR-style JSONL files given as `(subset name, annotation path, image root)` triples."""
    config = config or MMPRConfig()
    report = report or ConversionReport(source=", ".join(ann for _, ann, _ in files))
    report.settings.update(asdict(config))
    offsets = [_index_lines(ann) for _, ann, _ in tqdm(files, desc="Indexing MMPR", disable=not config.show_progress)]
    counts = np.asarray([len(o) for o in offsets], dtype=np.int64)
    starts = np.concatenate([[0], np.cumsum(counts)])
    total = int(starts[-1])
    report.add_total(total)

    if config.num_samples is None:
        order = np.arange(total, dtype=np.int64)
        target = total
    else:
        order = np.random.default_rng(config.seed).permutation(total)
        target = min(int(config.num_samples), total)
    quota = None
    if config.new_distribution_ratio is not None:
        if not 0 <= float(config.new_distribution_ratio) <= 100:
            raise ValueError(
                f"new_distribution_ratio={config.new_distribution_ratio} must be a percentage in [0, 100]."
            )
        if 0 < float(config.new_distribution_ratio) <= 1:
            logger.warning(
                "new_distribution_ratio=%s is a percentage: %s%% of the rows, not a fraction. Fix: e.g. 50 for half.",
                config.new_distribution_ratio,
                config.new_distribution_ratio,
            )
        n_new = int(round(target * float(config.new_distribution_ratio) / 100.0))
        quota = {True: n_new, False: target - n_new}
    token_limit = config.max_text_tokens if tokenizer is not None else None
    if config.max_text_tokens is not None and tokenizer is None:
        report.notes.append("no tokenizer given: the max_text_tokens filter was not applied")

    handles = [open(ann, "rb") for _, ann, _ in files]
    image_cache: dict[str, ImageCheck] = {}
    kept: list[dict] = []
    taken = {True: 0, False: 0}
    visited = 0
    progress = tqdm(total=target, desc="Converting MMPR", disable=not config.show_progress)
    try:
        while visited < total and len(kept) < target:
            chunk = order[visited : visited + config.chunk_size]
            visited += len(chunk)
            candidates = []
            for gidx in chunk:
                f_idx = int(np.searchsorted(starts, gidx, side="right") - 1)
                line_no = int(gidx - starts[f_idx])
                subset, _, root = files[f_idx]
                record_id = f"{subset}:{line_no}"
                handle = handles[f_idx]
                handle.seek(int(offsets[f_idx][line_no]))
                raw = handle.readline()
                try:
                    obj = json.loads(raw.decode("utf-8-sig"))
                except (UnicodeDecodeError, json.JSONDecodeError):
                    report.skip("broken_json", record_id)
                    continue
                cand = convert_mmpr_record(obj, record_id, root, config, report, image_cache)
                if cand is not None:
                    cand["source"] = subset
                    candidates.append(cand)
            if token_limit is not None and candidates:
                lengths = _text_token_counts(tokenizer, candidates)
                survivors = []
                for cand, n in zip(candidates, lengths):
                    if n > token_limit:
                        report.skip("too_many_text_tokens", cand["id"])
                    else:
                        survivors.append(cand)
                candidates = survivors
            for cand in candidates:
                bucket = cand["new_distribution"]
                full = len(kept) >= target or (quota is not None and taken[bucket] >= quota[bucket])
                if full:
                    report.skip("not_sampled", cand["id"])
                    continue
                taken[bucket] += 1
                kept.append(cand)
                progress.update(1)
    finally:
        progress.close()
        for handle in handles:
            handle.close()
    if total - visited:
        report.skip("not_sampled", None, n=total - visited)
    if quota is not None and (taken[True] < quota[True] or taken[False] < quota[False]):
        report.notes.append(
            f"new-distribution quota not met: new {taken[True]}/{quota[True]}, other {taken[False]}/{quota[False]}"
        )
    if len(kept) < target:
        report.notes.append(f"only {len(kept)} valid rows for num_samples={config.num_samples}")

    pref_rows, sft_rows = [], []
    for cand in kept:
        for what in cand["repairs"]:
            report.convert(what, cand["id"])
        pref, sft = build_rows(cand, cand["source"], config.prompt_format)
        pref_rows.append(pref)
        sft_rows.append(sft)
    report.keep(len(kept))
    report.settings["kept_new_distribution"] = taken[True]
    return MMPRConversion(
        _to_dataset(pref_rows, "preference", config.prompt_format),
        _to_dataset(sft_rows, "sft", config.prompt_format),
        report,
    )


def _to_dataset(rows: list[dict], kind: str, prompt_format: str):
    import datasets

    if rows:
        return datasets.Dataset.from_list(rows)
    # An empty conversion still needs the right columns so that downstream code sees a well-formed dataset.
    msg = [{"role": datasets.Value("string"), "content": datasets.Value("string")}]
    text = datasets.Value("string") if prompt_format == "standard" else msg
    base = {"id": datasets.Value("string"), "source": datasets.Value("string"), "images": [datasets.Value("string")]}
    if kind == "preference":
        feats = {**base, "prompt": text, "chosen": text, "rejected": text}
    elif prompt_format == "standard":
        feats = {**base, "prompt": text, "completion": text}
    else:
        feats = {**base, "messages": msg}
    return datasets.Dataset.from_dict({k: [] for k in feats}, features=datasets.Features(feats))
