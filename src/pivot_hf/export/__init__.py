"""Encoder export: the PIVOT-trained vision tower of a Pivot checkpoint as a plain transformers model (its own class
and image processor, no remote code), its model card, the projector for Stage-3 reuse, and the Hub push.

`encoder.py` does the export (`export_encoder`, `run_export`, `push_encoder_to_hub`, projector save/load/reuse);
`model_card.py` writes the card from the run's metadata. Command line: `recipes/export_encoder.py`.
"""

from .encoder import (
    ExportEncoderArguments,
    apply_projector_reuse,
    export_encoder,
    extract_encoder,
    feature_layer_of,
    load_projector,
    push_encoder_to_hub,
    recorded_base_model,
    run_export,
    save_projector,
)
from .model_card import build_model_card, check_model_card, describe_run, find_eval_results, read_run_metadata


__all__ = [
    "ExportEncoderArguments",
    "apply_projector_reuse",
    "build_model_card",
    "check_model_card",
    "describe_run",
    "export_encoder",
    "extract_encoder",
    "feature_layer_of",
    "find_eval_results",
    "load_projector",
    "push_encoder_to_hub",
    "read_run_metadata",
    "recorded_base_model",
    "run_export",
    "save_projector",
]
