"""Encoder export: the PIVOT-trained vision tower of a Pivot checkpoint as a plain transformers model (its own class
and image processor, no remote code), its model card, the projector for Stage-3 reuse, and the Hub push.

`encoder.py` does the export (`export_encoder`, `run_export`, `push_encoder_to_hub`, projector save/load/reuse);
`model_card.py` writes the card from the run's metadata; `merge.py` turns a `use_peft` run (PEFT adapter) into a
plain Pivot checkpoint. Command line: `recipes/export_encoder.py`.
"""

from . import encoder as _encoder
from .encoder import *  # noqa: F403  (the public API of the export, listed once in encoder.__all__)
from .merge import is_adapter_dir, load_adapter_model, merge_adapter, merge_adapter_checkpoint
from .model_card import describe_run


__all__ = [
    *_encoder.__all__,
    "describe_run",
    "is_adapter_dir",
    "load_adapter_model",
    "merge_adapter",
    "merge_adapter_checkpoint",
]
