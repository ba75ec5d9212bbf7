"""Supervised training of a Pivot MLLM: Stage 1a (projector pretraining), 1b (full finetuning), the Stage-2 SFT
control and Stage 3 (evaluation training of a fresh LLM on a frozen PIVOT encoder).

    accelerate launch [--config_file accelerate_configs/zero2.yaml] recipes/sft.py --config recipes/stage1a_projector.yaml \
        [--key value ...]

Recipe keys = CLI flags = the fields of `PivotScriptArguments` (data), `PivotModelConfig` (model) and
`PivotSFTConfig` (TRL's SFTConfig + tunable_parts, vision_tower_lr, projector_lr); `--help` lists them.
MMPR data gives the chosen answers of the same rows the DPO run uses (the SFT control). `output_dir` receives a
Pivot checkpoint, the processor and the logs.
"""

import logging
import os
import sys


os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


from transformers import set_seed  # noqa: E402

from pivot_hf.configs import PivotModelConfig, PivotScriptArguments, PivotSFTConfig, parse_recipe_args  # noqa: E402
from pivot_hf.trainer import PivotSFTTrainer, apply_projector_init, load_model  # noqa: E402
from pivot_hf.trainer.adapters import lora_config_from_model_args  # noqa: E402
from pivot_hf.trainer.collators import AssistantTurnsVisionCollator  # noqa: E402
from pivot_hf.trainer.data_prep import load_training_data  # noqa: E402
from pivot_hf.trainer.logging_setup import setup_logging  # noqa: E402
from pivot_hf.trainer.preflight import load_checked_processor  # noqa: E402
from pivot_hf.trainer.reporting import save_run_summary  # noqa: E402


logger = logging.getLogger("pivot_hf.recipes.sft")


def main(argv=None):
    script_args, model_args, training_args = parse_recipe_args(
        [PivotScriptArguments, PivotModelConfig, PivotSFTConfig], argv
    )
    setup_logging(training_args)
    set_seed(training_args.seed)

    # Everything that can be checked without weights (configs, processor, learning rates, DeepSpeed/FSDP setup) is
    # checked before a weight or an image is loaded.
    processor = load_checked_processor(model_args, training_args)
    train_dataset, eval_dataset, _ = load_training_data(script_args, training_args, processor, "sft")

    model = load_model(model_args, processor)
    # With `use_peft` (TRL's LoRA keys) the LLM gets adapters and the other tunable parts train in full beside them.
    peft_config = lora_config_from_model_args(model_args, model)
    collator = None
    if script_args.sft_loss_on == "assistant_turns" and {"messages", "images"} <= set(train_dataset.column_names):
        collator = AssistantTurnsVisionCollator(processor)
    trainer = PivotSFTTrainer(
        model,
        args=training_args,
        data_collator=collator,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        processing_class=processor,
        peft_config=peft_config,
        # Stage 3: reused projector layers are loaded (and frozen) after the tunable parts are set.
        after_tunable_parts=lambda m: apply_projector_init(m, model_args),
    )
    result = trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    trainer.save_model(training_args.output_dir)
    save_run_summary(trainer, result, processor, script_args, model_args)
    return trainer


if __name__ == "__main__":
    main(sys.argv[1:])
