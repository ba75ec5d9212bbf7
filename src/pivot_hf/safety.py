"""Safety helpers: secret redaction for logs and written files, path confinement, pickle-free folders.

- `redact_secrets(text)` removes Hugging Face tokens (`hf_` followed by 20+ letters/digits) and the current values of
  the token environment variables (`HF_TOKEN`, ...), whatever their shape.
- `SecretRedactingFilter` / `install_secret_redaction()` apply it to every log record handled by the root logger and
  the transformers / TRL / accelerate / datasets loggers (a filter on a logger does not see records propagated from its
  children, so it is attached to the handlers too).
- `confine_path(root, rel)` resolves a relative path inside `root` or raises (the data layer uses its own
  `pivot_hf.data.images.resolve_image_path`, which returns a skip reason instead).
- `find_pickle_files` / `assert_no_pickle_files` check that a folder meant for publication (a Pivot checkpoint, an
  exported encoder) holds only safe formats.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Iterable


# Environment variables whose values are Hub credentials (huggingface_hub reads the first two).
TOKEN_ENV_VARS = ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HUGGINGFACE_HUB_TOKEN", "HF_API_TOKEN", "HUGGINGFACE_TOKEN")
# Real tokens are `hf_` + 34 letters; identifiers such as `hf_hub_download` or `hf_device_map` contain `_` after the
# prefix and short words, so they do not match.
HF_TOKEN_RE = re.compile(r"hf_[A-Za-z0-9]{20,}")
REDACTED = "<redacted>"
# Values shorter than this are not treated as secrets by value (a stray "1" in HF_TOKEN would redact every digit).
_MIN_SECRET_LEN = 8

# What a folder published by this project may contain: weights, configs, tokenizer/vocab, docs, chat templates, the
# remote code a Pivot checkpoint carries and the run's training_curves.png (an image: no code).
PUBLISHABLE_SUFFIXES = (".safetensors", ".json", ".txt", ".md", ".jinja", ".py", ".model", ".tiktoken", ".png")
# Formats that are (or usually wrap) Python pickles: loading them can run arbitrary code.
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt", ".joblib", ".npy", ".npz", ".dill")
_PICKLE_MAGIC = (b"\x80\x02", b"\x80\x03", b"\x80\x04", b"\x80\x05")  # pickle protocols 2-5
_ZIP_MAGIC = b"PK\x03\x04"  # torch.save's default container, holding a pickle


def _secret_values() -> list[str]:
    values = []
    for name in TOKEN_ENV_VARS:
        value = os.environ.get(name, "").strip()
        if len(value) >= _MIN_SECRET_LEN:
            values.append(value)
    return sorted(set(values), key=len, reverse=True)


def redact_secrets(text: str, extra_secrets: Iterable[str] = ()) -> str:
    """`text` with Hub tokens and the values of the token environment variables replaced by `<redacted>`."""
    if not isinstance(text, str) or not text:
        return text
    for secret in list(_secret_values()) + [s for s in extra_secrets if s and len(s) >= _MIN_SECRET_LEN]:
        text = text.replace(secret, REDACTED)
    return HF_TOKEN_RE.sub(REDACTED, text)


class SecretRedactingFilter(logging.Filter):
    """A logging filter that rewrites each record's message (and formatted traceback) with `redact_secrets`."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # a malformed %-format must not kill logging; redact the raw template instead
            message = str(record.msg)
        redacted = redact_secrets(message)
        if redacted != message or record.args:
            record.msg, record.args = redacted, None
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = redact_secrets(record.exc_text)
        if record.stack_info:
            record.stack_info = redact_secrets(record.stack_info)
        return True


_LIBRARY_LOGGERS = ("", "transformers", "trl", "accelerate", "datasets", "huggingface_hub", "pivot_hf", "__main__")
_FILTER = SecretRedactingFilter()


def install_secret_redaction(logger_names: Iterable[str] = _LIBRARY_LOGGERS) -> SecretRedactingFilter:
    """Attach the redacting filter to the named loggers and all their handlers (idempotent); return it.

    Call it after logging is configured (handlers added later are not covered; calling again covers them).
    """
    for name in logger_names:
        log = logging.getLogger(name)
        if _FILTER not in log.filters:
            log.addFilter(_FILTER)
        for handler in log.handlers:
            if _FILTER not in handler.filters:
                handler.addFilter(_FILTER)
    return _FILTER


def redact_file(path: str) -> bool:
    """Rewrite a text file in place with secrets redacted; return whether it changed."""
    with open(path, encoding="utf-8", errors="surrogateescape") as f:
        text = f.read()
    redacted = redact_secrets(text)
    if redacted == text:
        return False
    with open(path, "w", encoding="utf-8", errors="surrogateescape") as f:
        f.write(redacted)
    return True


def find_secrets_in_tree(root: str, secrets: Iterable[str] = ()) -> list[str]:
    """Files below `root` whose bytes contain a Hub token or one of `secrets` (plus the token env values)."""
    needles = [s.encode() for s in list(secrets) + _secret_values() if s]
    hits = []
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            path = os.path.join(dirpath, name)
            try:
                with open(path, "rb") as f:
                    data = f.read()
            except OSError:
                continue
            if any(n in data for n in needles) or re.search(rb"hf_[A-Za-z0-9]{20,}", data):
                hits.append(path)
    return sorted(hits)


# --------------------------------------------------------------------------------------------------------------------
# Paths
# --------------------------------------------------------------------------------------------------------------------


class PathEscapesRoot(ValueError):
    pass


def confine_path(root: str, rel: str) -> str:
    """Real path of `rel` under `root`; raises `PathEscapesRoot` if it resolves outside (`..`, absolute, symlink)."""
    if not isinstance(rel, str) or not rel.strip() or "\x00" in rel:
        raise PathEscapesRoot(f"invalid relative path {rel!r}")
    real_root = os.path.realpath(root)
    real = os.path.realpath(os.path.join(real_root, rel))
    try:
        inside = os.path.commonpath([real_root, real]) == real_root
    except ValueError:  # different drives on Windows
        inside = False
    if not inside:
        raise PathEscapesRoot(f"{rel!r} resolves outside {root!r}")
    return real


# --------------------------------------------------------------------------------------------------------------------
# Pickle-free folders
# --------------------------------------------------------------------------------------------------------------------


def _looks_pickled(path: str) -> bool:
    try:
        with open(path, "rb") as f:
            head = f.read(4)
    except OSError:
        return False
    return head.startswith(_PICKLE_MAGIC) or head == _ZIP_MAGIC


def find_pickle_files(root: str, exclude_dirs: Iterable[str] = ()) -> list[str]:
    """Files below `root` (relative paths) that are pickles by name or by content (incl. torch.save zip files).

    `exclude_dirs` are folder names skipped anywhere in the tree (e.g. `checkpoint-*` training states are resumable
    pickles by design and are not part of a published folder: pass their names).
    """
    excluded = set(exclude_dirs)
    found = []
    for dirpath, dirnames, files in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in excluded]
        for name in files:
            path = os.path.join(dirpath, name)
            if name.lower().endswith(PICKLE_SUFFIXES) or (
                not name.lower().endswith(".safetensors") and _looks_pickled(path)
            ):
                found.append(os.path.relpath(path, root))
    return sorted(found)


def unpublishable_files(root: str, exclude_dirs: Iterable[str] = ()) -> list[str]:
    """Files below `root` whose suffix is not one of `PUBLISHABLE_SUFFIXES` (relative paths)."""
    excluded = set(exclude_dirs)
    bad = []
    for dirpath, dirnames, files in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in excluded]
        for name in files:
            if not name.lower().endswith(PUBLISHABLE_SUFFIXES):
                bad.append(os.path.relpath(os.path.join(dirpath, name), root))
    return sorted(bad)


def assert_no_pickle_files(root: str, exclude_dirs: Iterable[str] = ()) -> None:
    """Raise ValueError naming the pickle files below `root` (a folder meant to be published or loaded)."""
    found = find_pickle_files(root, exclude_dirs)
    if found:
        raise ValueError(
            f"{root} contains pickle files, which can run code when loaded: {found}. Save weights with safetensors "
            "and configs as JSON."
        )


__all__ = [
    "HF_TOKEN_RE",
    "PICKLE_SUFFIXES",
    "PUBLISHABLE_SUFFIXES",
    "PathEscapesRoot",
    "SecretRedactingFilter",
    "TOKEN_ENV_VARS",
    "assert_no_pickle_files",
    "confine_path",
    "find_pickle_files",
    "find_secrets_in_tree",
    "install_secret_redaction",
    "redact_file",
    "redact_secrets",
    "unpublishable_files",
]
