"""`PivotSFTTrainer`: TRL's SFTTrainer with tunable parts, per-part learning rates and atomic checkpoints.

Used for Stage 1a (projector pretraining, `plain` captions), Stage 1b (full finetuning), the Stage-2 SFT control and
Stage 3 (evaluation training). TRL's vision collator does the tokenisation and image processing on the fly.
"""

from __future__ import annotations

from trl import SFTTrainer

from .base import PivotTrainerMixin
from .tunable import as_pivot_config


class PivotSFTTrainer(PivotTrainerMixin, SFTTrainer):
    """`PivotSFTTrainer(model, args=PivotSFTConfig(...), train_dataset=..., processing_class=processor)`.

    With `peft_config` (e.g. a `LoraConfig`, or `pivot_hf.trainer.adapters.lora_config_from_model_args`), the parts
    of `args.tunable_parts` that carry no adapter train in full beside the adapters (PEFT's `modules_to_save`).
    """

    _tag_names = ["trl", "sft", "pivot"]
    _row_contract_kind = "sft"

    def __init__(
        self,
        model,
        args=None,
        data_collator=None,
        train_dataset=None,
        eval_dataset=None,
        processing_class=None,
        compute_loss_func=None,
        compute_metrics=None,
        callbacks=None,
        optimizers=(None, None),
        optimizer_cls_and_kwargs=None,
        preprocess_logits_for_metrics=None,
        quantization_config=None,
        peft_config=None,
        formatting_func=None,
        *,
        after_tunable_parts=None,
    ):
        from ..configs import PivotSFTConfig

        args = PivotSFTConfig(output_dir="pivot-sft") if args is None else as_pivot_config(args, PivotSFTConfig)
        train_dataset, eval_dataset, peft_config = self._pivot_prepare(
            model, args, processing_class, train_dataset, eval_dataset, peft_config, after_tunable_parts
        )
        super().__init__(
            model=model,
            args=args,
            data_collator=data_collator,
            train_dataset=train_dataset,
            eval_dataset=eval_dataset,
            processing_class=processing_class,
            compute_loss_func=compute_loss_func,
            compute_metrics=compute_metrics,
            callbacks=callbacks,
            optimizers=optimizers,
            optimizer_cls_and_kwargs=optimizer_cls_and_kwargs,
            preprocess_logits_for_metrics=preprocess_logits_for_metrics,
            quantization_config=quantization_config,
            peft_config=peft_config,
            formatting_func=formatting_func,
        )
        self._pivot_finish()


__all__ = ["PivotSFTTrainer"]
