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
import os
from dataclasses import dataclass, field

from trl import GRPOConfig, GRPOTrainer

from ..configs import PivotScriptArguments, PivotTrainingFields, RecipeConfigError
from .adapters import preserved_requires_grad
from .base import PivotTrainerMixin
from .compat import trl_reference_loads_like
from .rewards import (
    DEFAULT_FORMAT_PROMPT,
    REWARD_NAMES,
    accuracy_reward,
    answers_match,
    build_reward_funcs,
    completion_text,
    extract_answer,
    format_reward,
    get_reward_funcs,
    make_length_reward,
    normalize_answer,
)
from .row_contract import zero_reward_for_skipped_rows
from .tunable import as_pivot_config


logger = logging.getLogger(__name__)


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
    """`{"image": rel_path | [paths] | null, "question": str, "answer" | "solution": str}` per line.

    A line that is not a JSON object, or has no string question, is counted and skipped; a missing or null answer is
    kept as None (never the string "None") for the row contract to skip as `missing_answer`. Returns
    `(dataset, report)`."""
    import datasets

    from ..data.contract import image_string_problem
    from ..data.report import ConversionReport

    root = image_folder or os.path.dirname(os.path.abspath(path))
    report = ConversionReport(source=path)
    rows = []
    with open(path, encoding="utf-8-sig") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            report.add_total()
            record_id = f"{os.path.basename(path)}:{number}"
            try:
                obj = json.loads(line)
            except json.JSONDecodeError:
                report.skip("broken_json", record_id)
                continue
            if not isinstance(obj, dict):
                report.skip("not_an_object", record_id)
                continue
            question = obj.get("question")
            if not isinstance(question, str) or not question.strip():
                report.skip("invalid_text", record_id)
                continue
            image = obj.get("image")
            images = [image] if isinstance(image, str) else ([] if image is None else image)
            if not isinstance(images, list) or not all(isinstance(p, str) for p in images):
                report.skip("invalid_image_field", record_id)
                continue
            question = question.replace("<image>\n", "").replace("<image>", "").strip()
            solution = obj.get("solution", obj.get("answer"))
            rows.append(
                {
                    "id": str(obj["id"]) if isinstance(obj.get("id"), str | int) else record_id,
                    "images": [
                        p if os.path.isabs(p) or image_string_problem(p) else os.path.join(root, p) for p in images
                    ],
                    "prompt": [{"role": "user", "content": question}],
                    "solution": solution if isinstance(solution, str) or solution is None else str(solution),
                }
            )
            report.keep()
    return datasets.Dataset.from_list(rows), report


def load_grpo_dataset(
    script_args: PivotGRPOScriptArguments,
    format_prompt: str | None = DEFAULT_FORMAT_PROMPT,
    tokenizer=None,
    max_image_pixels: int | None = None,
):
    """Rows for `GRPOTrainer`: `prompt` (conversational), `images` (paths, decoded lazily) and `solution`.

    Rows of preference data (`chosen`) take their solution from the chosen answer (`extract_answer`); rows whose
    extracted answer is longer than `max_solution_words` are dropped (`answer_not_checkable`), since free-form text
    cannot be checked by exact match. Every route passes the row contract (`pivot_hf.data.contract`, kind `grpo`):
    rows without a ground truth (`missing_answer`), bad images and special-token text are counted and skipped;
    special tokens typed into a question are escaped. Returns `(dataset, stats)`; `stats["report"]` is the
    `ConversionReport`.
    """
    import datasets

    from ..data import LazyImages, load_pivot_dataset
    from ..data.contract import apply_row_contract
    from ..data.report import ConversionReport

    name = script_args.dataset_name
    report = None
    if name and name.endswith(".jsonl") and os.path.isfile(name) and _jsonl_has(name, "question"):
        dataset, report = _read_verifiable_jsonl(name, script_args.image_folder)
    else:
        path = os.path.expanduser(name or "")
        saved = datasets.load_from_disk(path) if os.path.isdir(path) and _is_saved_dataset(path) else None
        if isinstance(saved, datasets.DatasetDict):
            saved = saved[script_args.dataset_train_split]
        if saved is not None and "solution" in saved.column_names:
            dataset = saved
        else:
            dataset, report = load_pivot_dataset(
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
            )
    if report is None:
        report = ConversionReport(source=str(name), total=len(dataset), kept=len(dataset))
    dataset = dataset.with_format(None)
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
        checkable = [i for i, s in enumerate(dataset["solution"]) if 0 < len(s.split()) <= max_words]
        if len(checkable) < len(dataset):
            ids = dataset["id"] if "id" in dataset.column_names else [str(i) for i in range(len(dataset))]
            kept = set(checkable)
            report.move_kept_to_skipped(
                "answer_not_checkable", [str(ids[i]) for i in range(len(dataset)) if i not in kept]
            )
            dataset = dataset.select(checkable)
    pixels = {"max_image_pixels": max_image_pixels} if max_image_pixels else {}
    dataset, report = apply_row_contract(dataset, "grpo", tokenizer, report, lazy_images=False, **pixels)
    dataset = dataset.map(lambda row: {"prompt": _with_format_prompt(row["prompt"], format_prompt)})
    if script_args.num_samples and script_args.num_samples > 0 and len(dataset) > script_args.num_samples:
        report.move_kept_to_skipped("not_sampled", n=len(dataset) - script_args.num_samples)
        dataset = dataset.shuffle(seed=script_args.dataset_seed).select(range(script_args.num_samples))
    if "images" in dataset.column_names:
        dataset = dataset.with_transform(LazyImages(**({"max_pixels": max_image_pixels} if max_image_pixels else {})))
    stats = {"source_rows": report.total, "kept_rows": len(dataset), "skipped": dict(report.skipped), "report": report}
    logger.info("GRPO data: %d of %d rows kept (skipped %s).", len(dataset), report.total, dict(report.skipped))
    from .row_contract import attach_report

    attach_report(dataset, report)
    return dataset, stats


def _jsonl_has(path: str, key: str) -> bool:
    with open(path, encoding="utf-8-sig") as f:
        for line in f:
            if line.strip():
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError:
                    continue
                return isinstance(obj, dict) and key in obj
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
class PivotGRPOTrainer(PivotTrainerMixin, GRPOTrainer):
    """`PivotGRPOTrainer(model, reward_funcs, args=PivotGRPOConfig(...), train_dataset=..., processing_class=processor)`.

    The tunable parts, per-part learning-rate groups and the end-of-run check that the vision tower changed are the
    SFT/DPO trainers' own (`TunablePartsMixin`). With `beta > 0`, TRL builds the KL reference by reloading the
    policy's checkpoint (`model.config.name_or_path`), which `import pivot_hf` makes loadable as a Pivot model, with the
    policy's Hub-kernels choice (`use_kernels`, not transformers' default); with
    `peft_config` it is the adapter-disabled policy, and the tunable parts without adapters train in full beside them.
    """

    _tag_names = ["trl", "grpo", "pivot"]
    _row_contract_kind = "grpo"

    def __init__(
        self,
        model,
        reward_funcs=None,
        args: PivotGRPOConfig | None = None,
        train_dataset=None,
        eval_dataset=None,
        processing_class=None,
        reward_processing_classes=None,
        callbacks=None,
        optimizers=(None, None),
        quantization_config=None,
        peft_config=None,
        tools=None,
        rollout_func=None,
        environment_factory=None,
        *,
        after_tunable_parts=None,
    ):
        args = PivotGRPOConfig(output_dir="pivot-grpo") if args is None else as_pivot_config(args, PivotGRPOConfig)
        train_dataset, eval_dataset, peft_config = self._pivot_prepare(
            model, args, processing_class, train_dataset, eval_dataset, peft_config, after_tunable_parts
        )
        if reward_funcs is not None:
            funcs = reward_funcs if isinstance(reward_funcs, list) else [reward_funcs]
            reward_funcs = [zero_reward_for_skipped_rows(f) for f in funcs]
        # With `beta > 0` TRL reloads the KL reference itself: it gets the policy's Hub kernels, not transformers' default.
        with trl_reference_loads_like(model, args, GRPOTrainer):
            super().__init__(
                model=model,
                reward_funcs=reward_funcs,
                args=args,
                train_dataset=train_dataset,
                eval_dataset=eval_dataset,
                processing_class=processing_class,
                reward_processing_classes=reward_processing_classes,
                callbacks=callbacks,
                optimizers=optimizers,
                quantization_config=quantization_config,
                peft_config=peft_config,
                tools=tools,
                rollout_func=rollout_func,
                environment_factory=environment_factory,
            )
        self._pivot_finish()

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
    "get_reward_funcs",
    "load_grpo_dataset",
    "make_length_reward",
    "normalize_answer",
]
