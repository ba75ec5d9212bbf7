"""The row contract: the one check every row passes before any compute, whatever route brought it.

Routes (MMPR folders, LLaVA JSON / OneVision parquet / YAML mixtures, saved `datasets` folders, Hub ids, GRPO JSONL and
saved GRPO data) end in `load_pivot_dataset` / `load_grpo_dataset`, which call `apply_row_contract`; and the Pivot
trainers call it again on whatever `train_dataset` / `eval_dataset` they are handed (a `Dataset` built by hand, an
`IterableDataset`, the output of a loader). A row can therefore not reach a forward pass without passing here. The
second pass over an already checked dataset is cheap: image verdicts are cached per file (path, size, mtime) or per
content digest of in-memory bytes.

What a row must satisfy (each failure is a counted skip naming the record id and the reason in the run's
`data_report.json`; `SKIP_REASONS` has the wording):

- images (`images` list or `image`): each is a local path, a `{"bytes", "path"}` dict (`datasets.Image`) or a PIL
  image; it decodes fully and has at most `max_image_pixels` pixels (decompression bombs are skipped from their header,
  never decoded). Strings that are URLs are refused (`image_is_url`: nothing is ever fetched; download the files and
  point the rows at them); `data:` URIs and base64 payloads are refused too (`image_inline_data`: store the bytes in a
  `datasets.Image` column instead), so no string is ever guessed to be an image;
- text: special-token text (`<|im_end|>`, the image token, any special token of the tokenizer) typed into a prompt is
  escaped, in an answer it skips the row (`special_token_in_response`), as in the converters;
- preference rows: an empty `chosen` or `rejected` (`invalid_text`), identical answers (`chosen_equals_rejected`);
  SFT rows: no non-empty assistant answer (`invalid_text`);
- GRPO rows: a `solution` that is missing, null, empty or the string of a missing value (`"None"`, `"null"`,
  `"nan"`) is `missing_answer`: such a row cannot be rewarded (and the rewards give 0 to it anyway);
- lengths: with `max_length` and a processor (the loaders and the Pivot SFT/DPO trainers pass theirs), text + image
  tokens measured per image (variable-resolution towers) must fit (`exceeds_max_length`): such a row is dropped on
  every route, never left to TRL's truncation, which can cut inside the image tokens.

A row whose image becomes unreadable after the check (a file deleted mid-run) is caught at collate time by
`LazyImages` + `pivot_hf.trainer.row_contract.CollateGuard`: skipped and counted once per row
(`image_unreadable_at_collate`), never fatal.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import os
import re
import threading
from typing import Any, Literal

from .images import DEFAULT_MAX_IMAGE_PIXELS, check_image
from .report import ConversionReport
from .text import IMAGE_TOKEN, escape_special_tokens, special_tokens_in


Kind = Literal["preference", "sft", "grpo"]

_URL_RE = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*://")
_BASE64_RE = re.compile(r"^[A-Za-z0-9+/\r\n]{200,}={0,2}$")
# The string forms a missing value takes once something called `str()` on it (JSON null, pandas NaN).
MISSING_ANSWER_STRINGS = frozenset({"", "none", "null", "nan"})

# Verdicts of `check_image` per file state / per content digest: a second pass over the same images (the loader, then
# the trainer) costs one `stat` per file instead of a decode.
_VERDICTS: dict[tuple, str | None] = {}
_VERDICTS_LOCK = threading.Lock()


def image_string_problem(source: str) -> str | None:
    """`image_is_url` / `image_inline_data` for strings that are not local paths (the stated policy: never fetch a
    URL, never guess that a string is encoded pixels), else None."""
    text = source.strip()
    if text.startswith("data:"):
        return "image_inline_data"
    if _URL_RE.match(text):
        return "image_is_url"
    if len(text) >= 200 and _BASE64_RE.match(text) and not os.path.exists(text):
        try:
            base64.b64decode(text[:4000], validate=False)
            return "image_inline_data"
        except (binascii.Error, ValueError):
            return None
    return None


def image_problem(source: Any, max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS, base_dir: str | None = None) -> str | None:
    """The skip reason of one image as a row holds it (path, `{"bytes", "path"}` dict, PIL image), or None if it
    decodes fully within `max_pixels`."""
    from PIL import Image

    if isinstance(source, Image.Image):
        return "image_too_large" if source.size[0] * source.size[1] > max_pixels else None
    if isinstance(source, dict):
        data = source.get("bytes")
        if data:
            return _verdict(("bytes", hashlib.blake2b(data, digest_size=16).digest(), max_pixels), data, max_pixels)
        source = source.get("path")
    if isinstance(source, bytes | bytearray):
        digest = hashlib.blake2b(source, digest_size=16).digest()
        return _verdict(("bytes", digest, max_pixels), bytes(source), max_pixels)
    if not isinstance(source, str) or not source.strip():
        return "invalid_image_field"
    problem = image_string_problem(source)
    if problem:
        return problem
    path = source if base_dir is None or os.path.isabs(source) else os.path.join(base_dir, source)
    try:
        st = os.stat(path)
    except OSError:
        return "image_missing"
    return _verdict(("file", os.path.realpath(path), st.st_size, st.st_mtime_ns, max_pixels), path, max_pixels)


def _verdict(key: tuple, source, max_pixels: int) -> str | None:
    with _VERDICTS_LOCK:
        if key in _VERDICTS:
            return _VERDICTS[key]
    reason = check_image(source, max_pixels).reason
    with _VERDICTS_LOCK:
        if len(_VERDICTS) > 1_000_000:  # bounded: a verdict is ~200 bytes
            _VERDICTS.clear()
        _VERDICTS[key] = reason
    return reason


def row_images(row: dict) -> list:
    """The images of a TRL row (`images` list or single `image`), as stored."""
    if row.get("images") is not None:
        images = row["images"]
        return list(images) if isinstance(images, list | tuple) else [images]
    if row.get("image") is not None:
        return [row["image"]]
    return []


def text_of(value) -> str:
    """The text of a message list / string / multimodal content, concatenated (for emptiness and equality checks)."""
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    if isinstance(value, dict):
        content = value.get("content", value.get("text"))
        return text_of(content) if not isinstance(content, str) else content
    if isinstance(value, list):
        return "".join(text_of(part) for part in value if not (isinstance(part, dict) and part.get("type") == "image"))
    return str(value)


def missing_answer(solution) -> bool:
    """Whether a GRPO ground truth is absent: None, not a string/number, empty, or a stringified missing value."""
    if solution is None or isinstance(solution, bool):
        return True
    if isinstance(solution, int | float):
        return solution != solution  # NaN
    if not isinstance(solution, str):
        return True
    return solution.strip().lower() in MISSING_ANSWER_STRINGS


class SpecialTokenPolicy:
    """Special-token text: escaped in prompts (system / user turns), a skipped row in answers."""

    def __init__(self, processor=None):
        tok = getattr(processor, "tokenizer", processor)
        self.tokens = list(getattr(tok, "all_special_tokens", []) or []) if tok is not None else []
        self.image_token = getattr(processor, "image_token", None) or getattr(tok, "image_token", None) or IMAGE_TOKEN

    def on_text(self, text, is_answer: bool, image_placeholder: bool):
        """`(text, escaped, skip)`; `image_placeholder`: the image token is the placeholder there and stays."""
        found = special_tokens_in(text, self.tokens, self.image_token)
        if image_placeholder:
            found = [t for t in found if t not in (self.image_token, IMAGE_TOKEN)]
        if not found:
            return text, False, False
        if is_answer:
            return text, False, True
        return escape_special_tokens(text, found), True, False

    def on_turns(self, turns, is_answer: bool):
        escaped, out = False, []
        for turn in turns:
            if not isinstance(turn, dict):
                out.append(turn)
                continue
            answer = is_answer or turn.get("role") == "assistant"
            content = turn.get("content")
            esc = skip = False
            if isinstance(content, str):
                content, esc, skip = self.on_text(content, answer, False)
            elif isinstance(content, list):
                parts = []
                for part in content:
                    if isinstance(part, dict) and isinstance(part.get("text"), str):
                        text, e, k = self.on_text(part["text"], answer, False)
                        part = {**part, "text": text}
                        esc, skip = esc or e, skip or k
                    parts.append(part)
                content = parts
            if skip:
                return turns, False, True
            escaped = escaped or esc
            out.append({**turn, "content": content})
        return out, escaped, False

    def on_column(self, column: str, value):
        answer = column in ("chosen", "rejected", "completion")
        if isinstance(value, list):
            return self.on_turns(value, answer)
        if isinstance(value, str):
            # In a standard (string) prompt the image token is the placeholder of the row's image.
            return self.on_text(value, answer, image_placeholder=column == "prompt")
        return value, False, False


TEXT_COLUMNS = ("messages", "prompt", "chosen", "rejected", "completion")


class RowContract:
    """The checks of one row, for a `kind` of data; `check(row, index)` -> `(row_or_None, reason, escaped)`.

    Args:
        kind: `"preference"` (DPO), `"sft"` or `"grpo"`.
        processor: the run's processor (or tokenizer): its special tokens enter the text policy.
        max_image_pixels: decompression-bomb bound, pixels per image (`PivotScriptArguments.max_image_pixels`).
        base_dir: folder that relative image paths are relative to (None: the working directory, as `LazyImages`).
    """

    def __init__(
        self,
        kind: Kind,
        processor=None,
        max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
        base_dir: str | None = None,
    ):
        if kind not in ("preference", "sft", "grpo"):
            raise ValueError(f"kind must be 'preference', 'sft' or 'grpo', got {kind!r}")
        self.kind, self.max_image_pixels, self.base_dir = kind, max_image_pixels, base_dir
        self.policy = SpecialTokenPolicy(processor)

    def check(self, row: dict, index: int = 0) -> tuple[dict | None, str | None, bool]:
        for image in row_images(row):
            reason = image_problem(image, self.max_image_pixels, self.base_dir)
            if reason:
                return None, reason, False
        reason = self._answer_problem(row)
        if reason:
            return None, reason, False
        new, escaped = {}, False
        for column in TEXT_COLUMNS:
            if column not in row:
                continue
            value, esc, skip = self.policy.on_column(column, row[column])
            if skip:
                return None, "special_token_in_response", False
            if esc:
                new[column], escaped = value, True
        return ({**row, **new} if new else row), None, escaped

    def _answer_problem(self, row: dict) -> str | None:
        if self.kind == "preference":
            if "chosen" not in row or "rejected" not in row:
                return None  # TRL's own error for missing columns, before compute
            chosen, rejected = text_of(row["chosen"]).strip(), text_of(row["rejected"]).strip()
            if not chosen or not rejected:
                return "invalid_text"
            return "chosen_equals_rejected" if chosen == rejected else None
        if self.kind == "grpo":
            return "missing_answer" if "solution" in row and missing_answer(row["solution"]) else None
        if "messages" in row and isinstance(row["messages"], list):
            answers = [m for m in row["messages"] if isinstance(m, dict) and m.get("role") == "assistant"]
            return None if any(text_of(m.get("content")).strip() for m in answers) else "invalid_text"
        if "completion" in row:
            return None if text_of(row["completion"]).strip() else "invalid_text"
        return None


def image_token_counter(processor, num_image_tokens=None):
    """What the length check counts per image: the processor's own count (measured per image for variable-resolution
    towers, so a caller's single number can never under-count a tall image), else `num_image_tokens`."""
    from .loader import image_token_measure

    if callable(getattr(processor, "num_image_tokens", None)):
        return image_token_measure(processor)
    return num_image_tokens


def _row_id(row: dict, index: int) -> str:
    value = row.get("id")
    return str(value) if isinstance(value, str | int) else str(index)


def _undecoded(dataset):
    """`dataset` without formatting and with `datasets.Image` columns as `{"bytes", "path"}` dicts (no decoding)."""
    from .loader import _has_decoded_images, _without_decoding

    raw = dataset.with_format(None)
    for column in ("images", "image"):
        feature = raw.features.get(column) if raw.features else None
        if feature is not None and _has_decoded_images(feature):
            raw = raw.cast_column(column, _without_decoding(feature))
    return raw


def apply_row_contract(
    dataset,
    kind: Kind,
    processor=None,
    report: ConversionReport | None = None,
    *,
    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
    max_length: int | None = None,
    num_image_tokens=None,
    lazy_images: bool = True,
):
    """Check every row of `dataset` (see the module docstring); return `(dataset, report)`.

    `dataset` is a `datasets.Dataset` (checked now, before any compute; skipped rows are removed) or an
    `IterableDataset` (checked lazily as rows stream: a failing row is filtered out and counted in `report` when it is
    read). `report` is the source's conversion report (kept rows moved to skipped), or a new one counting `dataset`'s
    rows. With `lazy_images`, the result holds images as stored and decodes them on access through `LazyImages`, which
    also marks a row unreadable at that point instead of raising (the trainers' collate guard skips and counts it).
    """
    import datasets

    from .images import LazyImages

    contract = RowContract(kind, processor, max_image_pixels)
    measure = (
        image_token_counter(processor, num_image_tokens) if max_length is not None and processor is not None else None
    )
    if isinstance(dataset, datasets.IterableDataset):
        if report is None:
            report = ConversionReport(source="streamed dataset")
        length = (processor, max_length, measure) if measure is not None else None
        return _stream(dataset, contract, report, max_image_pixels, length), report
    transform = (
        dataset.format.get("format_kwargs", {}).get("transform") if dataset.format["type"] == "custom" else None
    )
    foreign = transform is not None and not isinstance(transform, LazyImages)
    raw = _undecoded(dataset)
    if report is None:
        report = ConversionReport(source="train_dataset", total=len(raw), kept=len(raw))
    keep, changed, skipped = [], {}, []
    for index, row in enumerate(raw):
        new, reason, escaped = contract.check(row, index)
        if reason:
            skipped.append((reason, _row_id(row, index)))
            continue
        keep.append(index)
        if escaped:
            changed[index] = {c: new[c] for c in TEXT_COLUMNS if c in new}
            report.convert("special_token_escaped", _row_id(row, index))
    for reason, row_id in skipped:
        report.move_kept_to_skipped(reason, [row_id])
    if changed:
        columns = sorted({c for update in changed.values() for c in update})

        def _escape(row, index):
            return changed.get(index, {c: row[c] for c in columns})

        raw = raw.map(_escape, with_indices=True, desc="escape special tokens")
    if skipped:
        raw = raw.select(keep)
    if measure is not None and len(raw):
        from .loader import drop_overlong

        raw = drop_overlong(raw, processor, max_length, measure, report)
    if foreign:
        raw = raw.with_transform(transform)  # the caller's own decoding; our images were checked underneath it
    elif lazy_images and ("images" in raw.column_names or "image" in raw.column_names):
        raw = raw.with_transform(LazyImages(max_pixels=max_image_pixels))
    return raw, report


def _stream(dataset, contract: RowContract, report: ConversionReport, max_image_pixels: int, length=None):
    """An `IterableDataset` whose rows pass `contract` as they stream (every row read is counted in `report`), with
    images checked from their stored form and only then decoded. `length`: `(processor, max_length, measure)`, the
    same length check as a map-style dataset's (`drop_overlong`), row by row."""
    from .images import load_image
    from .loader import LENGTH_COLUMNS, _has_decoded_images, _without_decoding, sequence_lengths

    features = dataset.features or {}
    for column in ("images", "image"):
        if column in features and _has_decoded_images(features[column]):
            dataset = dataset.cast_column(column, _without_decoding(features[column]))
    lock = threading.Lock()

    def _checked(row, index):
        new, reason, escaped = contract.check(row, index)
        if reason is None and length is not None:
            processor, max_length, measure = length
            columns = {c: [new[c]] for c in LENGTH_COLUMNS if c in new}
            if sequence_lengths(columns, processor, measure)[0] > max_length:
                reason = "exceeds_max_length"
        if reason is None:
            new = dict(new)
            try:
                if new.get("images") is not None:
                    new["images"] = [load_image(src, None, max_image_pixels) for src in row_images(new)]
                elif new.get("image") is not None:
                    new["image"] = load_image(new["image"], None, max_image_pixels)
            except Exception:
                new, reason = row, "image_unreadable"
        with lock:
            report.add_total()
            if reason:
                report.skip(reason, _row_id(row, index))
            else:
                report.keep()
                if escaped:
                    report.convert("special_token_escaped", _row_id(row, index))
        return {**(new or row), "__pivot_ok__": reason is None}

    checked = dataset.map(_checked, with_indices=True)
    return checked.filter(lambda row: row["__pivot_ok__"]).remove_columns("__pivot_ok__")


__all__ = [
    "MISSING_ANSWER_STRINGS",
    "RowContract",
    "SpecialTokenPolicy",
    "apply_row_contract",
    "image_problem",
    "image_string_problem",
    "image_token_counter",
    "missing_answer",
    "row_images",
    "text_of",
]
