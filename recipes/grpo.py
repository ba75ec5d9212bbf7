"""GRPO post-training of a Pivot MLLM with the vision tower training and rule-based rewards (paper Table C's RL arm;
the related study's verifiable rewards + sigmoid-normalised length reward).

    accelerate launch [--config_file accelerate_configs/zero3.yaml] recipes/grpo.py --config recipes/grpo.yaml \
        [--key value ...]

Recipe keys = CLI flags = the fields of `PivotGRPOScriptArguments` (data), `PivotModelConfig` (model) and
`PivotGRPOConfig` (TRL's GRPOConfig + tunable_parts, vision_tower_lr, projector_lr, reward_funcs, format_prompt,
length_reward_*); `--help` lists them. `dataset_name`: rows with `prompt` + `solution` (+ `images`), an MMPR folder /
preference rows (the answer is extracted from `chosen`), or a JSONL of {"image", "question", "answer"}.
`output_dir` receives a Pivot checkpoint, the processor and the logs (rewards per function under `rewards/<name>/mean`).
"""

import logging
import os
import sys


os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


from transformers import set_seed  # noqa: E402

from pivot_hf.configs import PivotModelConfig, parse_recipe_args  # noqa: E402
from pivot_hf.trainer import load_model  # noqa: E402
from pivot_hf.trainer.adapters import lora_config_from_model_args  # noqa: E402
from pivot_hf.trainer.grpo import (  # noqa: E402
    PivotGRPOConfig,
    PivotGRPOScriptArguments,
    PivotGRPOTrainer,
    build_reward_funcs,
    load_grpo_dataset,
)
from pivot_hf.trainer.logging_setup import setup_logging  # noqa: E402
from pivot_hf.trainer.preflight import load_checked_processor  # noqa: E402
from pivot_hf.trainer.reporting import save_run_summary  # noqa: E402


logger = logging.getLogger("pivot_hf.recipes.grpo")


def main(argv=None):
    script_args, model_args, training_args = parse_recipe_args(
        [PivotGRPOScriptArguments, PivotModelConfig, PivotGRPOConfig], argv
    )
    setup_logging(training_args)
    set_seed(training_args.seed)

    # Config-only checks first, then the data (cheap), then the weights.
    processor = load_checked_processor(model_args, training_args)
    train_dataset, stats = load_grpo_dataset(
        script_args, training_args.format_prompt or None, processor.tokenizer, training_args.max_image_pixels
    )
    if len(train_dataset) == 0:
        raise SystemExit(f"No GRPO rows with a checkable answer in {script_args.dataset_name} ({stats}).")
    reward_funcs = build_reward_funcs(
        training_args.reward_funcs,
        length_target=training_args.length_reward_target,
        length_scale=training_args.length_reward_scale,
        length_unit=training_args.length_reward_unit,
    )
    model = load_model(model_args, processor)
    # With `use_peft` (TRL's LoRA keys) the LLM gets adapters and the other tunable parts train in full beside them;
    # the KL reference is then the adapter-disabled policy.
    peft_config = lora_config_from_model_args(model_args, model)
    if training_args.beta > 0 and peft_config is None and not model_args.model_name_or_path:
        raise SystemExit(
            "beta > 0 needs a reference model, which TRL reloads from the policy's checkpoint: start GRPO from a "
            "Pivot checkpoint (`model_name_or_path`, e.g. the Stage-1 output), or set `beta: 0`."
        )

    trainer = PivotGRPOTrainer(
        model,
        reward_funcs,
        args=training_args,
        train_dataset=train_dataset,
        processing_class=processor,
        peft_config=peft_config,
    )
    result = trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    trainer.save_model(training_args.output_dir)
    save_run_summary(trainer, result, processor, script_args, model_args)
    return trainer


if __name__ == "__main__":
    main(sys.argv[1:])
