"""`PivotTrainerMixin`: what every Pivot trainer (SFT, DPO, GRPO) adds to its TRL parent, in one place and one order.

A Pivot trainer is `class PivotXTrainer(PivotTrainerMixin, trl.XTrainer)` (DPO puts `FastDPOMixin` in between) with
TRL's own constructor signature, whose keywords it forwards. Its `__init__` calls `_pivot_prepare` before the parent
and `_pivot_finish` after it, so every trainer runs the same checks in the same order:

1. the model and the processor agree (`preflight.check_model_processor`);
2. the row contract on `train_dataset` / `eval_dataset`, before anything looks at a row (`row_contract`);
3. tunable parts, per-part learning rates and the PEFT split (`tunable`);
4. after the parent: the trainable split re-read after wrapping, the collate-time guard.

The behaviours that live on methods (atomic checkpoints and safe resume, per-part optimizer groups and the end-of-run
change check, update norms and curves) come from the four parts below, whose order here is the only one used.
"""

from __future__ import annotations

import logging

from .callbacks import TrainingMonitorMixin
from .checkpointing import AtomicCheckpointMixin
from .preflight import check_model_processor
from .row_contract import RowContractMixin
from .tunable import TunablePartsMixin


logger = logging.getLogger(__name__)


def uneven_last_batch_message(
    rows: int, world_size: int, per_device_batch: int, even_batches: bool, drop_last: bool, split_batches: bool = False
) -> str | None:
    """What an epoch of `rows` rows does on `world_size` processes when the rows do not fill the last global batch:
    accelerate's `even_batches` (on by default) refills that batch with rows from the start of the epoch, so those
    rows train twice per epoch and the run differs from one process. `None` when every batch is full, on one process,
    or when the last batch is dropped (`dataloader_drop_last`) or left uneven. With accelerate's `split_batches` the
    data loader's batch is the global one, split across the processes."""
    global_batch = per_device_batch if split_batches else world_size * per_device_batch
    remainder = rows % global_batch if global_batch else 0
    if world_size <= 1 or not remainder or drop_last or not even_batches:
        return None
    repeated = global_batch - remainder
    return (
        f"The training set has {rows} rows; with {world_size} processes x {per_device_batch} per device, the last "
        f"batch of every epoch is refilled with {repeated} rows from the start of the epoch (accelerate's "
        f"even_batches), which train twice per epoch, unlike on one process. For identical epochs use a row count "
        f"divisible by {global_batch}, or `dataloader_drop_last: true` (drops the last {remainder} rows instead)."
    )


class PivotTrainerMixin(RowContractMixin, AtomicCheckpointMixin, TunablePartsMixin, TrainingMonitorMixin):
    """The one mixin of the Pivot trainers (see the module docstring)."""

    def _pivot_prepare(
        self, model, args, processing_class, train_dataset, eval_dataset, peft_config=None, after_tunable_parts=None
    ):
        """Checks and set-up before the TRL parent is built; returns the checked `(train_dataset, eval_dataset,
        peft_config)` to hand to it."""
        check_model_processor(getattr(model, "config", None), processing_class)
        train_dataset, eval_dataset = self._contract_datasets(args, processing_class, train_dataset, eval_dataset)
        peft_config = self._setup_tunable_parts(
            model, args, after_tunable_parts, train_dataset=train_dataset, peft_config=peft_config
        )
        return train_dataset, eval_dataset, peft_config

    def get_train_dataloader(self):
        dataloader = super().get_train_dataloader()
        rows = len(self.train_dataset) if hasattr(self.train_dataset, "__len__") else None
        # GRPO deals prompts in generation batches of its own (repeated `num_generations` times): not this arithmetic.
        # With `dispatch_batches` the main process reads and sends every batch: another path, not this arithmetic.
        dispatched = bool(getattr(self.accelerator, "dispatch_batches", False))
        if rows is not None and getattr(self.args, "num_generations", None) is None and not dispatched:
            message = uneven_last_batch_message(
                rows,
                self.args.world_size,
                self.args.per_device_train_batch_size,
                getattr(self.accelerator, "even_batches", True),
                self.args.dataloader_drop_last,
                split_batches=bool(getattr(self.accelerator, "split_batches", False)),
            )
            if message is not None and self.is_world_process_zero():
                logger.warning(message)
        return dataloader

    def _pivot_finish(self) -> None:
        """After the parent: the trainable split after wrapping, and the collate-time guard."""
        self._finish_tunable_parts()
        self._guard_collator()


__all__ = ["PivotTrainerMixin", "uneven_last_batch_message"]
