"""`PivotSFTTrainer`: TRL's SFTTrainer with tunable parts, per-part learning rates and atomic checkpoints.

Used for Stage 1a (projector pretraining, `plain` captions), Stage 1b (full finetuning), the Stage-2 SFT control and
Stage 3 (evaluation training). TRL's vision collator does the tokenisation and image processing on the fly.
"""

from __future__ import annotations

from trl import SFTTrainer

from .callbacks import TrainingMonitorMixin
from .checkpointing import AtomicCheckpointMixin
from .preflight import check_model_processor
from .row_contract import RowContractMixin, with_datasets
from .tunable import TunablePartsMixin, as_pivot_config


class PivotSFTTrainer(RowContractMixin, AtomicCheckpointMixin, TunablePartsMixin, TrainingMonitorMixin, SFTTrainer):
    """`PivotSFTTrainer(model, args=PivotSFTConfig(...), train_dataset=..., processing_class=processor)`.

    With `peft_config` (e.g. a `LoraConfig`, or `pivot_hf.trainer.adapters.lora_config_from_model_args`), the parts
    of `args.tunable_parts` that carry no adapter train in full beside the adapters (PEFT's `modules_to_save`).
    """

    _tag_names = ["trl", "sft", "pivot"]
    _row_contract_kind = "sft"

    def __init__(self, model, args=None, *trainer_args, after_tunable_parts=None, **kwargs):
        if args is None:
            from ..configs import PivotSFTConfig

            args = PivotSFTConfig(output_dir="pivot-sft")
        else:
            from ..configs import PivotSFTConfig

            args = as_pivot_config(args, PivotSFTConfig)
        # TRL's positional order after `args`: data_collator, train_dataset, eval_dataset, processing_class, ...
        processing_class = kwargs.get("processing_class", trainer_args[3] if len(trainer_args) > 3 else None)
        check_model_processor(getattr(model, "config", None), processing_class)
        train_dataset = kwargs.get("train_dataset", trainer_args[1] if len(trainer_args) > 1 else None)
        eval_dataset = kwargs.get("eval_dataset", trainer_args[2] if len(trainer_args) > 2 else None)
        # The row contract, before anything else looks at a row (and before any compute).
        train_dataset, eval_dataset = self._contract_datasets(args, processing_class, train_dataset, eval_dataset)
        trainer_args, kwargs = with_datasets(trainer_args, kwargs, 1, train_dataset, eval_dataset)
        kwargs["peft_config"] = self._setup_tunable_parts(
            model, args, after_tunable_parts, train_dataset=train_dataset, peft_config=kwargs.get("peft_config")
        )
        super().__init__(model, args, *trainer_args, **kwargs)
        self._finish_tunable_parts()
        self._guard_collator()


__all__ = ["PivotSFTTrainer"]
