"""Rule-based (verifiable) rewards for GRPO, in the open-r1 style: each reward is a function
`reward(completions, **row_columns) -> list[float]` that TRL's `GRPOTrainer` calls per batch, and `get_reward_funcs`
builds them from their names.

- `accuracy`: 1.0 when the completion's extracted answer equals the row's `solution` after normalisation. A row
  without a ground truth (`solution` missing, None, empty, or the string of a missing value such as `"None"`) gets
  0.0 whatever the completion says: `<answer>None</answer>` is never rewarded for a row that has no answer. (The row
  contract skips such rows before training; this is the reward's own guarantee.)
- `format`: `<think>...</think><answer>...</answer>` and nothing else around them.
- `length`: sigmoid-normalised completion length (the related study's "think longer" reward).
"""

from __future__ import annotations

import math
import re
import string
from collections.abc import Callable

from ..configs import RecipeConfigError
from ..data.contract import missing_answer


# R1-V / VLM-R1 style instruction: the model reasons in <think> and answers in <answer>, which `format` rewards and
# from which `accuracy` reads the answer.
DEFAULT_FORMAT_PROMPT = (
    "Output the thinking process in <think> </think> and the final answer in <answer> </answer> tags, i.e., "
    "<think> reasoning process here </think><answer> answer here </answer>."
)
REWARD_NAMES = ("accuracy", "format", "length")

_ANSWER_TAG_RE = re.compile(r"<answer>(.*?)</answer>", re.DOTALL | re.IGNORECASE)
_FORMAT_RE = re.compile(r"\s*<think>.*?</think>\s*<answer>.*?</answer>\s*", re.DOTALL | re.IGNORECASE)
# "Answer: B", "The answer is 3.", "final answer: yes" (MMPR chosen answers end this way).
_ANSWER_PHRASE_RE = re.compile(r"(?:final answer|answer)\s*(?:is|:)\s*(.+)", re.IGNORECASE)
_CHOICE_RE = re.compile(r"^\(?([a-z])[\).:]?(?:\s|$)")
_ARTICLES = {"a", "an", "the"}


# ------------------------------------------------------------------------------------------------------ answers
def completion_text(completion) -> str:
    """The text of a completion as TRL passes it: a string, or a list of assistant messages."""
    if isinstance(completion, str):
        return completion
    if isinstance(completion, list):
        parts = []
        for message in completion:
            content = message.get("content", "") if isinstance(message, dict) else message
            if isinstance(content, list):  # multimodal parts
                content = "".join(p.get("text", "") for p in content if isinstance(p, dict))
            parts.append(str(content))
        return "".join(parts)
    return str(completion)


def extract_answer(text: str) -> str:
    """The final answer in a response: the last `<answer>` block, else what follows the last "answer is"/"Answer:",
    else the whole text."""
    tags = _ANSWER_TAG_RE.findall(text)
    if tags:
        return tags[-1].strip()
    phrases = _ANSWER_PHRASE_RE.findall(text)
    if phrases:
        return phrases[-1].strip().splitlines()[0].strip()
    return text.strip()


def normalize_answer(text: str) -> str:
    """Case, punctuation, articles and number formatting removed, so "The answer: (B)." == "b" and "3.0" == "3"."""
    text = text.strip().lower()
    choice = _CHOICE_RE.match(text)
    if choice and (len(text) <= 3 or text[len(choice.group(0)) - 1 :].strip() == ""):
        return choice.group(1)
    try:
        number = float(text.replace(",", "").rstrip("%").strip())
        return f"{number:g}"
    except ValueError:
        pass
    text = "".join(ch for ch in text if ch not in string.punctuation)
    return " ".join(word for word in text.split() if word not in _ARTICLES)


def answers_match(prediction: str, solution: str) -> bool:
    return normalize_answer(extract_answer(prediction)) == normalize_answer(extract_answer(solution))


# ------------------------------------------------------------------------------------------------------ rewards
def accuracy_reward(completions, solution, **kwargs) -> list[float]:
    """1.0 when the completion's extracted answer equals the row's `solution` after normalisation, else 0.0 (and
    always 0.0 for a row without a ground truth, see `pivot_hf.data.contract.missing_answer`)."""
    return [
        0.0 if missing_answer(s) else (1.0 if answers_match(completion_text(c), str(s)) else 0.0)
        for c, s in zip(completions, solution)
    ]


def format_reward(completions, **kwargs) -> list[float]:
    """1.0 for `<think>...</think><answer>...</answer>` (nothing else around them), else 0.0."""
    return [1.0 if _FORMAT_RE.fullmatch(completion_text(c)) else 0.0 for c in completions]


def make_length_reward(target_length: float, scale: float = 1.0, unit: str = "tokens") -> Callable:
    """The normalised length reward: ``sigmoid(scale * (L - target_length))``, in [0, 1].

    The related study replaces a fixed per-token bonus (which models exploit with repetition) by a sigmoid of the
    length, so the reward saturates: its prose gives a scaling factor (1 in its experiments) and a predefined length;
    the exact equation and the length value did not survive in our copy, so this is the form the prose describes, with
    both as options. With `scale=1` and lengths in tokens the reward is close to a step at `target_length`; a smaller
    scale (e.g. `1 / target_length`) makes it a gradual ramp. `unit`: `tokens` (completion token ids), `words` or
    `chars` of the decoded completion.
    """
    if unit not in ("tokens", "words", "chars"):
        raise ValueError(f"length unit must be tokens, words or chars, got {unit!r}")

    def length_reward(completions, completion_ids=None, **kwargs) -> list[float]:
        rewards = []
        for i, completion in enumerate(completions):
            if unit == "tokens" and completion_ids is not None:
                length = len(completion_ids[i])
            elif unit == "words" or unit == "tokens":  # tokens without ids: words are the closest proxy
                length = len(completion_text(completion).split())
            else:
                length = len(completion_text(completion))
            z = scale * (length - target_length)
            # Written so that neither branch can overflow math.exp for very long or empty completions.
            rewards.append(1.0 / (1.0 + math.exp(-z)) if z >= 0 else math.exp(z) / (1.0 + math.exp(z)))
        return rewards

    length_reward.__name__ = "length_reward"  # TRL logs each reward under its function's name
    return length_reward


def get_reward_funcs(
    names: list[str], length_target: float = 512, length_scale: float = 1.0, length_unit: str = "tokens"
) -> list[Callable]:
    """Reward callables for `names` (any of accuracy, format, length), in that order."""
    unknown = [n for n in names if n not in REWARD_NAMES]
    if unknown or not names:
        raise RecipeConfigError(f"Unknown or empty reward_funcs {names}: choose from {list(REWARD_NAMES)}.")
    table = {
        "accuracy": accuracy_reward,
        "format": format_reward,
        "length": lambda: make_length_reward(length_target, length_scale, length_unit),
    }
    return [table[n]() if n == "length" else table[n] for n in names]


build_reward_funcs = get_reward_funcs  # the name the recipes used first


__all__ = [
    "DEFAULT_FORMAT_PROMPT",
    "REWARD_NAMES",
    "accuracy_reward",
    "answers_match",
    "build_reward_funcs",
    "completion_text",
    "extract_answer",
    "format_reward",
    "get_reward_funcs",
    "make_length_reward",
    "normalize_answer",
]
