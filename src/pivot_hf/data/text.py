"""Text helpers shared by the MMPR and LLaVA converters: `<image>` placement, word counts, special tokens."""

from __future__ import annotations

import re


IMAGE_TOKEN = "<image>"
# Reasoning markers of MMPR's chain-of-thought answers; the paper's NoThink variant and "new distribution" use them.
SPECIAL_TOKEN_RE = re.compile(r"</?\s*(think|review)\s*>", re.IGNORECASE)
_IMAGE_TOKEN_RE = re.compile(r"[ \t]*<image>[ \t]*\n?")


def strip_image_tokens(text: str) -> tuple[str, int, bool]:
    """Remove every `<image>` from `text`; return `(clean_text, count, was_at_start)`.

    The image position is carried by the row's structure instead (TRL puts the image first in the first user turn,
    which is where the authors' recipe puts `<image>`), so the text must not repeat it or the processor would expand
    it twice and fail on "image features and image tokens do not match".
    """
    count = text.count(IMAGE_TOKEN)
    at_start = text.lstrip().startswith(IMAGE_TOKEN)
    if count == 0:
        return text.strip(), 0, False
    clean = _IMAGE_TOKEN_RE.sub(" ", text)
    clean = re.sub(r"[ \t]{2,}", " ", clean).strip()
    return clean, count, at_start


def image_token_repair(count: int, at_start: bool) -> str | None:
    """Name the `<image>` repair done on an image row's question (None when it was already canonical)."""
    if count == 0:
        return "image_token_prepended"
    if count > 1:
        return "image_token_deduplicated"
    if not at_start:
        return "image_token_moved"
    return None


def word_count(text: str) -> int:
    return len(text.split())


def has_special_tokens(text: str) -> bool:
    return SPECIAL_TOKEN_RE.search(text) is not None


def valid_text(value: object) -> bool:
    return isinstance(value, str) and value.strip() != ""
