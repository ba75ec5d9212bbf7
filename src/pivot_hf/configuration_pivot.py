"""Configuration of the Pivot MLLM: any vision encoder -> 2-layer MLP projector -> any causal LM.

This file and `modeling_pivot.py` / `pivot_compat.py` / `processing_pivot.py` import nothing from `pivot_hf` outside
of themselves: they are copied next to saved checkpoints (`auto_map`) so that a process which never installed pivot_hf
can load a Pivot checkpoint with `trust_remote_code=True`.
"""

import re
import warnings

import transformers
from huggingface_hub.dataclasses import strict
from transformers import LlavaConfig, PreTrainedConfig


# The transformers versions this file and modeling_pivot.py are tested with: `[lower, upper)`, upper exclusive at the
# first untested minor release. setup.py reads this constant, and it travels with every checkpoint (`auto_map`), so a
# checkpoint loaded years later under another transformers says what it was tested with.
TESTED_TRANSFORMERS_RANGE = ("5.18", "5.26")


def _minor_version(version: str) -> tuple[int, int]:
    match = re.match(r"(\d+)\.(\d+)", version)
    return (int(match.group(1)), int(match.group(2))) if match else (0, 0)


def untested_transformers_message(version: str | None = None) -> str | None:
    """The warning for a transformers `version` (default: the installed one) outside `TESTED_TRANSFORMERS_RANGE`, or
    None inside it. Pre-releases of the upper minor (`5.26.0.dev0`) are outside: nothing of them was tested."""
    version = transformers.__version__ if version is None else version
    lower, upper = TESTED_TRANSFORMERS_RANGE
    if _minor_version(lower) <= _minor_version(version) < _minor_version(upper):
        return None
    return (
        f"This Pivot model code was tested with transformers>={lower},<{upper}; transformers {version} is installed, "
        "so loading or running it may fail or differ. Either install a tested version "
        f"(`pip install 'transformers>={lower},<{upper}'`), or use the plain-transformers forms, which need no "
        "remote code: `model.to_llava()` (a LlavaForConditionalGeneration, saved with save_pretrained) or the "
        "exported vision encoder (recipes/export_encoder.py, loads with AutoModel)."
    )


def warn_if_untested_transformers() -> None:
    """Warn once per process when the installed transformers is outside `TESTED_TRANSFORMERS_RANGE`.

    Every checkpoint's remote code is its own copy of this file, so the flag lives in `sys` (one per process); the
    stdlib's "once" registry would not do: any warnings filter change (transformers makes many) resets it."""
    import sys

    message = untested_transformers_message()
    if message is None or getattr(sys, "_pivot_untested_transformers_warned", False):
        return
    sys._pivot_untested_transformers_warned = True
    warnings.warn(message, UserWarning, stacklevel=2)


# Leading tokens each vision family puts before its patch tokens. They are dropped before the projector: the LLM only
# sees patch tokens, as in LLaVA. SigLIP/SigLIP2 have no CLS token; DINOv2-with-registers adds its register tokens.
VISION_PREFIX_TOKENS = {
    "siglip_vision_model": 0,
    "siglip2_vision_model": 0,
    "clip_vision_model": 1,
    "dinov2": 1,
    "dinov2_with_registers": 1,  # + config.num_register_tokens
    "vit": 1,
    "vit_mae": 1,
    "deit": 2,  # CLS + distillation token
}

# Dual-encoder checkpoints whose vision half is what PIVOT trains (e.g. `google/siglip-so400m-patch14-384`).
DUAL_ENCODER_TYPES = {"siglip", "siglip2", "clip", "chinese_clip", "altclip"}

SUPPORTED_PROJECTORS = ("mlp2x_gelu", "linear")


def vision_config_from_any(config: PreTrainedConfig) -> PreTrainedConfig:
    """Return the vision-tower config of `config` (a vision config, or a dual encoder's config holding one)."""
    if config.model_type in DUAL_ENCODER_TYPES or (
        getattr(config, "vision_config", None) is not None and config.model_type not in VISION_PREFIX_TOKENS
    ):
        return config.vision_config
    return config


def num_vision_prefix_tokens(vision_config: PreTrainedConfig) -> int | None:
    """Leading non-patch tokens of a vision family, or None when the family is unknown (then inferred by a probe).

    An exported PIVOT encoder records its count (`pivot_vision_num_prefix_tokens`), which wins: it also covers families
    whose count was probed at composition (DINOv3, AIMv2, ...).
    """
    recorded = getattr(vision_config, "pivot_vision_num_prefix_tokens", None)
    if recorded is not None:
        return int(recorded)
    prefix = VISION_PREFIX_TOKENS.get(vision_config.model_type)
    if prefix is None:
        return None
    return prefix + int(getattr(vision_config, "num_register_tokens", 0) or 0)


def fixed_image_seq_length(vision_config: PreTrainedConfig) -> int:
    """Patch tokens per image at the tower's native resolution (SigLIP2 NaFlex: the maximum, `num_patches`)."""
    if vision_config.model_type == "siglip2_vision_model":
        return int(getattr(vision_config, "num_patches", 0) or 0)
    image_size = getattr(vision_config, "image_size", None)
    patch_size = getattr(vision_config, "patch_size", None)
    if not image_size or not patch_size:
        return 0
    image_size = image_size if isinstance(image_size, (list, tuple)) else (image_size, image_size)
    patch_size = patch_size if isinstance(patch_size, (list, tuple)) else (patch_size, patch_size)
    return (image_size[0] // patch_size[0]) * (image_size[1] // patch_size[1])


@strict
class PivotConfig(LlavaConfig):
    r"""
    Configuration of [`PivotForConditionalGeneration`]: a LLaVA-style MLLM whose vision tower can be any transformers
    vision model (SigLIP, SigLIP2 fixed-resolution or NaFlex, CLIP, DINOv2 with or without registers, ViT, ViT-MAE, ...)
    and whose language model is any `AutoModelForCausalLM` (Qwen2/Qwen2.5, Llama, ...).

    On top of [`LlavaConfig`]:

    vision_num_prefix_tokens (`int`, *optional*):
        Leading tokens of the tower's output that are not patches (CLS, registers, distillation). Dropped before the
        projector. Derived from the vision family when not given.
    projector_type (`str`, *optional*, defaults to `"mlp2x_gelu"`):
        `mlp2x_gelu` (Linear -> GELU -> Linear, LLaVA-1.5 and the PIVOT paper) or `linear`.
    image_seq_length (`int`, *optional*):
        Image tokens per image at the tower's native resolution (derived; the processor counts them from the pixels,
        which is what matters when an image processor resizes to another size).
    """

    model_type = "pivot"

    vision_num_prefix_tokens: int | None = None
    projector_type: str = "mlp2x_gelu"
    image_seq_length: int | None = None

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        if self.vision_num_prefix_tokens is None and self.vision_config is not None:
            self.vision_num_prefix_tokens = num_vision_prefix_tokens(self.vision_config)
        if self.vision_num_prefix_tokens is not None:
            # Kept in sync for tools that only know LLaVA's switch ("default" drops exactly one CLS token).
            self.vision_feature_select_strategy = "default" if self.vision_num_prefix_tokens == 1 else "full"
        if self.image_seq_length is None and self.vision_config is not None:
            self.image_seq_length = fixed_image_seq_length(self.vision_config)
        if self.vision_config is not None and self.vision_config.model_type == "vit_mae":
            # MAE pretraining masks 75% of the patches; a feature extractor must see all of them, in order.
            self.vision_config.mask_ratio = 0.0
        self.validate_pivot()

    def validate_pivot(self):
        """Fail on settings that would otherwise crash at the first forward, naming the fix."""
        if self.projector_type not in SUPPORTED_PROJECTORS:
            raise ValueError(
                f"projector_type={self.projector_type!r} is not supported; use one of {SUPPORTED_PROJECTORS}."
            )
        if self.vision_config is None:
            return
        num_layers = getattr(self.vision_config, "num_hidden_layers", None)
        layers = (
            self.vision_feature_layer if isinstance(self.vision_feature_layer, list) else [self.vision_feature_layer]
        )
        if num_layers is not None:
            for layer in layers:
                # hidden_states has num_layers + 1 entries: the embeddings, then one per block.
                if not -(num_layers + 1) <= layer <= num_layers:
                    raise ValueError(
                        f"vision_feature_layer={layer} cannot be reached by a vision tower with {num_layers} layers: "
                        f"use a value in [-{num_layers + 1}, {num_layers}] (the paper uses -2, the penultimate layer)."
                    )


__all__ = ["PivotConfig", "TESTED_TRANSFORMERS_RANGE"]
