"""The private names of transformers and TRL that pivot_hf's trainers still rely on, in one place.

Each is looked up once, when this module is imported; a release that removes or reshapes one makes the import fail
loudly, naming the name and the tested version range, instead of a feature silently turning off. Nothing else in
pivot_hf assigns into another library's module or private attribute (`tests/test_seams.py` greps for it), and
docs/architecture.md lists every remaining touch with its guard.

- `trl.trainer.utils._use_triton`: TRL's fused LM head scores only the positions with a label when it returns True
  (on CUDA/XPU); elsewhere it scores every position. `compact_lm_head_scoring` makes it True for the scope of our
  forwards, on every device (the math is TRL's own).
- `PreTrainedModel._weight_conversions` (the load-time key renamings `save_pretrained` reverses): restricted to the
  ones that matched a key for the scope of a ZeRO-3 save (`used_weight_conversions_only`), put back on exit; a model
  without it is left alone (the ZeRO-3 save-name tests check the names written).
- `create_model_from_path` in TRL's trainer modules (public, module-level): while a TRL trainer builds a reference it
  reloads itself, it gets the policy's Hub-kernels choice (`trl_reference_loads_like`), put back on exit; a module
  without it is left alone.
- `transformers.Trainer._get_output_dir`, called by `Trainer._save_checkpoint` for the run folder: the atomic
  checkpoints stage a save by overriding it for the duration of that call (`checkpointing.AtomicCheckpointMixin`).
- The private `Trainer` methods a Pivot trainer overrides (`OVERRIDDEN_TRAINER_METHODS`): if a release dropped one,
  our override would never be called and its guarantee (atomic checkpoints, the saved model's names, the columns the
  collator keeps) would silently lapse. `tests/test_seams.py` checks that the list names every private override.
- `accelerate.Accelerator._models`, the list of every model `prepare` saw: a cached DPO reference is removed from it
  (`release_prepared_model`), or the list would keep the freed reference alive through training.
- `datasets.Dataset._data` / `._indices` (read only): `with_row_numbers` adds a column of row numbers to the Arrow
  table under a `select` / `shuffle` view and keeps the view's indices mapping, where the public `add_column` would
  first copy every selected row (image bytes included) to a new cache file. A `datasets` without them gets
  `add_column` (the view's positions as numbers, after that copy).
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata as metadata
import inspect
import sys

import transformers
import trl.trainer.utils as trl_utils


def _tested() -> str:
    from ..configuration_pivot import TESTED_TRANSFORMERS_RANGE
    from ..versions import TESTED_RANGES

    ranges = {"transformers": TESTED_TRANSFORMERS_RANGE, **{k: TESTED_RANGES[k] for k in ("trl", "accelerate")}}
    parts = [f"{name} >={low},<{high}" for name, (low, high) in ranges.items()]
    return ", ".join(parts[:-1]) + " and " + parts[-1]


# The versions the private names below were checked on: read from the one table of tested ranges.
TESTED = _tested()


def _installed() -> str:
    return (
        f"transformers {transformers.__version__}, trl {metadata.version('trl')}, "
        f"accelerate {metadata.version('accelerate')}"
    )


def _missing(what: str, why: str) -> ImportError:
    return ImportError(
        f"pivot_hf's trainers need {what}, which the installed {_installed()} does not provide ({why}). They are "
        f"tested with {TESTED}: install a tested version."
    )


_USE_TRITON = getattr(trl_utils, "_use_triton", None)
if not callable(_USE_TRITON):
    raise _missing("`trl.trainer.utils._use_triton`", "the switch of the fused LM head's compact scoring")


OVERRIDDEN_TRAINER_METHODS = ("_save", "_save_checkpoint", "_get_output_dir", "_set_signature_columns_if_needed")


def _check_overridden_methods() -> None:
    from transformers import Trainer

    for name in OVERRIDDEN_TRAINER_METHODS:
        if not callable(getattr(Trainer, name, None)):
            raise _missing(
                f"`transformers.Trainer.{name}`", "a Pivot trainer overrides it, so it must still be called"
            )


_check_overridden_methods()


def _check_checkpoint_output_dir() -> None:
    """`Trainer._save_checkpoint` must take its run folder from `self._get_output_dir`: otherwise a staged save would
    be written in place, never marked complete, and automatic resume would silently start fresh."""
    from transformers import Trainer

    # Both methods exist (`_check_overridden_methods`); what is checked here is that one calls the other.
    try:
        source = inspect.getsource(Trainer._save_checkpoint)
    except (OSError, TypeError):  # no source (a frozen install): the save-time check still guards it
        return
    if "self._get_output_dir(" not in source:
        raise _missing(
            "`Trainer._save_checkpoint` to take its run folder from `Trainer._get_output_dir`",
            "the atomic checkpoints stage each save there",
        )


_check_checkpoint_output_dir()


def _check_trl_reference_loaders() -> None:
    import trl.trainer.dpo_trainer
    import trl.trainer.grpo_trainer

    for module in (trl.trainer.dpo_trainer, trl.trainer.grpo_trainer):
        if not callable(getattr(module, "create_model_from_path", None)):
            raise _missing(
                f"`{module.__name__}.create_model_from_path`",
                "the reference TRL reloads itself must get the policy's Hub-kernels choice",
            )


_check_trl_reference_loaders()


def _check_accelerator_models() -> None:
    from accelerate import Accelerator

    try:
        source = inspect.getsource(Accelerator.__init__)
    except (OSError, TypeError):  # no source (a frozen install): release_prepared_model checks the type at call time
        return
    if "self._models" not in source:
        raise _missing("`accelerate.Accelerator._models`", "a cached DPO reference is released from it")


_check_accelerator_models()


def release_prepared_model(accelerator, model) -> None:
    """Remove `model` from the accelerator's list of prepared models (and nothing else), so that it can be freed.

    `Accelerator.prepare_model` keeps every model it prepared in that list, for `free_memory` and saving; TRL prepares
    the DPO reference there, so after the reference log-probs are cached the list is what keeps the frozen copy alive
    (3.4 GiB at the paper's shape). Raises `ImportError` (naming the installed and tested versions) if the accelerator
    no longer keeps such a list."""
    prepared = getattr(accelerator, "_models", None)
    if not isinstance(prepared, list):
        raise _missing("`accelerate.Accelerator._models` (a list)", "a cached DPO reference is released from it")
    prepared[:] = [m for m in prepared if m is not model]


@contextlib.contextmanager
def compact_lm_head_scoring(enabled: bool = True):
    """Make TRL's fused LM head score only positions with a label (what it does on CUDA) on every device.

    TRL scores every position off CUDA so that Neuron graphs keep static shapes; on CPU that projects hundreds of image
    and prompt tokens through the vocabulary for nothing. The math is TRL's own, only the gather of positions changes.
    The switch is TRL's module-level function, so it holds for the process while the scope lasts and is restored on
    exit, exception or not.
    """
    if not enabled:
        yield
        return
    original = trl_utils._use_triton
    trl_utils._use_triton = lambda device: True
    try:
        yield
    finally:
        trl_utils._use_triton = original


@contextlib.contextmanager
def used_weight_conversions_only(model):
    """While active, `model`'s recorded load-time renamings are only those that matched a key at load (what the
    ordinary load path records), so `save_pretrained` writes the names a one-process save writes. A no-op for a model
    that recorded none; the recorded list is put back on exit."""
    conversions = getattr(model, "_weight_conversions", None)
    if not conversions or all(getattr(c, "was_used", lambda: True)() for c in conversions):
        yield  # the ordinary load path already kept only the used ones (or nothing was recorded)
        return
    model._weight_conversions = [c for c in conversions if getattr(c, "was_used", lambda: True)()]
    try:
        yield
    finally:
        model._weight_conversions = conversions  # the model is left as it was


@contextlib.contextmanager
def trl_reference_loads_like(policy, args, trainer_class):
    """Inside it, a reference model that TRL's `trainer_class` loads itself gets the policy's Hub-kernels choice.

    TRL builds the reference by reloading the policy's checkpoint (`create_model_from_path` with
    `args.model_init_kwargs`) for GRPO with `beta > 0`, and for DPO without a `ref_model` under ZeRO-3 (or FSDP with
    `precompute_ref_log_probs`). transformers 5.25+ loads it with Hub kernels on by default, whatever the policy has,
    which makes the reference compute other numbers than the policy at step 0 (and the lower end of the range loads
    it with them off when the policy has them on). A `use_kernels` in `model_init_kwargs` is kept as given.
    """
    module = sys.modules.get(trainer_class.__module__)
    load = getattr(module, "create_model_from_path", None)
    if load is None or "use_kernels" in (getattr(args, "model_init_kwargs", None) or {}):
        yield
        return
    from .model_loading import uses_hub_kernels

    use_kernels = uses_hub_kernels(policy)

    def create_model_from_path(*load_args, **load_kwargs):
        load_kwargs.setdefault("use_kernels", use_kernels)
        return load(*load_args, **load_kwargs)

    module.create_model_from_path = create_model_from_path
    try:
        yield
    finally:
        module.create_model_from_path = load


def with_row_numbers(dataset, column: str, start: int = 0):
    """`(dataset with an int64 `column`, stop)`: the rows of the Arrow table under `dataset` numbered `start`,
    `start + 1`, ... (`stop` is one past the last number). A view made by `select` / `shuffle` shows the numbers of
    the stored rows it maps to: two positions of a view number alike only if they are the same stored row."""
    import pyarrow as pa
    from datasets import Dataset, Value

    if column in dataset.column_names:
        dataset = dataset.remove_columns(column)
    table, indices = getattr(dataset, "_data", None), getattr(dataset, "_indices", False)
    try:
        from datasets.arrow_dataset import update_metadata_with_features
        from datasets.table import InMemoryTable, concat_tables
    except ImportError:
        table = None
    if table is None or indices is False:
        numbers = list(range(start, start + len(dataset)))
        return dataset.add_column(column, numbers, feature=Value("int64")), start + len(dataset)
    stop = start + table.num_rows
    numbered = InMemoryTable.from_arrays([pa.array(range(start, stop), type=pa.int64())], names=[column])
    info = dataset.info.copy()
    info.features[column] = Value("int64")
    table = update_metadata_with_features(concat_tables([table, numbered], axis=1), info.features)
    # Deterministic (every rank and every run derive the same one), so caches keyed by it stay valid.
    fingerprint = hashlib.sha256(f"{getattr(dataset, '_fingerprint', None)}:{column}:{start}".encode()).hexdigest()[
        :16
    ]
    out = Dataset(table, info=info, split=dataset.split, indices_table=indices, fingerprint=fingerprint)
    fmt = dataset.format
    columns = fmt["columns"]
    if columns is not None and set(columns) == set(dataset.column_names):
        columns = [*columns, column]  # a format over every column keeps covering every column (as `add_column`)
    out.set_format(fmt["type"], columns=columns, output_all_columns=fmt["output_all_columns"], **fmt["format_kwargs"])
    return out, stop


__all__ = [
    "OVERRIDDEN_TRAINER_METHODS",
    "TESTED",
    "compact_lm_head_scoring",
    "release_prepared_model",
    "trl_reference_loads_like",
    "used_weight_conversions_only",
    "with_row_numbers",
]
