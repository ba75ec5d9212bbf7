"""Optional lmms-eval integration: import guards, the clear error, and registering the `pivot` model name.

lmms-eval is an optional extra (`pip install -e ".[eval]"`). Everything here imports without it; only the paths that
really run lmms-eval call `require_lmms_eval()`, which raises an ImportError saying what to install.

lmms-eval finds the `pivot` model in three ways:
- in-process: `register_with_lmms_eval()` (what `recipes/eval_mllm.py` does before `simple_evaluate`);
- the `lmms_eval.models` entry point group, payload `lmms_eval_manifest` (needs the package's entry point declared);
- `LMMS_EVAL_PLUGINS=pivot_hf.mllm_eval` (lmms-eval's older plugin mechanism, still read by v0.7): it imports
  `pivot_hf.mllm_eval.models` and its `AVAILABLE_MODELS`.
"""

import importlib.util


MODEL_NAME = "pivot"
ADAPTER_CLASS_PATH = "pivot_hf.mllm_eval.adapter.PivotLMM"
INSTALL_HINT = (
    'pip install -e ".[eval]" (GPU); on CPU: pip install --no-deps --target .venvs/lmms-eval -r requirements-eval-cpu.txt '
    "and PYTHONPATH=.venvs/lmms-eval"
)

_import_error: Exception | None = None
try:
    from lmms_eval.api.model import lmms as _lmms

    LMMS_EVAL_AVAILABLE = True
except ImportError as error:  # lmms-eval absent, or present with a missing dependency
    _lmms, LMMS_EVAL_AVAILABLE, _import_error = None, False, error


class _NoCacheHook:
    """Stand-in for lmms-eval's CacheHook when the adapter runs without lmms-eval."""

    def add_partial(self, attr, req, res) -> None:
        pass


class _LocalBase:
    """Base of the adapter without lmms-eval: the attributes lmms-eval's `lmms.__init__` would set."""

    def __init__(self) -> None:
        self._rank, self._world_size = 0, 1
        self.cache_hook = _NoCacheHook()
        self.task_dict = {}


def lmms_base() -> type:
    """lmms-eval's `lmms` base class when it imports, else a local stand-in with the same attributes."""
    return _lmms if LMMS_EVAL_AVAILABLE else _LocalBase


def require_lmms_eval() -> None:
    """Raise a clear ImportError when the real lmms-eval path is used without the `eval` extra."""
    if LMMS_EVAL_AVAILABLE:
        return
    found = importlib.util.find_spec("lmms_eval") is not None
    reason = f"it is installed but fails to import ({_import_error})" if found else "it is not installed"
    raise ImportError(
        f"Running the MLLM benchmarks needs lmms-eval, but {reason}. Install the extra: {INSTALL_HINT}. "
        "The offline path (`recipes/eval_mllm.py --local_task <task.yaml>`) works without it."
    )


def lmms_eval_manifest():
    """Entry point payload for the `lmms_eval.models` group: `pivot = pivot_hf.mllm_eval.registration:lmms_eval_manifest`."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return ModelManifest(model_id=MODEL_NAME, simple_class_path=ADAPTER_CLASS_PATH)


def register_with_lmms_eval(name: str = MODEL_NAME) -> str:
    """Make `--model <name>` / `simple_evaluate(model=<name>)` resolve to `PivotLMM` in this process."""
    require_lmms_eval()
    from lmms_eval.models import MODEL_REGISTRY_V2
    from lmms_eval.models.registry_v2 import ModelManifest

    MODEL_REGISTRY_V2.register_manifest(
        ModelManifest(model_id=name, simple_class_path=ADAPTER_CLASS_PATH), overwrite=True
    )
    return name


__all__ = [
    "ADAPTER_CLASS_PATH",
    "INSTALL_HINT",
    "LMMS_EVAL_AVAILABLE",
    "MODEL_NAME",
    "lmms_base",
    "lmms_eval_manifest",
    "register_with_lmms_eval",
    "require_lmms_eval",
]
