"""Preflight: the contract between model, processor, optimizer setup and data, checked before any weight moves.

Every training / evaluation script calls `run_preflight` right after parsing its arguments and loading the processor
(cheap: configs and tokenizer files only), and the trainers call `check_model_processor` again on the objects they are
given. Each refusal is a `RecipeConfigError` naming the values that disagree and the fix:

- model <-> processor: the image token id, every tokenizer id fits the embedding matrix, the chat template's control
  tokens are single tokens of the vocabulary, a fixed-resolution tower gets images of the size it was built for;
- every tunable part has a learning rate > 0 (`configs.check_part_lrs`);
- a DeepSpeed config builds neither the optimizer nor the LR scheduler (`tunable.check_distributed_config`), which
  would drop the per-part learning rates.

The data side (every row fits `max_length` with its measured image tokens; special-token text in messages) is checked
by the data loaders, which count each dropped row in the data report.
"""

from __future__ import annotations

import logging
import re

from transformers import AutoConfig

from ..configs import RecipeConfigError, check_part_lrs
from ..configuration_pivot import vision_config_from_any
from .model_loading import load_processor, preflight_model
from .tunable import check_distributed_config


logger = logging.getLogger(__name__)

# Control tokens written literally in chat templates: ChatML / Llama-3 / Phi style `<|...|>`.
_TEMPLATE_TOKEN_RE = re.compile(r"<\|[A-Za-z0-9_]+\|>")
# Towers whose position embeddings are fixed to `image_size` (others, e.g. DINOv2, interpolate them).
_FIXED_RESOLUTION = {"siglip_vision_model", "clip_vision_model", "vit", "vit_mae"}


def _embedding_rows(config) -> int:
    return int(config.text_config.vocab_size)


def check_model_processor(config, processor, source: str = "the model") -> None:
    """Refuse a model config and a `PivotProcessor` that would disagree at the first forward.

    Args:
        config: the `PivotConfig` of the model (or of the checkpoint, read without weights).
        processor: a `PivotProcessor` (anything without a tokenizer is ignored).
        source: how to name the model in messages (a path).

    Raises:
        RecipeConfigError: image token ids differ; a tokenizer id (image token, chat-template control token, added
            token) has no embedding row; a template control token is not one token; a fixed-resolution tower would
            receive images of another size than it was built for.
    """
    tokenizer = getattr(processor, "tokenizer", None)
    if tokenizer is None or config is None:
        return
    model_id = getattr(config, "image_token_id", None)
    processor_id = getattr(processor, "image_token_id", None)
    image_token = getattr(processor, "image_token", "<image>")
    if model_id is not None and processor_id is not None and int(model_id) != int(processor_id):
        raise RecipeConfigError(
            f"{source} and its processor disagree on the image token {image_token!r}: the model's image_token_id is "
            f"{model_id}, the processor's tokenizer maps it to {processor_id}. Every image would be lost at the first "
            "forward. Fix: compose model and processor from the same folders (both `from_vision_text_pretrained`), "
            f"or set `image_token_id: {processor_id}` in the checkpoint's config.json if the processor is the right one."
        )
    rows = _embedding_rows(config)
    if len(tokenizer) > rows:
        raise RecipeConfigError(
            f"The processor's tokenizer has {len(tokenizer)} tokens but {source} has {rows} embedding rows: ids "
            f"{rows}..{len(tokenizer) - 1} would index past the embeddings. Fix: compose the model with this tokenizer "
            "(`from_vision_text_pretrained(..., tokenizer=processor)` resizes the embeddings), or "
            "`model.resize_token_embeddings(len(tokenizer))` and save it."
        )
    template = getattr(processor, "chat_template", None) or ""
    for token in sorted(set(_TEMPLATE_TOKEN_RE.findall(template if isinstance(template, str) else str(template)))):
        ids = tokenizer.encode(token, add_special_tokens=False)
        if len(ids) != 1:
            raise RecipeConfigError(
                f"The chat template writes {token!r}, which the tokenizer splits into {len(ids)} tokens {ids}: the "
                "model would never see its control token. Fix: compose the processor with "
                "`PivotProcessor.from_vision_text_pretrained` (it adds the template's tokens), or add it with "
                f"`tokenizer.add_special_tokens` and resize the model's embeddings."
            )
        if ids[0] >= rows:
            raise RecipeConfigError(
                f"The chat template's control token {token!r} is id {ids[0]}, past the {rows} embedding rows of "
                f"{source}. Fix: resize the model's embeddings to the tokenizer (`len(tokenizer)` = {len(tokenizer)})."
            )
    vision = getattr(config, "vision_config", None)
    image_processor = getattr(processor, "image_processor", None)
    if vision is not None and image_processor is not None and getattr(vision, "model_type", None) in _FIXED_RESOLUTION:
        size = vision.image_size if isinstance(vision.image_size, int) else vision.image_size[0]
        patch = vision.patch_size if isinstance(vision.patch_size, int) else vision.patch_size[0]
        expected = (size // patch) ** 2
        got = processor.num_image_tokens()
        if got != expected:
            raise RecipeConfigError(
                f"The image processor makes {got} image tokens per image but the {vision.model_type} tower of {source} "
                f"was built for {size}px images ({expected} tokens of {patch}px patches). Fix: use the encoder's own "
                f"image processor (size {size}), or an encoder trained at the processor's resolution."
            )


def run_preflight(model_args, training_args=None, processor=None) -> dict:
    """All checks that need no weights; returns `{"vision_feature_layer": ...}` (the effective layer).

    Called by the recipes right after the processor is loaded and before data or weights. Checks the tunable parts'
    learning rates, the DeepSpeed config, the model source and feature layer (`preflight_model`), and, for a Pivot
    checkpoint, its config against the processor (`check_model_processor`).
    """
    if training_args is not None and hasattr(training_args, "tunable_parts"):
        check_part_lrs(training_args)
        check_distributed_config(training_args)
    layer = preflight_model(model_args)
    if processor is not None and model_args.model_name_or_path:
        config = AutoConfig.from_pretrained(model_args.model_name_or_path, revision=model_args.model_revision)
        check_model_processor(config, processor, model_args.model_name_or_path)
    elif processor is not None:
        # A fresh composition: the model follows the processor's tokenizer by construction; the tower's input size can
        # still disagree with the image processor.
        vision_config = vision_config_from_any(AutoConfig.from_pretrained(model_args.vision_model_name_or_path))
        probe = type("_Config", (), {"vision_config": vision_config, "image_token_id": None})()
        probe.text_config = type("_Text", (), {"vocab_size": len(processor.tokenizer)})()
        check_model_processor(probe, processor, model_args.vision_model_name_or_path)
    return {"vision_feature_layer": layer}


def load_checked_processor(model_args, training_args=None):
    """The first step of every training recipe: the config-only checks (`preflight_model`: model source, feature
    layer), then the processor, then every check that needs it (`run_preflight`) -- all before any data or weight is
    loaded, so a run that cannot work stops within seconds of its start. Returns the processor."""
    preflight_model(model_args)
    processor = load_processor(model_args)
    run_preflight(model_args, training_args, processor)
    return processor


__all__ = ["check_model_processor", "load_checked_processor", "run_preflight"]
