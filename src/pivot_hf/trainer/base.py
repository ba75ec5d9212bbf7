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

from .callbacks import TrainingMonitorMixin
from .checkpointing import AtomicCheckpointMixin
from .preflight import check_model_processor
from .row_contract import RowContractMixin
from .tunable import TunablePartsMixin


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

    def _pivot_finish(self) -> None:
        """After the parent: the trainable split after wrapping, and the collate-time guard."""
        self._finish_tunable_parts()
        self._guard_collator()


__all__ = ["PivotTrainerMixin"]
