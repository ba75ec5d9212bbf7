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


# Control tokens of chat templates written as text (ChatML / Qwen / Llama-3 / Phi style `<|...|>`). With the image
# placeholder they are what a tokenizer would turn into real control tokens, whatever the model.
CONTROL_TOKEN_RE = re.compile(r"<\|[A-Za-z0-9_]+\|>")
# Inserted after the `<` of a special token written as text, so that it tokenizes as text (and is invisible when
# printed). The policy: in prompts (system and user turns) such text is escaped; in answers (the training targets) the
# row is skipped, since a model should not learn to write escaped control tokens.
ESCAPE = "\u200b"


def special_tokens_in(text: str, extra_tokens=(), image_token: str | None = IMAGE_TOKEN) -> list[str]:
    """The special tokens written literally in `text`: `<|...|>` control tokens, `image_token` (None: not checked)
    and any of `extra_tokens` (a tokenizer's special tokens)."""
    if not isinstance(text, str) or "<" not in text and "[" not in text:
        return []
    found = set(CONTROL_TOKEN_RE.findall(text))
    if image_token and image_token in text:
        found.add(image_token)
    for token in extra_tokens:
        if token and len(token) > 2 and token != image_token and token in text:
            found.add(token)
    return sorted(found)


def escape_special_tokens(text: str, tokens) -> str:
    """`text` with every literal occurrence of `tokens` broken by a zero-width space after its first character."""
    for token in sorted(tokens, key=len, reverse=True):
        text = text.replace(token, token[0] + ESCAPE + token[1:])
    return text
