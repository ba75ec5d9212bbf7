"""LLaVA conversation data -> TRL SFT rows: JSON / JSONL files, LLaVA-OneVision parquet, LLaVA-NeXT YAML mixtures.

Two templates:
- `chat` (instruction tuning, Stage 1b / 3b): `{"images": [path] or [], "messages": [{"role", "content": str}, ...]}`,
  TRL's conversational language-modeling format; TRL's collator puts the image at the start of the first user turn.
- `plain` (projector pretraining on LCS-558K, Stage 1a / 3a): LLaVA's `plain` template is the image followed by the
  caption and nothing else (no system prompt, no roles, the human instruction is dropped). The closest TRL format is a
  *standard* prompt-completion row `{"images": [path], "prompt": "<image>", "completion": "caption\\n"}`: the
  processor expands `<image>` and, with `completion_only_loss`, the loss falls on the caption only, as in LLaVA.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from tqdm.auto import tqdm

from .contract import image_string_problem
from .images import DEFAULT_MAX_IMAGE_PIXELS, ImageCheck, check_image, resolve_image_path
from .report import ConversionReport
from .text import (
    IMAGE_TOKEN,
    escape_special_tokens,
    image_token_repair,
    special_tokens_in,
    strip_image_tokens,
    valid_text,
)


_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}
_BROKEN = object()  # sentinel for a record that could not be parsed


@dataclass
class LlavaConfig:
    """Options of the LLaVA conversation converter."""

    template: Literal["chat", "plain"] = field(
        default="chat",
        metadata={"help": "'chat' = multi-turn messages; 'plain' = image + caption (projector pretraining)."},
    )
    image_folder: str | None = field(
        default=None, metadata={"help": "Image root (LLaVA's --image_folder). Default: the folder of each data file."}
    )
    allow_multi_image: bool = field(
        default=False, metadata={"help": "Keep rows with several images (the PIVOT recipe is single-image)."}
    )
    seed: int = field(default=777, metadata={"help": "Seed of `random:N` sampling strategies."})
    max_image_pixels: int = field(default=DEFAULT_MAX_IMAGE_PIXELS, metadata={"help": "Decompression-bomb guard."})
    min_image_side: int = field(default=1, metadata={"help": "Skip images with a side shorter than this."})
    verify_images: bool = field(default=True, metadata={"help": "Decode every image once during conversion."})
    parquet_image_dir: str | None = field(
        default=None,
        metadata={"help": "Where images embedded in parquet files are written (default: <parquet dir>/_images)."},
    )
    show_progress: bool = field(default=True, metadata={"help": "Show tqdm progress bars."})


def iter_records(path: str, image_dir: str | None = None) -> Iterator[tuple[int, Any]]:
    """Yield `(index, record)` from a JSON array, JSONL or parquet file; a broken record is yielded as `_BROKEN`."""
    if path.endswith(".parquet"):
        yield from _iter_parquet(path, image_dir)
        return
    if path.endswith(".jsonl"):
        with open(path, encoding="utf-8-sig", errors="replace") as f:
            idx = 0
            for line in f:
                if not line.strip():
                    continue
                try:
                    yield idx, json.loads(line)
                except json.JSONDecodeError:
                    yield idx, _BROKEN
                idx += 1
        return
    try:
        with open(path, encoding="utf-8-sig") as f:
            data = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError):
        # A JSON array cannot be resynchronised reliably after a syntax error: the whole file is one broken record.
        yield 0, _BROKEN
        return
    if isinstance(data, dict):
        data = [data]
    if not isinstance(data, list):
        yield 0, _BROKEN
        return
    yield from enumerate(data)


def _iter_parquet(path: str, image_dir: str | None) -> Iterator[tuple[int, Any]]:
    """LLaVA-OneVision parquet: columns id / image ({"bytes", "path"}) / conversations (list or JSON string).

    Embedded images are written once to `image_dir` (streamed batch by batch, so memory stays bounded) and the row then
    points at that file like any LLaVA row; the file name is a content hash, so re-running is idempotent.
    """
    import pyarrow.parquet as pq

    image_dir = image_dir or os.path.join(os.path.dirname(os.path.abspath(path)), "_images")
    os.makedirs(image_dir, exist_ok=True)
    idx = 0
    for batch in pq.ParquetFile(path).iter_batches(batch_size=256):
        for row in batch.to_pylist():
            conv = row.get("conversations")
            if isinstance(conv, str):
                try:
                    row["conversations"] = json.loads(conv)
                except json.JSONDecodeError:
                    row["conversations"] = None
            image = row.get("image")
            if isinstance(image, dict):
                data = image.get("bytes")
                if data:
                    ext = os.path.splitext(image.get("path") or "")[1].lower() or ".img"
                    name = hashlib.sha1(data).hexdigest() + ext
                    target = os.path.join(image_dir, name)
                    if not os.path.exists(target):
                        with open(target, "wb") as f:
                            f.write(data)
                    row["image"] = name
                else:
                    row["image"] = image.get("path")
            elif isinstance(image, bytes | bytearray):
                name = hashlib.sha1(image).hexdigest() + ".img"
                target = os.path.join(image_dir, name)
                if not os.path.exists(target):
                    with open(target, "wb") as f:
                        f.write(image)
                row["image"] = name
            row["_image_root"] = image_dir
            yield idx, row
            idx += 1


def sample_indices(n: int, strategy: str | None, seed: int = 777) -> list[int]:
    """LLaVA-NeXT `sampling_strategy`: `all`, `first:N`, `end:N`, `random:N`, `N%`, `first:N%` (N% = first N%)."""
    strategy = (strategy or "all").strip()
    if strategy == "all":
        return list(range(n))
    kind, _, amount = strategy.rpartition(":")
    kind = kind or "first"
    if amount.endswith("%"):
        count = math.ceil(float(amount[:-1]) * n / 100)
    else:
        count = int(amount)
    count = max(0, min(count, n))
    if kind == "first":
        return list(range(count))
    if kind == "end":
        return list(range(n - count, n))
    if kind == "random":
        return sorted(random.Random(seed).sample(range(n), count))
    raise ValueError(f"unknown sampling_strategy {strategy!r}")


def convert_llava_record(
    obj: Any,
    record_id: str,
    image_root: str,
    config: LlavaConfig,
    report: ConversionReport,
    image_cache: dict[str, ImageCheck] | None = None,
) -> dict | None:
    """Validate one LLaVA record; return a TRL row or None after counting the skip reason in `report`."""
    if not isinstance(obj, dict):
        report.skip("not_an_object", record_id)
        return None
    conversations = obj.get("conversations")
    if not isinstance(conversations, list) or not conversations:
        report.skip("bad_conversation", record_id)
        return None
    messages = []
    for turn in conversations:
        role = _ROLES.get(turn.get("from") or turn.get("role")) if isinstance(turn, dict) else None
        value = turn.get("value", turn.get("content")) if isinstance(turn, dict) else None
        if role is None:
            report.skip("bad_conversation", record_id)
            return None
        if not valid_text(value):
            report.skip("invalid_text", record_id)
            return None
        messages.append({"role": role, "content": value})
    # An assistant turn before the first user turn would put the loss on a turn with nothing to answer (and the
    # template's system prompt and header around it): dropped, as LLaVA's preprocessing drops a first turn that is not
    # from the human.
    leading = [i for i, m in enumerate(messages) if m["role"] == "assistant" and i < _first_user(messages)]
    messages = [m for i, m in enumerate(messages) if i not in set(leading)]
    # Drop a trailing user turn (nothing to learn from) and check there is at least one user -> assistant exchange.
    trailing_dropped = False
    while messages and messages[-1]["role"] != "assistant":
        messages.pop()
        trailing_dropped = True
    if not any(m["role"] == "user" for m in messages) or not messages:
        report.skip("bad_conversation", record_id)
        return None
    if any(IMAGE_TOKEN in m["content"] for m in messages if m["role"] == "assistant"):
        report.skip("image_token_in_response", record_id)
        return None

    image = obj.get("image")
    if isinstance(image, list | tuple):
        image = [x for x in image if x is not None]
        if not image:
            image = None
        elif len(image) == 1:
            image = image[0]
    if isinstance(image, str) and not image.strip():
        image = None
    paths: list[str] = []
    if image is not None:
        sources = image if isinstance(image, list) else [image]
        if len(sources) > 1 and not config.allow_multi_image:
            report.skip("multi_image", record_id)
            return None
        for src in sources:
            if not isinstance(src, str):
                report.skip("invalid_image_field", record_id)
                return None
            path, reason = resolve_image_path(image_root, src)
            reason = image_string_problem(src) or reason  # a URL / inline string is named as such, never fetched
            if reason is not None:
                report.skip(reason, record_id)
                return None
            check = image_cache.get(path) if image_cache is not None else None
            if check is None:
                check = (
                    check_image(path, config.max_image_pixels, config.min_image_side)
                    if config.verify_images
                    else ImageCheck(True)
                )
                if image_cache is not None:
                    image_cache[path] = check
            if not check.ok:
                report.skip(check.reason, record_id)
                return None
            paths.append(path)

    # `<image>` placement: strip it from every user turn; TRL re-inserts one image part per image in the first user
    # turn. Count what was repaired so the report shows how canonical the source was.
    n_tokens, first_user_at_start = 0, False
    seen_user = False
    for m in messages:
        if m["role"] != "user":
            continue
        clean, count, at_start = strip_image_tokens(m["content"])
        if not seen_user:
            first_user_at_start = at_start
            seen_user = True
        n_tokens += count
        m["content"] = clean
    # Special-token text left in any turn (system included): escaped in prompts, a skipped row in answers.
    escaped = 0
    for m in messages:
        found = special_tokens_in(m["content"])
        if not found:
            continue
        if m["role"] == "assistant":
            report.skip("special_token_in_response", record_id)
            return None
        m["content"] = escape_special_tokens(m["content"], found)
        escaped += 1
    repairs = ["special_token_escaped"] if escaped else []
    if paths:
        repair = image_token_repair(
            n_tokens if len(paths) == 1 else (1 if n_tokens == len(paths) else 2), first_user_at_start
        )
        if repair:
            repairs.append(repair)
    elif n_tokens:
        repairs.append("image_token_removed_text_only")
    if trailing_dropped:
        repairs.append("trailing_user_turn_dropped")
    if leading:
        repairs.append("leading_assistant_turn_dropped")

    row_id = str(obj["id"]) if isinstance(obj.get("id"), str | int) else record_id
    if config.template == "plain":
        if not paths:
            report.skip("no_image", record_id)
            return None
        caption = next(m["content"] for m in messages if m["role"] == "assistant").strip()
        row = {"id": row_id, "images": paths, "prompt": IMAGE_TOKEN, "completion": caption + "\n"}
    else:
        # A user turn may be empty once `<image>` is stripped (e.g. "<image>" alone): keep it, the image is its content.
        row = {"id": row_id, "images": paths, "messages": messages}
    for what in repairs:
        report.convert(what, row_id)
    return row


def _first_user(messages: list[dict]) -> int:
    return next((i for i, m in enumerate(messages) if m["role"] == "user"), len(messages))


def _read_mixture(yaml_path: str) -> list[tuple[str, str]]:
    import yaml

    with open(yaml_path, encoding="utf-8-sig") as f:
        spec = yaml.safe_load(f)  # never yaml.load: a data file must not be able to run code
    entries = spec.get("datasets") if isinstance(spec, dict) else None
    if not isinstance(entries, list):
        raise ValueError(f"{yaml_path}: expected a top-level `datasets:` list of {{json_path, sampling_strategy}}")
    base = os.path.dirname(os.path.abspath(yaml_path))
    out = []
    for entry in entries:
        if not isinstance(entry, dict) or not isinstance(entry.get("json_path"), str):
            raise ValueError(f"{yaml_path}: every entry needs a json_path, got {entry!r}")
        path = entry["json_path"]
        if not os.path.isabs(path) and not os.path.exists(path):
            path = os.path.join(base, path)
        out.append((path, str(entry.get("sampling_strategy", "all"))))
    return out


def list_llava_files(path: str) -> list[tuple[str, str]]:
    """`(file, sampling_strategy)` pairs for a file, a folder of JSON/JSONL/parquet files or a YAML mixture."""
    if path.endswith((".yaml", ".yml")):
        return _read_mixture(path)
    if os.path.isdir(path):
        names = sorted(n for n in os.listdir(path) if n.endswith((".json", ".jsonl", ".parquet")))
        return [(os.path.join(path, n), "all") for n in names]
    return [(path, "all")]


def convert_llava(path: str, config: LlavaConfig | None = None):
    """Convert LLaVA data (file, folder or YAML mixture) to a `datasets.Dataset` of TRL SFT rows + a report.

    Sampling strategies apply to raw records (as in LLaVA-NeXT); records left out count as `not_sampled`.
    Returns `(dataset, report)`; the dataset holds image paths only (see `images.LazyImages`).
    """
    import datasets

    config = config or LlavaConfig()
    report = ConversionReport(source=os.path.abspath(path), settings=asdict(config))
    rows: list[dict] = []
    image_cache: dict[str, ImageCheck] = {}
    for file_path, strategy in list_llava_files(path):
        source = os.path.basename(file_path)
        if not os.path.isfile(file_path):
            report.notes.append(f"{file_path}: not found, ignored")
            continue
        root = config.image_folder or os.path.dirname(os.path.abspath(file_path))
        records = list(iter_records(file_path, config.parquet_image_dir)) if strategy != "all" else None
        if records is not None:
            keep = set(sample_indices(len(records), strategy, config.seed))
            stream: Any = records
        else:
            keep = None
            stream = iter_records(file_path, config.parquet_image_dir)
        for idx, obj in tqdm(stream, desc=f"Converting {source}", disable=not config.show_progress):
            record_id = f"{source}:{idx}"
            if isinstance(obj, dict) and isinstance(obj.get("id"), str | int):
                record_id += f" (id {obj['id']})"  # the position and the dataset's own id, so a skip can be looked up
            report.add_total()
            if keep is not None and idx not in keep:
                report.skip("not_sampled", record_id)
                continue
            if obj is _BROKEN:
                report.skip("broken_json", record_id)
                continue
            file_root = obj.pop("_image_root", None) if isinstance(obj, dict) else None
            row = convert_llava_record(obj, record_id, file_root or root, config, report, image_cache)
            if row is not None:
                row["source"] = source
                rows.append(row)
    report.keep(len(rows))
    if not rows:
        return _empty(config.template), report
    return datasets.Dataset.from_list(rows), report


def _empty(template: str):
    import datasets

    base = {"id": datasets.Value("string"), "source": datasets.Value("string"), "images": [datasets.Value("string")]}
    if template == "plain":
        feats = {**base, "prompt": datasets.Value("string"), "completion": datasets.Value("string")}
    else:
        feats = {**base, "messages": [{"role": datasets.Value("string"), "content": datasets.Value("string")}]}
    return datasets.Dataset.from_dict({k: [] for k in feats}, features=datasets.Features(feats))
