"""A PEFT run's output (adapter + fully trained parts, PEFT's format) back into a plain Pivot checkpoint.

A run with `use_peft` saves `adapter_config.json` + `adapter_model.safetensors` (LoRA weights and the parts trained
in full beside them, PEFT's `modules_to_save`) for the base Pivot checkpoint named in `base_model_name_or_path`:

    base = PivotForConditionalGeneration.from_pretrained(base_checkpoint)
    model = PeftModel.from_pretrained(base, run_dir)      # the trained model, adapters live
    merged = model.merge_and_unload()                     # a plain Pivot model: LoRA folded in, trained copies in place

`merge_adapter_checkpoint` does this and saves the merged model with the run's processor and summary
(`recipes/merge_adapter.py` on the command line); `recipes/export_encoder.py` merges on the fly.
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path


logger = logging.getLogger(__name__)

ADAPTER_CONFIG_NAME = "adapter_config.json"
# Files of a run folder that describe the run (not the weights) and travel with the merged checkpoint.
_RUN_FILES = ("pivot_run.json", "training_args.json", "trainer_state.json", "data_report.json")


def is_adapter_dir(path: str | os.PathLike | None) -> bool:
    """Whether `path` is a folder holding a PEFT adapter (the output of a `use_peft` run)."""
    return bool(path) and (Path(path) / ADAPTER_CONFIG_NAME).is_file()


def load_adapter_model(adapter_dir: str | os.PathLike, base_model_name_or_path: str | None = None, dtype="auto"):
    """`PeftModel.from_pretrained(base, adapter_dir)` on the base Pivot checkpoint (default: the one the adapter
    records). Raises `FileNotFoundError` when the base cannot be found, naming the flag that fixes it."""
    from peft import PeftConfig, PeftModel

    from ..modeling_pivot import PivotForConditionalGeneration

    base = base_model_name_or_path or PeftConfig.from_pretrained(str(adapter_dir)).base_model_name_or_path
    looks_local = base and (base.startswith(("/", "./", "../", "~")) or base.count("/") > 1)
    if not base or (looks_local and not os.path.isdir(os.path.expanduser(base))):
        raise FileNotFoundError(
            f"The adapter in {adapter_dir} was trained on base checkpoint {base!r}, which is not available here. "
            "Fix: pass the base Pivot checkpoint (`--base_model_name_or_path <dir or Hub id>`)."
        )
    model = PivotForConditionalGeneration.from_pretrained(base, dtype=dtype, use_kernels=False)
    return PeftModel.from_pretrained(model, str(adapter_dir))


def merge_adapter(adapter_dir: str | os.PathLike, base_model_name_or_path: str | None = None, dtype="auto"):
    """The plain `PivotForConditionalGeneration` of a PEFT run: adapters merged into their layers, the parts trained
    in full (modules_to_save) in place of the originals."""
    model = load_adapter_model(adapter_dir, base_model_name_or_path, dtype=dtype).merge_and_unload()
    return model.eval()


def merge_adapter_checkpoint(
    adapter_dir: str | os.PathLike, output_dir: str | os.PathLike, base_model_name_or_path: str | None = None
) -> str:
    """Write the merged Pivot checkpoint of a PEFT run to `output_dir`, with the run's processor and run summary
    (so the encoder export's model card still knows how it was trained). Returns `output_dir`."""
    from ..processing_pivot import PivotProcessor

    adapter_dir, output_dir = Path(adapter_dir), Path(output_dir)
    model = merge_adapter(adapter_dir, base_model_name_or_path)
    model.save_pretrained(output_dir)
    PivotProcessor.from_pretrained(str(adapter_dir)).save_pretrained(output_dir)
    for name in _RUN_FILES:
        if (adapter_dir / name).is_file():
            shutil.copyfile(adapter_dir / name, output_dir / name)
    logger.info("Merged the adapter of %s into a plain Pivot checkpoint: %s", adapter_dir, output_dir)
    return str(output_dir)


__all__ = ["is_adapter_dir", "load_adapter_model", "merge_adapter", "merge_adapter_checkpoint"]
