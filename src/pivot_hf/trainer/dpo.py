"""`PivotDPOTrainer`: TRL's DPOTrainer with the vision tower training (PIVOT), against a frozen reference.

The loss is TRL's: sigmoid DPO with `beta` and sequence log-probs summed over response tokens is PIVOT (Eq. 1); the
other `loss_type`s (and lists of them with `loss_weights`, e.g. MPO) pass through. `FastDPOMixin` (shared image
features, shared-prefix forward, cached reference log-probs) sits ahead of TRL so its overrides take effect.
"""

from __future__ import annotations

import copy
import logging

from accelerate.utils import is_peft_model
from trl import DPOTrainer

from .adapters import preserved_requires_grad
from .base import PivotTrainerMixin
from .compat import trl_reference_loads_like
from .fast_dpo import FastDPOMixin
from .model_loading import check_reference_model
from .tunable import as_pivot_config


logger = logging.getLogger(__name__)


class PivotDPOTrainer(PivotTrainerMixin, FastDPOMixin, DPOTrainer):
    """`PivotDPOTrainer(model, ref_model, args=PivotDPOConfig(...), train_dataset=..., processing_class=processor)`.

    `ref_model=None` does what TRL does: the reference is a frozen copy of the policy as passed (vision tower
    included; with `precompute_ref_log_probs` it lives only until the log-probs are cached). With `peft_config` there
    is no second model: the reference is the policy with its adapters disabled, where the parts trained in full beside
    the adapters (PEFT's `modules_to_save`) run as their frozen originals, i.e. exactly the starting network. The
    recipes load PIVOT's reference explicitly (`pivot_hf.trainer.load_reference_model`) unless `use_peft` is set.
    """

    _tag_names = ["trl", "dpo", "pivot"]
    _row_contract_kind = "preference"

    def __init__(
        self,
        model,
        ref_model=None,
        args=None,
        data_collator=None,
        train_dataset=None,
        eval_dataset=None,
        processing_class=None,
        compute_metrics=None,
        callbacks=None,
        optimizers=(None, None),
        quantization_config=None,
        peft_config=None,
        *,
        after_tunable_parts=None,
    ):
        from ..configs import PivotDPOConfig

        args = PivotDPOConfig(output_dir="pivot-dpo") if args is None else as_pivot_config(args, PivotDPOConfig)
        if ref_model is not None and ref_model is not model:
            check_reference_model(model, ref_model, "ref_model")
            ref_model.requires_grad_(False)
            ref_model.eval()
        train_dataset, eval_dataset, peft_config = self._pivot_prepare(
            model, args, processing_class, train_dataset, eval_dataset, peft_config, after_tunable_parts
        )
        if ref_model is None and _needs_reference_copy(model, args, peft_config):
            # TRL reloads `model.config.name_or_path`, which a freshly composed or modified model does not match; a
            # copy of the model as passed is the reference TRL means. (Precompute and PEFT need no separate model.)
            ref_model = copy.deepcopy(model).requires_grad_(False).eval()
        # Where TRL still reloads the reference itself (ZeRO-3; FSDP with precompute), it gets the policy's Hub kernels.
        with trl_reference_loads_like(model, args, DPOTrainer):
            super().__init__(
                model=model,
                ref_model=ref_model,
                args=args,
                data_collator=data_collator,
                train_dataset=train_dataset,
                eval_dataset=eval_dataset,
                processing_class=processing_class,
                compute_metrics=compute_metrics,
                callbacks=callbacks,
                optimizers=optimizers,
                quantization_config=quantization_config,
                peft_config=peft_config,
            )
        self._pivot_finish()
        if is_peft_model(self.model) and self.ref_model is None and self.is_world_process_zero():
            from .adapters import describe_reference

            adapted, full = self._peft_parts or ([], [])
            how = describe_reference(adapted, full)
            when = "once, before training (precompute_ref_log_probs)" if args.precompute_ref_log_probs else "live"
            logger.info("DPO reference (%s): %s.", when, how)

    # PEFT's `disable_adapter()` (the reference pass) marks every adapter and `modules_to_save` weight trainable on
    # exit; the flags set by the tunable parts are kept instead.
    def compute_ref_log_probs(self, model, inputs):
        with preserved_requires_grad(self.model):
            return super().compute_ref_log_probs(model, inputs)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        with preserved_requires_grad(self.model):
            return super().compute_loss(
                model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch
            )


def _needs_reference_copy(model, args, peft_config) -> bool:
    if isinstance(model, str) or args.precompute_ref_log_probs:
        return False
    if peft_config is not None or is_peft_model(model):
        return False
    # Under DeepSpeed ZeRO-3 parameters are partitioned and cannot be deep-copied: TRL's reload from the checkpoint
    # path is the way there.
    return not any(hasattr(p, "ds_id") for p in model.parameters())


__all__ = ["PivotDPOTrainer"]
