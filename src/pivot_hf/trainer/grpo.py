"""GRPO on the Pivot MLLM, with the vision tower training and rule-based (verifiable) rewards.

The paper's Table C compares GRPO with SFT post-training (GRPO again reshapes the vision encoder more usefully than
SFT); a related study runs GRPO with verifiable rewards on visual tasks and adds a sigmoid-normalised length reward to
make the model "think" longer. This module puts both on TRL's `GRPOTrainer` with the same model class and the same
tunable-parts / per-part learning-rate options as the SFT and DPO recipes:

- rewards: `accuracy` (exact match of the extracted answer with the row's `solution`), `format`
  (`<think>...</think><answer>...</answer>`), `length` (sigmoid-normalised completion length, optional);
- data: rows with `prompt` + `solution` (+ `images`), MMPR / preference rows (the answer is extracted from `chosen`),
  or a JSONL of `{"image", "question", "answer"}`;
- `PivotGRPOTrainer`: `GRPOTrainer` + the trainable parts, their learning rates and the end-of-run change check.

`recipes/grpo.py --config recipes/grpo.yaml` is the command line.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import string
from collections.abc import Callable
from dataclasses import dataclass, field

from trl import GRPOConfig, GRPOTrainer

from ..configs import PivotScriptArguments, PivotTrainingFields, RecipeConfigError
from .adapters import preserved_requires_grad
from .callbacks import TrainingMonitorMixin
from .checkpointing import AtomicCheckpointMixin
from .model_loading import trl_reference_loads_like
from .tunable import TunablePartsMixin, as_pivot_config


logger = logging.getLogger(__name__)

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
    """1.0 when the completion's extracted answer equals the row's `solution` after normalisation, else 0.0."""
    return [1.0 if answers_match(completion_text(c), str(s)) else 0.0 for c, s in zip(completions, solution)]


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


def build_reward_funcs(
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


# -------------------------------------------------------------------------------------------------------- data
def _with_format_prompt(prompt, format_prompt: str | None):
    """Append the format instruction to the last user turn (string or multimodal-parts content)."""
    if not format_prompt:
        return prompt
    if isinstance(prompt, str):
        return f"{prompt.rstrip()} {format_prompt}"
    messages = [dict(m) for m in prompt]
    for message in reversed(messages):
        if message.get("role") == "user":
            content = message.get("content")
            if isinstance(content, list):
                message["content"] = list(content) + [{"type": "text", "text": " " + format_prompt}]
            else:
                message["content"] = f"{(content or '').rstrip()} {format_prompt}"
            break
    return messages


def _first_text(messages) -> str:
    if isinstance(messages, str):
        return messages
    return completion_text(messages[:1]) if messages else ""


def _read_verifiable_jsonl(path: str, image_folder: str | None):
    """`{"image": rel_path | [paths] | null, "question": str, "answer" | "solution": str}` per line."""
    import datasets

    root = image_folder or os.path.dirname(os.path.abspath(path))
    rows = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            if not line.strip():
                continue
            obj = json.loads(line)
            image = obj.get("image")
            images = [image] if isinstance(image, str) else list(image or [])
            question = str(obj["question"]).replace("<image>\n", "").replace("<image>", "").strip()
            rows.append(
                {
                    "images": [p if os.path.isabs(p) else os.path.join(root, p) for p in images],
                    "prompt": [{"role": "user", "content": question}],
                    "solution": str(obj.get("solution", obj.get("answer"))),
                }
            )
    return datasets.Dataset.from_list(rows)


def load_grpo_dataset(
    script_args: PivotGRPOScriptArguments, format_prompt: str | None = DEFAULT_FORMAT_PROMPT, tokenizer=None
):
    """Rows for `GRPOTrainer`: `prompt` (conversational), `images` (paths, decoded lazily) and `solution`.

    Rows of preference data (`chosen`) take their solution from the chosen answer (`extract_answer`); rows whose
    extracted answer is longer than `max_solution_words` are dropped, since free-form text cannot be checked by exact
    match. Returns `(dataset, stats)`.
    """
    import datasets

    from ..data import LazyImages, load_pivot_dataset

    name = script_args.dataset_name
    if name and name.endswith(".jsonl") and os.path.isfile(name) and _jsonl_has(name, "question"):
        dataset = _read_verifiable_jsonl(name, script_args.image_folder)
    else:
        path = os.path.expanduser(name or "")
        saved = datasets.load_from_disk(path) if os.path.isdir(path) and _is_saved_dataset(path) else None
        if isinstance(saved, datasets.DatasetDict):
            saved = saved[script_args.dataset_train_split]
        if saved is not None and "solution" in saved.column_names:
            dataset = saved
        else:
            dataset = load_pivot_dataset(
                name,
                "preference",
                tokenizer=tokenizer,
                num_samples=script_args.num_samples,
                seed=script_args.dataset_seed,
                split=script_args.dataset_train_split,
                image_folder=script_args.image_folder,
                variant=script_args.variant,
                new_distribution_ratio=script_args.new_distribution_ratio,
                max_text_tokens=script_args.max_text_tokens if tokenizer is not None else None,
                lazy_images=False,
            ).dataset
    total = len(dataset)
    if "solution" not in dataset.column_names:
        if "chosen" not in dataset.column_names:
            raise RecipeConfigError(
                f"{name}: the GRPO data needs a `solution` column (or preference rows with `chosen`, or a JSONL of "
                "question/answer)."
            )
        max_words = script_args.max_solution_words
        dataset = dataset.map(
            lambda row: {"solution": extract_answer(_first_text(row["chosen"]))},
            remove_columns=[c for c in ("chosen", "rejected") if c in dataset.column_names],
        )
        dataset = dataset.filter(lambda row: 0 < len(row["solution"].split()) <= max_words)
    dataset = dataset.map(lambda row: {"prompt": _with_format_prompt(row["prompt"], format_prompt)})
    if script_args.num_samples and script_args.num_samples > 0 and len(dataset) > script_args.num_samples:
        dataset = dataset.shuffle(seed=script_args.dataset_seed).select(range(script_args.num_samples))
    stats = {"source_rows": total, "kept_rows": len(dataset)}
    if "images" in dataset.column_names and len(dataset) and isinstance(dataset[0]["images"], list):
        if dataset[0]["images"] and isinstance(dataset[0]["images"][0], str):
            dataset = dataset.with_transform(LazyImages())
    logger.info("GRPO data: %d of %d rows kept (checkable answers).", len(dataset), total)
    return dataset, stats


def _jsonl_has(path: str, key: str) -> bool:
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                return key in json.loads(line)
    return False


def _is_saved_dataset(path: str) -> bool:
    return any(os.path.isfile(os.path.join(path, n)) for n in ("dataset_info.json", "dataset_dict.json"))


# --------------------------------------------------------------------------------------------------- arguments
@dataclass
class PivotGRPOScriptArguments(PivotScriptArguments):
    """Dataset options of `recipes/grpo.py` (those of the SFT/DPO recipes + how answers are checked)."""

    max_solution_words: int = field(
        default=8,
        metadata={
            "help": "Preference rows: keep a row only when the answer extracted from `chosen` has at most this many "
            "words (longer free-form answers cannot be verified by exact match)."
        },
    )


@dataclass
class PivotGRPOConfig(PivotTrainingFields, GRPOConfig):
    """TRL's `GRPOConfig` + tunable parts / per-part learning rates + the rule-based rewards."""

    reward_funcs: list[str] = field(
        default_factory=lambda: ["accuracy", "format"],
        metadata={"help": "Rewards, any of accuracy, format, length (weights: `reward_weights`, same order)."},
    )
    format_prompt: str | None = field(
        default=DEFAULT_FORMAT_PROMPT,
        metadata={"help": "Appended to each question so the model answers in <think>/<answer> tags; '' to disable."},
    )
    length_reward_target: float = field(
        default=512,
        metadata={"help": "Length reward: the length L0 at which sigmoid(scale * (L - L0)) = 0.5 (in length_unit)."},
    )
    length_reward_scale: float = field(
        default=1.0, metadata={"help": "Length reward: the sigmoid's scaling factor (the related study: 1)."}
    )
    length_reward_unit: str = field(
        default="tokens",
        metadata={
            "help": "Length reward: measure L in tokens, words or chars.",
            "choices": ["tokens", "words", "chars"],
        },
    )

    def __post_init__(self):
        self._pivot_post_init()
        self.reward_funcs = [r.strip() for item in self.reward_funcs for r in str(item).split(",") if r.strip()]
        unknown = [r for r in self.reward_funcs if r not in REWARD_NAMES]
        if unknown or not self.reward_funcs:
            raise RecipeConfigError(
                f"Unknown or empty reward_funcs {unknown or []}: choose from {list(REWARD_NAMES)}."
            )
        super().__post_init__()
        if self.reward_weights is not None and len(self.reward_weights) != len(self.reward_funcs):
            raise RecipeConfigError(
                f"reward_weights has {len(self.reward_weights)} entries for {len(self.reward_funcs)} reward_funcs."
            )


# ------------------------------------------------------------------------------------------------------ trainer
class PivotGRPOTrainer(AtomicCheckpointMixin, TunablePartsMixin, TrainingMonitorMixin, GRPOTrainer):
    """`PivotGRPOTrainer(model, reward_funcs, args=PivotGRPOConfig(...), train_dataset=..., processing_class=processor)`.

    The tunable parts, per-part learning-rate groups and the end-of-run check that the vision tower changed are the
    SFT/DPO trainers' own (`TunablePartsMixin`). With `beta > 0`, TRL builds the KL reference by reloading the
    policy's checkpoint (`model.config.name_or_path`), which `import pivot_hf` makes loadable as a Pivot model, with the
    policy's Hub-kernels choice (`use_kernels`, not transformers' default); with
    `peft_config` it is the adapter-disabled policy, and the tunable parts without adapters train in full beside them.
    """

    _tag_names = ["trl", "grpo", "pivot"]

    def __init__(self, model, reward_funcs=None, args: PivotGRPOConfig | None = None, *trainer_args, **kwargs):
        if args is None:
            args = PivotGRPOConfig(output_dir="pivot-grpo")
        args = as_pivot_config(args, PivotGRPOConfig)
        # TRL's positional order after `args`: train_dataset, eval_dataset, processing_class, ...
        train_dataset = kwargs.get("train_dataset", trainer_args[0] if trainer_args else None)
        kwargs["peft_config"] = self._setup_tunable_parts(
            model, args, train_dataset=train_dataset, peft_config=kwargs.get("peft_config")
        )
        # With `beta > 0` TRL reloads the KL reference itself: it gets the policy's Hub kernels, not transformers' default.
        with trl_reference_loads_like(model, args, GRPOTrainer):
            super().__init__(model, reward_funcs, args, *trainer_args, **kwargs)
        self._finish_tunable_parts()

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        # Under PEFT the KL reference is the adapter-disabled policy; PEFT's re-enable would un-freeze what the
        # tunable parts froze (see `preserved_requires_grad`).
        with preserved_requires_grad(self.model):
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)


__all__ = [
    "DEFAULT_FORMAT_PROMPT",
    "PivotGRPOConfig",
    "PivotGRPOScriptArguments",
    "PivotGRPOTrainer",
    "REWARD_NAMES",
    "accuracy_reward",
    "answers_match",
    "build_reward_funcs",
    "extract_answer",
    "format_reward",
    "load_grpo_dataset",
    "make_length_reward",
    "normalize_answer",
]
