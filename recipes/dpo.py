"""PIVOT Stage 2: DPO post-training of a Pivot MLLM with the vision tower training (and the other preference losses).

    accelerate launch [--config_file accelerate_configs/zero3.yaml] recipes/dpo.py --config recipes/so400m.yaml \
        [--key value ...]

Recipe keys = CLI flags = the fields of `PivotScriptArguments` (data), `PivotModelConfig` (model) and
`PivotDPOConfig` (TRL's DPOConfig + tunable_parts, vision_tower_lr, projector_lr); `--help` lists them.
`loss_type: sigmoid` with `beta: 0.1` is PIVOT (Eq. 1); `loss_type: [sigmoid, bco_pair, sft]` with
`loss_weights: [0.8, 0.2, 1.0]` is MPO. The reference model is a separately loaded frozen copy of the starting
checkpoint (or `ref_model_name_or_path`). `output_dir` receives a Pivot checkpoint, the processor and the logs.

`use_peft: true` (TRL's keys: lora_r, lora_alpha, lora_dropout, lora_target_modules, use_dora, use_rslora, ...)
puts LoRA on `lora_target_parts` (default: the LLM) while the other tunable parts train in full; the reference is
then the adapter-disabled policy, and `output_dir` receives the adapter in PEFT's format (with the fully trained
parts) for the base checkpoint: `recipes/merge_adapter.py` turns it into a plain Pivot checkpoint.
"""

import logging
import os
import sys


os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


from transformers import set_seed  # noqa: E402

from pivot_hf.configs import PivotDPOConfig, PivotModelConfig, PivotScriptArguments, parse_recipe_args  # noqa: E402
from pivot_hf.trainer import (  # noqa: E402
    PivotDPOTrainer,
    apply_projector_init,
    load_model,
    load_reference_model,
)
from pivot_hf.trainer.adapters import lora_config_from_model_args  # noqa: E402
from pivot_hf.trainer.data_prep import load_training_data  # noqa: E402
from pivot_hf.trainer.logging_setup import setup_logging  # noqa: E402
from pivot_hf.trainer.preflight import load_checked_processor  # noqa: E402
from pivot_hf.trainer.reporting import save_run_summary  # noqa: E402


logger = logging.getLogger("pivot_hf.recipes.dpo")


def main(argv=None):
    script_args, model_args, training_args = parse_recipe_args(
        [PivotScriptArguments, PivotModelConfig, PivotDPOConfig], argv
    )
    setup_logging(training_args)
    set_seed(training_args.seed)

    # Everything that can be checked without weights (configs, processor, learning rates, DeepSpeed/FSDP setup) is
    # checked before a weight or an image is loaded.
    processor = load_checked_processor(model_args, training_args)
    train_dataset, eval_dataset, _ = load_training_data(script_args, training_args, processor, "preference")

    model = load_model(model_args, processor)
    # With `use_peft` (TRL's LoRA keys) the LLM gets adapters and the other tunable parts train in full beside them.
    peft_config = lora_config_from_model_args(model_args, model)
    # A frozen copy of the starting checkpoint, loaded before the policy is touched (with Stage-3 projector reuse
    # applied to it as well, so both start from the same network). Under PEFT no second model: the reference is the
    # policy with its adapters disabled (the trainer logs what that is).
    ref_model = None if peft_config is not None else load_reference_model(model_args, model)

    trainer = PivotDPOTrainer(
        model,
        ref_model,
        args=training_args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        processing_class=processor,
        peft_config=peft_config,
        after_tunable_parts=lambda m: apply_projector_init(m, model_args),
    )
    # The trainer owns the reference now; with `precompute_ref_log_probs` it frees it once its log-probs are cached,
    # which this name would prevent for the whole run.
    del ref_model
    result = trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    trainer.save_model(training_args.output_dir)
    save_run_summary(trainer, result, processor, script_args, model_args)
    return trainer


if __name__ == "__main__":
    main(sys.argv[1:])
