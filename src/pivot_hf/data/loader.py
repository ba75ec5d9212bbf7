"""The single entry the training recipes call: `load_pivot_dataset`, plus length filtering and saving."""

from __future__ import annotations

import json
import os
from typing import Any, Literal, NamedTuple

from .contract import apply_row_contract
from .images import DEFAULT_MAX_IMAGE_PIXELS, LazyImages
from .llava import LlavaConfig, convert_llava
from .mmpr import MMPRConfig, convert_mmpr, convert_mmpr_files
from .report import ConversionReport


PREFERENCE_DIR, SFT_DIR = "preference", "sft"


class _Pair(NamedTuple):
    """Preference and SFT rows of the same sampled pairs (an MMPR conversion, fresh or saved)."""

    preference: Any
    sft: Any


class PivotData(NamedTuple):
    """What `load_pivot_dataset` returns; unpacks as `dataset, report = load_pivot_dataset(...)`."""

    dataset: Any  # datasets.Dataset
    report: ConversionReport


def _text_tokenizer(tokenizer):
    # A processor carries its tokenizer; length checks only need the text side.
    return getattr(tokenizer, "tokenizer", tokenizer)


def _render(renderer, messages: list[dict]) -> str:
    if getattr(renderer, "chat_template", None):
        return renderer.apply_chat_template(messages, tokenize=False)
    return "\n".join(m["content"] for m in messages)


# What `sequence_lengths` reads from a row.
LENGTH_COLUMNS = ("images", "image", "messages", "prompt", "chosen", "rejected", "completion")


def sequence_lengths(batch: dict[str, list], tokenizer, num_image_tokens) -> list[int]:
    """Upper bound of the training sequence length of each row: text tokens + image tokens (+1 per image for its
    placeholder/separator, to stay conservative). For preference rows it is the longer of prompt+chosen and
    prompt+rejected."""
    tok = _text_tokenizer(tokenizer)
    # Render with the processor's own chat template when given one: it is what training uses (it may add a system
    # prompt the bare tokenizer's template does not, and a base LLM's tokenizer may have no template at all).
    renderer = tokenizer if getattr(tokenizer, "chat_template", None) else tok
    n = len(next(iter(batch.values())))
    texts: list[list[str]] = []
    for i in range(n):
        if "messages" in batch:
            texts.append([_render(renderer, batch["messages"][i])])
        elif "chosen" in batch:
            prompt, chosen, rejected = batch["prompt"][i], batch["chosen"][i], batch["rejected"][i]
            if isinstance(prompt, list):
                texts.append([_render(renderer, prompt + chosen), _render(renderer, prompt + rejected)])
            else:
                texts.append([prompt + chosen, prompt + rejected])
        else:
            prompt, completion = batch["prompt"][i], batch["completion"][i]
            texts.append([_render(renderer, prompt + completion) if isinstance(prompt, list) else prompt + completion])
    flat = [t for group in texts for t in group]
    ids = tok(flat, add_special_tokens=False)["input_ids"] if flat else []
    lengths, k = [], 0
    for i, group in enumerate(texts):
        images = _images_of(batch, i)
        if callable(num_image_tokens):
            image_tokens = sum(num_image_tokens(image) + 1 for image in images)
        else:
            image_tokens = len(images) * (num_image_tokens + 1)
        lengths.append(max(len(ids[k + j]) for j in range(len(group))) + image_tokens)
        k += len(group)
    return lengths


def _images_of(batch: dict[str, list], i: int) -> list:
    """Row `i`'s images, from an `images` list or TRL's single `image` column (counted alike)."""
    if "images" in batch:
        return list(batch["images"][i] or [])
    if "image" in batch and batch["image"][i] is not None:
        return [batch["image"][i]]
    return []


def image_size(image) -> tuple[int, int]:
    """`(width, height)` of an image as it will be shown to the model (EXIF orientation applied), from its header.

    `image` is a path, a `{"path", "bytes"}` dict (a `datasets.Image` that is not decoded) or a PIL image.
    """
    import io

    from PIL import Image

    if isinstance(image, Image.Image):
        return image.size
    if isinstance(image, dict):
        image = io.BytesIO(image["bytes"]) if image.get("bytes") else image["path"]
    with Image.open(image) as img:
        width, height = img.size
        orientation = img.getexif().get(0x0112)
    return (height, width) if orientation in (5, 6, 7, 8) else (width, height)


def image_token_measure(processor):
    """What the length filter counts per image: an int for fixed-resolution towers, for variable-resolution ones
    (SigLIP2 NaFlex) a function measuring each image's real count from its size (cached per size)."""
    if not getattr(processor, "variable_resolution", False):
        return processor.num_image_tokens()
    cache: dict[tuple[int, int], int] = {}

    def measure(image) -> int:
        size = image_size(image)
        if size not in cache:
            cache[size] = processor.num_image_tokens(size)
        return cache[size]

    return measure


def drop_overlong(
    dataset,
    tokenizer,
    max_length: int,
    num_image_tokens: int,
    report: ConversionReport | None = None,
    batch_size: int = 512,
):
    """Drop rows whose text + `num_image_tokens` per image cannot fit `max_length`; count them as `exceeds_max_length`.

    `num_image_tokens` is an int, or a function of one image (path / PIL image) for variable-resolution towers
    (`image_token_measure`), which is then called on each row's images.

    TRL's vision collators truncate to `max_length` *after* the processor expanded each image into its tokens; a cut
    inside the image tokens makes the model fail mid-epoch with "image features and image tokens do not match". Rows
    are dropped before training instead. `num_image_tokens` is the model's count (e.g. 576 for SigLIP2 384/16). The
    dataset's transform (lazy images) is kept: the lengths are computed on the raw columns, no image is opened.
    """
    raw = dataset.with_format(None)
    for column in ("images", "image"):
        feature = raw.features.get(column) if raw.features else None
        if feature is not None and _has_decoded_images(feature):
            # Only the number of images per row (and their sizes, from headers) matters: never decode pixels here.
            raw = raw.cast_column(column, _without_decoding(feature))
    columns = [c for c in ("id", *LENGTH_COLUMNS) if c in raw.column_names]
    keep, dropped = [], []
    start = 0
    for batch in raw.select_columns(columns).iter(batch_size=batch_size):
        lengths = sequence_lengths(batch, tokenizer, num_image_tokens)
        for j, length in enumerate(lengths):
            if length <= max_length:
                keep.append(start + j)
            else:
                dropped.append(str(batch["id"][j]) if "id" in batch else str(start + j))
        start += len(lengths)
    if report is not None and dropped:
        report.move_kept_to_skipped("exceeds_max_length", dropped)
    if not dropped:
        return dataset
    return dataset.select(keep)


def _has_decoded_images(feature) -> bool:
    import datasets

    if isinstance(feature, datasets.Image):
        return feature.decode
    inner = getattr(feature, "feature", None)
    return inner is not None and _has_decoded_images(inner)


def _without_decoding(feature):
    import datasets

    if isinstance(feature, datasets.Image):
        return datasets.Image(decode=False)
    return datasets.List(_without_decoding(feature.feature))


def _saved_dataset_path(path: str, kind: str) -> str | None:
    """A folder written by `save_to_disk` (or one of ours, with `preference/` and `sft/` inside)."""
    sub = os.path.join(path, PREFERENCE_DIR if kind == "preference" else SFT_DIR)
    for candidate in (sub, path):
        if os.path.isfile(os.path.join(candidate, "state.json")) or os.path.isfile(
            os.path.join(candidate, "dataset_dict.json")
        ):
            return candidate
    return None


def _is_mmpr_jsonl(path: str) -> bool:
    """A JSONL file of MMPR rows (question / chosen / rejected) rather than LLaVA conversations."""
    if not path.endswith(".jsonl"):
        return False
    with open(path, encoding="utf-8-sig", errors="replace") as f:
        for line in f:
            if line.strip():
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError:
                    continue
                return isinstance(obj, dict) and "chosen" in obj and "conversations" not in obj
    return False


def load_pivot_dataset(
    dataset_name: str,
    kind: Literal["preference", "sft"],
    *,
    tokenizer=None,
    max_length: int | None = None,
    num_image_tokens: int | None = None,
    num_samples: int | None = None,
    seed: int = 777,
    split: str = "train",
    template: Literal["chat", "plain"] = "chat",
    image_folder: str | None = None,
    variant: Literal["none", "under30", "nothink"] = "none",
    new_distribution_ratio: float | None = None,
    max_text_tokens: int | None = 1500,
    prompt_format: Literal["conversational", "standard"] = "conversational",
    lazy_images: bool = True,
    show_progress: bool = False,
    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
) -> PivotData:
    """Load any PIVOT data source as a `datasets.Dataset` of TRL rows, with its conversion report.

    Args:
        dataset_name: one of
            - a local MMPR folder (`meta.json` + JSONL annotations + image roots) or an MMPR-style `.jsonl` file
              (`question`/`chosen`/`rejected`/`image`; images relative to `image_folder` or the file's folder);
            - a LLaVA `.json` / `.jsonl` / OneVision `.parquet` file, a folder of them, or a LLaVA-NeXT mixture
              `.yaml` (images under `image_folder`, default the data file's folder);
            - a folder written by `save_to_disk` (ours holds `preference/` and `sft/` subfolders);
            - otherwise a Hub dataset id, read with `datasets.load_dataset(dataset_name, split=split)`; it must already
              hold TRL columns (not exercised offline).
        kind: `"preference"` -> `{"id", "images", "prompt", "chosen", "rejected"}` rows for `DPOTrainer`;
            `"sft"` -> `{"id", "images", "messages"}` (or `prompt`/`completion` with `template="plain"`) rows for
            `SFTTrainer`. For MMPR, both kinds are built from the same sampled rows in the same order.
        tokenizer: tokenizer (or processor) for the `max_text_tokens` rule and the `max_length` check.
        max_length, num_image_tokens: when both are given (and a tokenizer), rows that cannot fit `max_length` with
            `num_image_tokens` tokens per image are dropped and counted (`exceeds_max_length`). When `tokenizer` is a
            processor, its own count is used instead, measured per image for variable-resolution towers.
        num_samples: rows to keep. None: MMPR keeps the recipe's 20,000, other sources keep everything; <= 0: all.
        seed: sampling seed (777 in the authors' scripts); the same seed gives the same rows in the same order.
        split: split of a Hub dataset or a saved `DatasetDict`.
        template: LLaVA rows: `chat` (multi-turn messages) or `plain` (image + caption, projector pretraining).
        image_folder: image root of LLaVA data / MMPR-style JSONL.
        variant, new_distribution_ratio, max_text_tokens, prompt_format: see `MMPRConfig`.
        lazy_images: attach `LazyImages` so `images` hold paths on disk and become RGB PIL images on access.
        max_image_pixels: pixels per image above which a row is skipped (`image_too_large`, decompression bombs).

    Every route ends in the row contract (`pivot_hf.data.contract.apply_row_contract`): unreadable, oversized, URL or
    inline images, special-token text in answers, empty or identical answers and rows too long for `max_length` are
    skipped and counted in the report, whatever the source.

    Returns:
        `PivotData(dataset, report)`; `report.kept == len(dataset)` and `report.check()` holds.
    """
    import datasets

    if kind not in ("preference", "sft"):
        raise ValueError(f"kind must be 'preference' or 'sft', got {kind!r}")
    all_rows = num_samples is not None and num_samples <= 0
    path = os.path.expanduser(dataset_name)
    tok = _text_tokenizer(tokenizer) if tokenizer is not None else None
    mmpr_config = MMPRConfig(
        num_samples=None if all_rows else (num_samples or 20000),
        seed=seed,
        max_text_tokens=max_text_tokens,
        variant=variant,
        new_distribution_ratio=new_distribution_ratio,
        prompt_format=prompt_format,
        show_progress=show_progress,
    )
    saved = _saved_dataset_path(path, kind) if os.path.isdir(path) else None
    mmpr = None  # an MMPR conversion, whose SFT rows must stay the same rows as its preference pairs
    if saved is not None:
        dataset = datasets.load_from_disk(saved)
        if isinstance(dataset, datasets.DatasetDict):
            dataset = dataset[split]
        report = ConversionReport(source=saved, total=len(dataset), kept=len(dataset))
        report_path = os.path.join(os.path.dirname(saved), "conversion_report.json")
        if os.path.isfile(report_path):
            report.notes.append(f"conversion report of this dataset: {report_path}")
        sample = num_samples is not None and not all_rows and num_samples < len(dataset)
        if sample:
            report.move_kept_to_skipped("not_sampled", n=len(dataset) - num_samples)
            dataset = dataset.shuffle(seed=seed).select(range(num_samples))
        paired = _saved_dataset_path(path, "preference") if kind == "sft" else None
        if paired is not None and paired != saved:
            # One of our conversions: the SFT control must keep exactly the pairs the DPO run keeps (below).
            preference = datasets.load_from_disk(paired)
            if isinstance(preference, datasets.DatasetDict):
                preference = preference[split]
            if sample:
                preference = preference.shuffle(seed=seed).select(range(num_samples))
            mmpr = _Pair(preference=preference, sft=dataset)
    elif os.path.isdir(path) and os.path.isfile(os.path.join(path, "meta.json")):
        mmpr = convert_mmpr(path, mmpr_config, tok)
        dataset, report = (mmpr.preference if kind == "preference" else mmpr.sft), mmpr.report
    elif os.path.isfile(path) and _is_mmpr_jsonl(path):
        root = image_folder or os.path.dirname(os.path.abspath(path))
        name = os.path.splitext(os.path.basename(path))[0]
        mmpr = convert_mmpr_files([(name, path, root)], mmpr_config, tok)
        dataset, report = (mmpr.preference if kind == "preference" else mmpr.sft), mmpr.report
    elif os.path.exists(path):
        if kind == "preference":
            raise ValueError(f"{dataset_name}: LLaVA conversation data has no preference pairs; use kind='sft'")
        config = LlavaConfig(template=template, image_folder=image_folder, seed=seed, show_progress=show_progress)
        dataset, report = convert_llava(path, config)
        if num_samples is not None and not all_rows and num_samples < len(dataset):
            report.move_kept_to_skipped("not_sampled", n=len(dataset) - num_samples)
            dataset = dataset.shuffle(seed=seed).select(range(num_samples))
    else:
        # Hub id. MMPR-v1.2 itself ships zipped images: download and unpack it, then pass the folder instead.
        dataset = datasets.load_dataset(dataset_name, split=split)
        needed = {"prompt", "chosen", "rejected"} if kind == "preference" else {"messages"}
        if not needed <= set(dataset.column_names) and not {"prompt", "completion"} <= set(dataset.column_names):
            raise ValueError(
                f"{dataset_name}: Hub dataset lacks TRL columns {sorted(needed)}; download it and pass the local "
                "MMPR / LLaVA folder instead"
            )
        report = ConversionReport(source=dataset_name, total=len(dataset), kept=len(dataset))

    # Every route ends here: the row contract (images, special tokens, degenerate pairs, lengths measured per image).
    check_length = max_length is not None and num_image_tokens is not None
    if check_length and tok is None:
        report.notes.append("max_length given without a tokenizer: overlong rows were not checked")
    contract = dict(
        processor=tokenizer,
        max_image_pixels=max_image_pixels,
        max_length=max_length if check_length and tok is not None else None,
        num_image_tokens=num_image_tokens,
        lazy_images=False,
    )
    if mmpr is not None:
        # A pair is measured by its longer answer; the SFT control keeps exactly the pairs that pass, so that SFT and
        # DPO train on the same rows (the paper's controlled comparison).
        preference, report = apply_row_contract(mmpr.preference, "preference", report=report, **contract)
        if kind == "preference":
            dataset = preference
        else:
            kept = set(preference.with_format(None)["id"])
            sft, _ = apply_row_contract(mmpr.sft, "sft", **{**contract, "max_length": None})
            sft_ids = sft.with_format(None)["id"]
            dataset = sft.select([i for i, row_id in enumerate(sft_ids) if row_id in kept])
    else:
        dataset, report = apply_row_contract(dataset, kind, report=report, **contract)
    if lazy_images and ("images" in dataset.column_names or "image" in dataset.column_names):
        dataset = dataset.with_transform(LazyImages(max_pixels=max_image_pixels))
    return PivotData(dataset, report)


def save_dataset(dataset, output_dir: str, jsonl: bool = False) -> str:
    """`save_to_disk` the raw rows (paths, not pixels) so `dataset_name: <output_dir>` works; optionally also JSONL."""
    raw = dataset.with_format(None)
    raw.save_to_disk(output_dir)
    if jsonl:
        raw.to_json(output_dir.rstrip("/") + ".jsonl", lines=True, force_ascii=False)
    return output_dir
