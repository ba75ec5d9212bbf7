"""pivot-hf: PIVOT (Preference-Instructed Vision OpTimization) on transformers + TRL.

Importing the package registers the Pivot classes with the transformers Auto classes, so that
`AutoModelForImageTextToText.from_pretrained(pivot_checkpoint)` and `AutoProcessor.from_pretrained(...)` work.
"""

import importlib
import importlib.abc
import importlib.util
import sys

from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForImageTextToText,
    AutoProcessor,
)

from .configuration_pivot import PivotConfig
from .modeling_pivot import PivotForConditionalGeneration, PivotModel, encode_images
from .processing_pivot import PivotProcessor
from .versions import warn_if_untested_versions


__version__ = "0.1.0.dev0"

# Newer-than-tested releases are kept (setup.py bounds stop at the next major), so say so once.
warn_if_untested_versions()

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

# Modules that moved to the package that shows where they run (`trainer/`: everything inside a Trainer; `export/`)
# stay importable under their earlier names, as the same module objects (so `monkeypatch.setattr` on either name hits
# the code that runs). Nothing is imported until the old name is.
_MOVED_MODULES = {
    f"{__name__}.fast_dpo": f"{__name__}.trainer.fast_dpo",
    f"{__name__}.checkpointing": f"{__name__}.trainer.checkpointing",
    f"{__name__}.grpo": f"{__name__}.trainer.grpo",
    f"{__name__}.model_card": f"{__name__}.export.model_card",
}


class _MovedModuleFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, fullname, path=None, target=None):
        return importlib.util.spec_from_loader(fullname, self) if fullname in _MOVED_MODULES else None

    def create_module(self, spec):
        module = importlib.import_module(_MOVED_MODULES[spec.name])
        self._spec = module.__spec__  # the import system stamps the alias spec on the module; `exec_module` undoes it
        return module

    def exec_module(self, module):
        module.__spec__ = self._spec


if not any(isinstance(finder, _MovedModuleFinder) for finder in sys.meta_path):
    sys.meta_path.append(_MovedModuleFinder())

__all__ = [
    "PivotConfig",
    "PivotForConditionalGeneration",
    "PivotModel",
    "PivotProcessor",
    "encode_images",
    "__version__",
]
