"""The trainers' side of the row contract: every dataset a Pivot trainer is handed is checked before any compute, and
a row that becomes unreadable later is skipped at collate time, never fatal.

- `RowContractMixin.__init__` runs `pivot_hf.data.contract.apply_row_contract` on `train_dataset` and `eval_dataset`
  (a `Dataset` built by hand, a loader's output, an `IterableDataset`), before the TRL parent sees them, and writes
  `output_dir/data_report.json` (the loader's counts, when the dataset came from `load_pivot_dataset`, plus the
  trainer's).
- `CollateGuard` wraps the trainer's collator: rows that `LazyImages` marked unreadable (a file deleted or replaced
  after the check) are left out of their micro-batch and counted as `image_unreadable_at_collate` with their id,
  once per row (`ROW_KEY` says what one row is). A
  micro-batch left empty is replaced by a *fallback* row whose loss is multiplied by 0: every rank still runs one
  forward and backward per micro-batch (DDP / ZeRO-3 collectives stay in step), and the update is that of the
  remaining rows only. (An SFT fallback carries no label token, so the Trainer's token count of the accumulation
  window is unchanged; a DPO fallback's reward metrics enter that step's logged means.) GRPO batches are groups of
  generations spread over ranks, so there the row is replaced by the fallback row instead and every reward of it is
  0 (`zero_reward_for_skipped_rows`): equal rewards in its group, zero advantage, no update from it.
- `DataReportCallback` gathers the collate-time skips of every rank at each save and at the end of training, and
  rank 0 rewrites `data_report.json` atomically: what was written before is never lost.
"""

from __future__ import annotations

import functools
import json
import logging
import os
from collections.abc import MutableMapping

import datasets
import torch
from transformers import TrainerCallback

from ..data.contract import apply_row_contract
from ..data.images import UNREADABLE_KEY
from ..data.report import ConversionReport
from .compat import with_row_numbers


logger = logging.getLogger(__name__)

REPORT_FILENAME = "data_report.json"
ZERO_WEIGHT_KEY = "pivot_zero_weight"
SKIPPED_KEY = "pivot_skipped_rows"
# The identity of a row for the collate-time count: a number the trainer gives every stored row of each dataset it
# holds (train, then each eval dataset, in one range per trainer), carried as a column to the collate guard. A record
# id cannot be it: ids repeat (two distinct rows may share one, and rows without an id would be named by their place
# in a batch), so keying by id merges distinct rows. The number is the same wherever the row comes back: a second
# epoch, GRPO's repeated prompts, the padding a distributed sampler adds by repeating rows of other ranks, the same
# row skipped on two ranks. Each skipped row therefore counts once, and only once, in the report.
ROW_KEY = "pivot_row"
# dataset fingerprint -> (the loader's report, the `max_length` its rows were already measured against)
_REPORTS: dict[str, tuple[ConversionReport, int | None]] = {}


def attach_report(dataset, report: ConversionReport, checked_max_length: int | None = None) -> None:
    """Remember the loader's `report` for `dataset`, so the trainer's counts continue it (same totals).

    `checked_max_length`: the `max_length` the loader already dropped `dataset`'s over-long rows for, with the
    processor the trainer gets: the trainer then does not tokenize every row a second time for the same answer.
    """
    fingerprint = getattr(dataset, "_fingerprint", None)
    if fingerprint:
        _REPORTS[fingerprint] = (report, checked_max_length)


def _report_for(dataset, name: str) -> tuple[ConversionReport | None, int | None]:
    fingerprint = getattr(dataset, "_fingerprint", None)
    report, checked_max_length = _REPORTS.get(fingerprint, (None, None)) if fingerprint else (None, None)
    if report is None and hasattr(dataset, "__len__"):
        report = ConversionReport(source=name, total=len(dataset), kept=len(dataset))
    return report, checked_max_length


def _record_id(example: dict) -> str | None:
    value = example.get("id")
    return str(value) if isinstance(value, str | int) else None


def _label(number, name) -> str:
    return name if name is not None else f"#{number}"


class CollateGuard:
    """Wraps a collator: rows marked unreadable by `LazyImages` are left out (and reported in the batch under
    `SKIPPED_KEY`); an empty micro-batch becomes a zero-weight fallback batch (`ZERO_WEIGHT_KEY`)."""

    def __init__(self, inner, dataset, mask_labels: bool, strip_id: bool = False, substitute: bool = False):
        self.inner, self.dataset, self.mask_labels, self.substitute = inner, dataset, mask_labels, substitute
        # (row number, record id, reason); substitute mode records here (its batch is a list of rows)
        self.skipped: list[tuple[int | None, str | None, str]] = []
        self.strip_id = strip_id  # the id column rides along for the report only: the inner collator never sees it
        self._fallback = None

    def __call__(self, examples):
        if self.substitute:
            return self._substituted(examples)
        good, skipped = [], []
        for example in examples:
            number = example.pop(ROW_KEY, None)  # ours: the inner collator never sees it
            reason = example.pop(UNREADABLE_KEY, None)
            if reason:
                skipped.append((number, _record_id(example), reason))
            else:
                good.append(example)
            if self.strip_id:
                example.pop("id", None)
        zero_weight = not good
        batch = self.inner(good or [self._fallback_row()])
        if zero_weight:
            batch[ZERO_WEIGHT_KEY] = True
            if self.mask_labels and isinstance(batch.get("labels"), torch.Tensor):
                batch["labels"] = torch.full_like(batch["labels"], -100)
        if skipped:
            batch[SKIPPED_KEY] = skipped
        return batch

    def _substituted(self, examples):
        """GRPO: the batch keeps its size (its rows are groups of generations spread over ranks); an unreadable row
        becomes the fallback row marked with its reason, whose rewards `zero_reward_for_skipped_rows` set to 0 for the
        whole group: equal rewards, zero advantage, no update from it."""
        out = []
        for example in examples:
            number = example.pop(ROW_KEY, None)  # ours: never a reward function's keyword
            reason = example.pop(UNREADABLE_KEY, None)
            if reason:
                name = _record_id(example)
                self.skipped.append((number, name, reason))
                logger.warning(
                    "Row %s skipped at collate time: its image could not be read (%s).", _label(number, name), reason
                )
                example = {**self._fallback_row(), **({"id": name} if name is not None else {})}
            out.append({**example, UNREADABLE_KEY: reason})
        return self.inner(out)

    def _fallback_row(self) -> dict:
        if self._fallback is None:
            for index in range(len(self.dataset)):
                row = dict(self.dataset[index])
                row.pop(ROW_KEY, None)
                if self.strip_id:
                    row.pop("id", None)
                if not row.pop(UNREADABLE_KEY, None):
                    self._fallback = row
                    break
            else:
                raise RuntimeError("No row of the training data can be read any more (all images are gone).")
        return dict(self._fallback)

    def __getattr__(self, name):
        return getattr(self.inner, name)


class DataReportCallback(TrainerCallback):
    """Folds every rank's collate-time skips into `data_report.json` at each save and at the end of training."""

    def __init__(self, trainer):
        self.trainer = trainer

    def on_save(self, args, state, control, **kwargs):
        self.trainer._flush_data_report()

    def on_train_end(self, args, state, control, **kwargs):
        self.trainer._flush_data_report()


class RowContractMixin:
    """Checks the datasets a trainer is handed (before any compute) and guards its collator (at collate time).

    Subclasses set `_row_contract_kind` (`"preference"`, `"sft"`, `"grpo"`) and call `_contract_datasets` before
    their TRL parent's `__init__`, then `_guard_collator` after it.
    """

    _row_contract_kind = "sft"

    def _contract_datasets(self, args, processor, train_dataset, eval_dataset):
        """Checked `(train_dataset, eval_dataset)`; the counts go to `output_dir/data_report.json` (main process)."""
        max_pixels = getattr(args, "max_image_pixels", None)
        kind = self._row_contract_kind
        options = {}
        if max_pixels:
            options["max_image_pixels"] = max_pixels
        # Rows too long for `max_length` with their image tokens are dropped and counted (`exceeds_max_length`), as
        # the loaders do on the recipe route, rather than left to TRL's truncation: a cut may fall inside the image
        # tokens (the first forward of that batch fails mid-epoch), and a preference pair cut short is compared on
        # what is left of its answers. `max_length: None` keeps every row (and TRL does not truncate either). GRPO
        # has no `max_length` (its lengths are generation limits). README, "Data".
        max_length = getattr(args, "max_length", None) if kind != "grpo" else None
        if max_length is not None and callable(getattr(processor, "num_image_tokens", None)):
            from .model_loading import check_max_length

            check_max_length(max_length, processor.num_image_tokens())  # the recipes' refusal, before any row

        def checked(dataset, name):
            report, measured = _report_for(dataset, name)
            length = {"max_length": max_length} if max_length is not None and measured != max_length else {}
            return apply_row_contract(dataset, kind, processor, report, **options, **length)

        reports = {}
        if train_dataset is not None:
            train_dataset, reports["train"] = checked(train_dataset, "train_dataset")
        if isinstance(eval_dataset, dict):
            done = {}
            for name, dataset in eval_dataset.items():
                done[name], reports[f"eval:{name}"] = checked(dataset, f"eval_dataset[{name}]")
            eval_dataset = done
        elif eval_dataset is not None:
            eval_dataset, reports["eval"] = checked(eval_dataset, "eval_dataset")
        self._data_reports = reports
        # Every stored row of every map-style dataset gets its number (`ROW_KEY`); `_row_ranges` maps a number back
        # to its dataset's report.
        self._row_ranges: list[tuple[int, int, str]] = []
        start = 0

        def numbered(dataset, name):
            nonlocal start
            if not isinstance(dataset, datasets.Dataset):
                return dataset  # streamed rows are checked (and counted) as they stream: no collate-time skip
            dataset, stop = with_row_numbers(dataset, ROW_KEY, start)
            self._row_ranges.append((start, stop, name))
            start = stop
            return dataset

        if train_dataset is not None:
            train_dataset = numbered(train_dataset, "train")
        if isinstance(eval_dataset, dict):
            eval_dataset = {name: numbered(dataset, f"eval:{name}") for name, dataset in eval_dataset.items()}
        elif eval_dataset is not None:
            eval_dataset = numbered(eval_dataset, "eval")
        if train_dataset is not None and hasattr(train_dataset, "__len__") and len(train_dataset) == 0:
            skipped = dict(reports["train"].skipped)
            longer = f" Rows longer than max_length={max_length} are dropped: raise it." if max_length else ""
            raise ValueError(
                f"No training row passed the row contract (skipped: {skipped}; record ids in the report). Fix the "
                f"data: every image readable and local, non-empty answers, chosen != rejected.{longer}"
            )
        self._collate_skips: list[tuple[int | None, str | None, str]] = []
        self._reported_skips: set[tuple] = set()
        self._data_report_dir = getattr(args, "output_dir", None)
        train_report = reports.get("train")
        if train_report is not None and train_report.num_skipped and _rank() == 0:
            logger.warning(
                "Row contract: %d of %d training rows skipped %s; record ids in %s.",
                train_report.num_skipped,
                train_report.total,
                dict(train_report.skipped),
                os.path.join(self._data_report_dir or ".", REPORT_FILENAME),
            )
        if _rank() == 0:
            self._write_data_report()
        return train_dataset, eval_dataset

    def _guard_collator(self):
        if self.data_collator is None or isinstance(self.data_collator, CollateGuard):
            return
        if self.train_dataset is None or not hasattr(self.train_dataset, "__getitem__"):
            # Streamed rows are decoded (and checked, counted) as they stream: the report is re-written at saves.
            self.add_callback(DataReportCallback(self))
            return
        self.data_collator = CollateGuard(
            self.data_collator,
            self.train_dataset,
            mask_labels=self._row_contract_kind == "sft",
            strip_id=getattr(self, "_contract_added_id", False),
            substitute=self._row_contract_kind == "grpo",
        )
        self.add_callback(DataReportCallback(self))

    def _set_signature_columns_if_needed(self):
        # The record id and the row number reach the collate guard (which names and counts a skipped row by them)
        # when the Trainer would drop them.
        super()._set_signature_columns_if_needed()
        if self._signature_columns is None:
            return
        if ROW_KEY not in self._signature_columns:
            self._signature_columns = [*self._signature_columns, ROW_KEY]
        if "id" not in self._signature_columns:
            self._signature_columns = [*self._signature_columns, "id"]
            self._contract_added_id = True
            if isinstance(self.data_collator, CollateGuard):
                self.data_collator.strip_id = True

    def _take_contract_keys(self, inputs) -> bool:
        """Pop the guard's keys from a batch (recording its skips); True for a zero-weight fallback batch."""
        if not isinstance(inputs, MutableMapping):  # a dict or a `BatchFeature`
            return False
        skipped = inputs.pop(SKIPPED_KEY, None)
        if skipped:
            for number, name, reason in skipped:
                logger.warning(
                    "Row %s skipped at collate time: its image could not be read (%s).", _label(number, name), reason
                )
            self._collate_skips.extend(skipped)
        return bool(inputs.pop(ZERO_WEIGHT_KEY, False))

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if not self._take_contract_keys(inputs):
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        return self._zero_weight_loss(model, inputs, return_outputs, num_items_in_batch)

    def _zero_weight_loss(self, model, inputs, return_outputs, num_items_in_batch):
        """The loss of a fallback batch times 0: a forward and backward that changes no weight."""
        if self._row_contract_kind == "sft":
            # Its labels are all masked (the window's token count excludes it): the logits carry the zero loss.
            outputs = model(**{k: v for k, v in inputs.items() if k != "labels"}, use_cache=False)
            loss = outputs.logits.float().sum() * 0.0
            return (loss, outputs) if return_outputs else loss
        loss = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        if return_outputs:
            return loss[0] * 0.0, loss[1]
        return loss * 0.0

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        self._take_contract_keys(inputs)
        return super().prediction_step(model, inputs, prediction_loss_only, ignore_keys=ignore_keys)

    # ------------------------------------------------------------------------------------------ the report
    def _flush_data_report(self):
        from accelerate.utils import gather_object

        local = list(self._collate_skips)
        self._collate_skips.clear()
        if isinstance(self.data_collator, CollateGuard):
            local += self.data_collator.skipped
            self.data_collator.skipped.clear()
        skips = gather_object([local])
        skips = [item for part in skips for item in (part or [])]
        for number, name, _reason in skips:
            # One row, one count (see `ROW_KEY`); a row without a number (a column set rebuilt by code that left ours
            # out) falls back to its record id.
            key = ("row", number) if number is not None else ("id", name)
            if key in self._reported_skips:
                continue
            self._reported_skips.add(key)
            report_name, label = self._row_origin(number, name)
            report = self._data_reports.get(report_name)
            if report is not None:
                report.move_kept_to_skipped("image_unreadable_at_collate", [label])
        if self.accelerator.is_main_process:
            self._write_data_report()

    def _row_origin(self, number, name) -> tuple[str, str]:
        """The report a numbered row belongs to, and how to name it there: its record id, else its number within
        its dataset (the stored row's position, which is how the contract names a row without an id)."""
        for start, stop, report_name in getattr(self, "_row_ranges", []):
            if number is not None and start <= number < stop:
                return report_name, name if name is not None else str(number - start)
        return "train", _label(number, name)

    def _write_data_report(self):
        if not self._data_report_dir or "train" not in self._data_reports:
            return
        data = self._data_reports["train"].to_dict()
        for name, report in self._data_reports.items():
            if name != "train":
                data[name] = report.to_dict()
        os.makedirs(self._data_report_dir, exist_ok=True)
        path = os.path.join(self._data_report_dir, REPORT_FILENAME)
        tmp = f"{path}.tmp{os.getpid()}"
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(data, f, indent=2, ensure_ascii=False, default=str)
        os.replace(tmp, path)  # atomic: a crash mid-write keeps the previous report


def zero_reward_for_skipped_rows(reward_func):
    """A reward function that gives 0.0 to rows the collate guard substituted (GRPO), the reward of others as is."""
    if not callable(reward_func) or isinstance(reward_func, torch.nn.Module):
        return reward_func

    @functools.wraps(reward_func)
    def reward(*args, **kwargs):
        rewards = reward_func(*args, **kwargs)
        marks = kwargs.get(UNREADABLE_KEY)
        if not marks:
            return rewards
        return [0.0 if mark else value for value, mark in zip(rewards, marks)]

    return reward


def _rank() -> int:
    return int(os.environ.get("RANK", "0"))


__all__ = [
    "CollateGuard",
    "DataReportCallback",
    "RowContractMixin",
    "attach_report",
    "zero_reward_for_skipped_rows",
]
