"""Training: the Pivot SFT / DPO trainers (TRL subclasses), tunable parts, and model building from recipe args."""

from .base import PivotTrainerMixin
from .dpo import PivotDPOTrainer
from .model_loading import (
    apply_projector_init,
    check_feature_layer,
    check_max_length,
    check_reference_model,
    load_model,
    load_processor,
    load_reference_model,
    preflight_model,
)
from .sft import PivotSFTTrainer
from .tunable import TunablePartsMixin, apply_tunable_parts, checksums, part_of, trainable_split


__all__ = [
    "PivotDPOTrainer",
    "PivotSFTTrainer",
    "PivotTrainerMixin",
    "TunablePartsMixin",
    "apply_projector_init",
    "apply_tunable_parts",
    "check_feature_layer",
    "check_max_length",
    "check_reference_model",
    "checksums",
    "load_model",
    "load_processor",
    "load_reference_model",
    "part_of",
    "preflight_model",
    "trainable_split",
]
