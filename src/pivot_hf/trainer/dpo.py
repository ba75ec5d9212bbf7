"""`PivotDPOTrainer`: TRL's DPOTrainer with the vision tower training (PIVOT), against an explicit frozen reference.

The loss is TRL's: sigmoid DPO with `beta` and sequence log-probs summed over response tokens is PIVOT (Eq. 1); the
other `loss_type`s (and lists of them with `loss_weights`, e.g. MPO) pass through. `FastDPOMixin` (shared image
features, shared-prefix forward, cached reference log-probs) sits ahead of TRL so its overrides take effect.
"""

from __future__ import annotations

from trl import DPOTrainer

from ..checkpointing import AtomicCheckpointMixin
from ..configs import RecipeConfigError
from ..fast_dpo import FastDPOMixin
from .callbacks import TrainingMonitorMixin
from .model_loading import check_reference_model
from .preflight import check_model_processor
from .tunable import TunablePartsMixin


class PivotDPOTrainer(AtomicCheckpointMixin, FastDPOMixin, TunablePartsMixin, TrainingMonitorMixin, DPOTrainer):
    """`PivotDPOTrainer(model, ref_model, args=PivotDPOConfig(...), train_dataset=..., processing_class=processor)`.

    `ref_model` must be given unless `precompute_ref_log_probs` is set: PIVOT's reference is a separately loaded
    frozen copy of the starting checkpoint (`pivot_hf.trainer.load_reference_model`), never the policy itself.
    """

    _tag_names = ["trl", "dpo", "pivot"]

    def __init__(self, model, ref_model=None, args=None, *trainer_args, after_tunable_parts=None, **kwargs):
        if args is None:
            from ..configs import PivotDPOConfig

            args = PivotDPOConfig(output_dir="pivot-dpo")
        if ref_model is None and not args.precompute_ref_log_probs:
            raise RecipeConfigError(
                "PivotDPOTrainer needs an explicit reference model (a frozen copy of the starting checkpoint). Fix: "
                "pass `ref_model=load_reference_model(model_args, model)`, or set `precompute_ref_log_probs: true`."
            )
        if ref_model is not None:
            check_reference_model(model, ref_model, "ref_model")
            ref_model.requires_grad_(False)
            ref_model.eval()
        check_model_processor(getattr(model, "config", None), kwargs.get("processing_class"))
        self._setup_tunable_parts(model, args, after_tunable_parts)
        super().__init__(model, ref_model, args, *trainer_args, **kwargs)


__all__ = ["PivotDPOTrainer"]
