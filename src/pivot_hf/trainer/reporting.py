"""What a recipe run leaves in `output_dir` beside the checkpoint: metrics, trainer state and `pivot_run.json`."""

from __future__ import annotations

import json
import os

from .adapters import peft_summary


def save_run_summary(trainer, train_output, processor, script_args, model_args) -> dict:
    """Save metrics, state, the processor and a `pivot_run.json` summary (last logged metrics, tunable-part check)."""
    metrics = dict(train_output.metrics)
    trainer.log_metrics("train", metrics)
    trainer.save_metrics("train", metrics)
    trainer.save_state()
    summary = {}
    if trainer.is_world_process_zero():
        output_dir = trainer.args.output_dir
        processor.save_pretrained(output_dir)
        logged = [entry for entry in trainer.state.log_history if "loss" in entry]
        report = getattr(trainer, "tunable_parts_report", None) or {}
        tags = set(getattr(trainer, "_tag_names", []) or [])
        method = next((m for m in ("dpo", "grpo", "sft") if m in tags), None)
        summary = {
            # What produced the checkpoint, for the exported encoder's model card.
            "method": method,
            "loss_type": getattr(trainer.args, "loss_type", None) if method == "dpo" else None,
            "dataset_name": script_args.dataset_name,
            "model_name_or_path": model_args.model_name_or_path
            or f"{model_args.vision_model_name_or_path} + {model_args.text_model_name_or_path}",
            "tunable_parts": list(trainer.args.tunable_parts),
            "learning_rates": {
                group.get("name", str(i)): group.get("initial_lr", group["lr"])
                for i, group in enumerate(trainer.optimizer.param_groups)
            }
            if trainer.optimizer is not None
            else {},
            "global_step": trainer.state.global_step,
            "world_size": trainer.args.world_size,
            "train_metrics": metrics,
            "first_log": logged[0] if logged else {},
            "last_log": logged[-1] if logged else {},
            "tensors_changed": {part: [e["changed"], e["total"]] for part, e in report.items()},
            # LoRA rank, alpha, DoRA/rsLoRA and the parts trained in full beside the adapters (None: no PEFT).
            "peft": peft_summary(trainer.accelerator.unwrap_model(trainer.model)),
        }
        with open(os.path.join(output_dir, "pivot_run.json"), "w", encoding="utf-8") as f:
            json.dump(summary, f, indent=2, default=str)
    # No rank leaves while the main process is still writing: a launcher stops every rank when one exits with an
    # error, which would cut the final files short.
    trainer.accelerator.wait_for_everyone()
    return summary
