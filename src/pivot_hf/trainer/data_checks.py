"""What the training data asks of the model, decided from the first row before any compute (TRL's own rule).

TRL's trainers call a dataset a vision dataset when its first row has an `image` or `images` key; the Pivot trainers
use the same rule so that they accept and refuse the same inputs as their TRL parents.
"""

from __future__ import annotations


def dataset_has_images(dataset) -> bool | None:
    """Whether the first row of `dataset` has an `image`/`images` key (None: no dataset, or an empty one)."""
    if dataset is None:
        return None
    if isinstance(dataset, dict):  # an eval dict; training data is a single dataset
        dataset = next(iter(dataset.values()), None)
        if dataset is None:
            return None
    try:
        sample = next(iter(dataset))
    except StopIteration:
        return None
    return "image" in sample or "images" in sample


def is_vision_language_model(model) -> bool:
    """A model with a vision tower (a Pivot MLLM or any transformers VLM), however it is wrapped."""
    config = getattr(model, "config", None)
    return getattr(config, "vision_config", None) is not None or hasattr(model, "get_image_features")


def check_vision_data_needs_vlm(model, train_dataset) -> None:
    """Image rows with a text-only LLM: refused before any compute, as TRL does (ValueError), naming the fix."""
    if isinstance(model, str) or not dataset_has_images(train_dataset) or is_vision_language_model(model):
        return
    config = getattr(model, "config", None)
    raise ValueError(
        "The dataset appears to be vision-related (contains 'image' or 'images' keys), but the provided model "
        f"({type(model).__name__}, {type(config).__name__}) is a text-only language model without a vision tower. "
        "Vision data needs a vision-language model. Fix: compose one with "
        "`PivotForConditionalGeneration.from_vision_text_pretrained(vision, text)` (recipes: set "
        "`vision_model_name_or_path` and `text_model_name_or_path`), or train on rows without images."
    )


__all__ = ["check_vision_data_needs_vlm", "dataset_has_images", "is_vision_language_model"]
