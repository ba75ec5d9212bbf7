"""Training data for the recipes: `load_pivot_dataset` with the model's image-token count, so over-long rows are dropped
before training (a cut inside the image tokens would otherwise stop a run mid-epoch)."""

from __future__ import annotations

import json
import logging
import os

from ..configs import PivotScriptArguments, RecipeConfigError
from ..data import LazyImages, load_pivot_dataset
from ..data.loader import image_token_measure
from .model_loading import check_max_length
from .row_contract import attach_report


logger = logging.getLogger(__name__)


def _split_last_assistant_turn(example: dict) -> dict:
    """`messages` -> conversational prompt / completion: the loss then covers the last assistant answer only."""
    messages = example["messages"]
    last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
    return {"prompt": messages[:last], "completion": messages[last : last + 1]}


def load_training_data(script_args: PivotScriptArguments, training_args, processor, kind: str):
    """`(train_dataset, eval_dataset | None, report)` for `kind` `"preference"` (DPO) or `"sft"`."""
    if not script_args.dataset_name:
        raise RecipeConfigError(
            "No `dataset_name` given. Fix: set it to an MMPR folder, LLaVA JSON, saved dataset or Hub id."
        )
    num_image_tokens = processor.num_image_tokens()
    check_max_length(training_args.max_length, num_image_tokens)
    dataset, report = load_pivot_dataset(
        script_args.dataset_name,
        kind,
        tokenizer=processor,
        max_length=training_args.max_length,
        # Fixed-resolution towers: one count for every image; NaFlex: each row's images measured.
        num_image_tokens=image_token_measure(processor),
        num_samples=script_args.num_samples,
        seed=script_args.dataset_seed,
        split=script_args.dataset_train_split,
        template=script_args.template,
        image_folder=script_args.image_folder,
        variant=script_args.variant,
        new_distribution_ratio=script_args.new_distribution_ratio,
        max_text_tokens=script_args.max_text_tokens,
        max_image_pixels=training_args.max_image_pixels,
    )
    if len(dataset) == 0:
        raise RecipeConfigError(
            f"No training rows left from {script_args.dataset_name} (skipped: {dict(report.skipped)}). Fix: check the "
            f"data path and images; if rows were dropped as `exceeds_max_length`, raise `max_length` "
            f"(now {training_args.max_length}, {num_image_tokens} image tokens per image)."
        )
    lazy = "images" in dataset.column_names
    raw = dataset.with_format(None)
    if kind == "sft" and script_args.sft_loss_on == "last_assistant_turn" and "messages" in raw.column_names:
        raw = raw.map(_split_last_assistant_turn, remove_columns=["messages"], desc="prompt/completion")
    eval_dataset = None
    if script_args.eval_num_samples > 0:
        n = min(script_args.eval_num_samples, len(raw) - 1)
        eval_dataset, raw = raw.select(range(n)), raw.select(range(n, len(raw)))
    if lazy:
        raw = raw.with_transform(LazyImages(max_pixels=training_args.max_image_pixels))
        if eval_dataset is not None:
            eval_dataset = eval_dataset.with_transform(LazyImages(max_pixels=training_args.max_image_pixels))
    # The trainer checks these rows again (the contract runs on whatever a trainer is handed) and continues this
    # report, so `data_report.json` counts every row of the source once.
    attach_report(raw, report, checked_max_length=training_args.max_length)
    logger.info(
        "Training rows: %d (report: kept %d of %d, skipped %s)",
        len(raw),
        report.kept,
        report.total,
        dict(report.skipped),
    )
    if getattr(training_args, "output_dir", None) and _is_main_process():
        os.makedirs(training_args.output_dir, exist_ok=True)
        with open(os.path.join(training_args.output_dir, "data_report.json"), "w", encoding="utf-8") as f:
            f.write(report.to_json() if hasattr(report, "to_json") else json.dumps(report.to_dict()))
    return raw, eval_dataset, report


def _is_main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


__all__ = ["load_training_data"]
