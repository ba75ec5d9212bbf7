"""PIVOT data: MMPR preference pairs, LLaVA conversations and the paper's subsets as TRL rows with lazy images.

Entry point for the recipes: `load_pivot_dataset(dataset_name, kind)`. Converters write a `ConversionReport` in which
every input row is kept or skipped with a counted reason. Command line: `pivot-hf data --help` (see `cli.py`).
"""

from .images import LazyImages, check_image, load_image, resolve_image_path, to_rgb
from .llava import LlavaConfig, convert_llava, sample_indices
from .loader import PivotData, drop_overlong, load_pivot_dataset, save_dataset, sequence_lengths
from .mmpr import MMPRConfig, MMPRConversion, convert_mmpr, convert_mmpr_files, is_new_distribution
from .report import SKIP_REASONS, ConversionReport


__all__ = [
    "SKIP_REASONS",
    "ConversionReport",
    "LazyImages",
    "LlavaConfig",
    "MMPRConfig",
    "MMPRConversion",
    "PivotData",
    "check_image",
    "convert_llava",
    "convert_mmpr",
    "convert_mmpr_files",
    "drop_overlong",
    "is_new_distribution",
    "load_image",
    "load_pivot_dataset",
    "resolve_image_path",
    "sample_indices",
    "save_dataset",
    "sequence_lengths",
    "to_rgb",
]
