"""pivot-hf: PIVOT (Preference-Instructed Vision OpTimization) on transformers + TRL.

Importing the package registers the Pivot classes with the transformers Auto classes, so that
`AutoModelForImageTextToText.from_pretrained(pivot_checkpoint)` and `AutoProcessor.from_pretrained(...)` work.
"""

from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForImageTextToText,
    AutoProcessor,
)

from .versions import warn_if_untested_versions


# Newer-than-tested releases are kept (setup.py bounds stop at the next major): one warning names them all, before
# the model files are imported (their own transformers warning, for remote code, then stays silent).
warn_if_untested_versions()

from .configuration_pivot import PivotConfig  # noqa: E402
from .modeling_pivot import PivotForConditionalGeneration, PivotModel, encode_images  # noqa: E402
from .processing_pivot import PivotProcessor  # noqa: E402


__version__ = "0.1.0.dev0"

AutoConfig.register("pivot", PivotConfig, exist_ok=True)
AutoModel.register(PivotConfig, PivotModel, exist_ok=True)
AutoModelForImageTextToText.register(PivotConfig, PivotForConditionalGeneration, exist_ok=True)
AutoProcessor.register(PivotConfig, PivotProcessor, exist_ok=True)

# Saved checkpoints carry `auto_map` and the model's files (configuration, modeling, compat shims, processing),
# so they load with `trust_remote_code=True` in a process that never imported pivot_hf.
PivotConfig.register_for_auto_class()
PivotModel.register_for_auto_class("AutoModel")
PivotForConditionalGeneration.register_for_auto_class("AutoModelForImageTextToText")
PivotProcessor.register_for_auto_class("AutoProcessor")

__all__ = [
    "PivotConfig",
    "PivotForConditionalGeneration",
    "PivotModel",
    "PivotProcessor",
    "encode_images",
    "__version__",
]
