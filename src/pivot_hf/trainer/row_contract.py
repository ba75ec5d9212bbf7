"""The trainers' side of the row contract: every dataset a Pivot trainer is handed is checked before any compute, and
a row that becomes unreadable later is skipped at collate time, never fatal.

- `RowContractMixin.__init__` runs `pivot_hf.data.contract.apply_row_contract` on `train_dataset` and `eval_dataset`
  (a `Dataset` built by hand, a loader's output, an `IterableDataset`), before the TRL parent sees them, and writes
  `output_dir/data_report.json` (the loader's counts, when the dataset came from `load_pivot_dataset`, plus the
  trainer's).
- `CollateGuard` wraps the trainer's collator: rows that `LazyImages` marked unreadable (a file deleted or replaced
  after the check) are left out of their micro-batch and counted as `image_unreadable_at_collate` with their id. A
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

import torch
from transformers import TrainerCallback

from ..data.contract import apply_row_contract
from ..data.images import UNREADABLE_KEY
from ..data.report import ConversionReport


logger = logging.getLogger(__name__)

REPORT_FILENAME = "data_report.json"
ZERO_WEIGHT_KEY = "pivot_zero_weight"
SKIPPED_KEY = "pivot_skipped_rows"
_REPORTS: dict[str, ConversionReport] = {}


def attach_report(dataset, report: ConversionReport) -> None:
    """Remember the loader's `report` for `dataset`, so the trainer's counts continue it (same totals)."""
    fingerprint = getattr(dataset, "_fingerprint", None)
    if fingerprint:
        _REPORTS[fingerprint] = report


def _report_for(dataset, name: str) -> ConversionReport | None:
    fingerprint = getattr(dataset, "_fingerprint", None)
    report = _REPORTS.get(fingerprint) if fingerprint else None
    if report is None and hasattr(dataset, "__len__"):
        report = ConversionReport(source=name, total=len(dataset), kept=len(dataset))
    return report


def _row_id(example: dict, fallback: str) -> str:
    value = example.get("id")
    return str(value) if isinstance(value, str | int) else fallback


class CollateGuard:
    """Wraps a collator: rows marked unreadable by `LazyImages` are left out (and reported in the batch under
    `SKIPPED_KEY`); an empty micro-batch becomes a zero-weight fallback batch (`ZERO_WEIGHT_KEY`)."""

    def __init__(self, inner, dataset, mask_labels: bool, strip_id: bool = False, substitute: bool = False):
        self.inner, self.dataset, self.mask_labels, self.substitute = inner, dataset, mask_labels, substitute
        self.skipped: list[tuple[str, str]] = []  # substitute mode: recorded here (the batch is a list of rows)
        self.strip_id = strip_id  # the id column rides along for the report only: the inner collator never sees it
        self._fallback = None

    def __call__(self, examples):
        if self.substitute:
            return self._substituted(examples)
        good, skipped = [], []
        for position, example in enumerate(examples):
            reason = example.pop(UNREADABLE_KEY, None)
            if reason:
                skipped.append((_row_id(example, f"batch-row-{position}"), reason))
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
        for position, example in enumerate(examples):
            reason = example.pop(UNREADABLE_KEY, None)
            if reason:
                row_id = _row_id(example, f"batch-row-{position}")
                self.skipped.append((row_id, reason))
                logger.warning("Row %s skipped at collate time: its image could not be read (%s).", row_id, reason)
                example = {**self._fallback_row(), "id": row_id}
            out.append({**example, UNREADABLE_KEY: reason})
        return self.inner(out)

    def _fallback_row(self) -> dict:
        if self._fallback is None:
            for index in range(len(self.dataset)):
                row = dict(self.dataset[index])
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
        # Lengths stay TRL's business here (its truncation of a handed dataset is what a drop-in must keep); the
        # loaders drop rows too long for their image tokens before a recipe gets here.
        options = {}
        if max_pixels:
            options["max_image_pixels"] = max_pixels
        reports = {}
        if train_dataset is not None:
            report = _report_for(train_dataset, "train_dataset")
            train_dataset, reports["train"] = apply_row_contract(train_dataset, kind, processor, report, **options)
        if isinstance(eval_dataset, dict):
            checked = {}
            for name, dataset in eval_dataset.items():
                report = _report_for(dataset, f"eval_dataset[{name}]")
                checked[name], reports[f"eval:{name}"] = apply_row_contract(
                    dataset, kind, processor, report, **options
                )
            eval_dataset = checked
        elif eval_dataset is not None:
            report = _report_for(eval_dataset, "eval_dataset")
            eval_dataset, reports["eval"] = apply_row_contract(eval_dataset, kind, processor, report, **options)
        self._data_reports = reports
        if train_dataset is not None and hasattr(train_dataset, "__len__") and len(train_dataset) == 0:
            raise ValueError(
                f"No training row passed the row contract (skipped: {dict(reports['train'].skipped)}; record ids in "
                f"the report). Fix the data: every image readable and local, non-empty answers, chosen != rejected."
            )
        self._collate_skips: list[tuple[str, str]] = []
        self._reported_skips: set[str] = set()
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
        # The record id reaches the collate guard (which names a skipped row by it) when the Trainer would drop it.
        super()._set_signature_columns_if_needed()
        if self._signature_columns is not None and "id" not in self._signature_columns:
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
            for row_id, reason in skipped:
                logger.warning("Row %s skipped at collate time: its image could not be read (%s).", row_id, reason)
            self._collate_skips.extend((str(row_id), str(reason)) for row_id, reason in skipped)
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
        report = self._data_reports.get("train")
        for row_id, _reason in skips:
            if report is not None and row_id not in self._reported_skips:
                self._reported_skips.add(row_id)
                report.move_kept_to_skipped("image_unreadable_at_collate", [row_id])
        if self.accelerator.is_main_process:
            self._write_data_report()

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
