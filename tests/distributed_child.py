"""Child process of the sharded-training tests (tests/test_distributed_fsdp.py); it defines no tests.

`python tests/distributed_child.py <script.py> [args...]`, usually under `accelerate launch`, runs a recipe as
`__main__` after wrapping `save_model` of the DPO, SFT and GRPO trainers, so the recipe needs no test-only code. After the final save
each rank reports how the model was held (FSDP2 units, DTensor parameters, optimizer groups), and all ranks run one
forward pass of the trained (possibly sharded) model on a fixed input; rank 0 writes that input, its logits and the
report to `<output_dir>/distributed_check.safetensors` / `distributed_check.json`, for comparison with the
checkpoint reloaded in a plain process.
"""

import json
import os
import runpy
import sys


def _report(trainer) -> dict:
    import torch

    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # pragma: no cover - torch without FSDP2
        FSDPModule = ()
    model = trainer.model
    fsdp_units = [name or "<root>" for name, m in model.named_modules() if isinstance(m, FSDPModule)]
    dtensors = sum(type(p).__name__ == "DTensor" for p in model.parameters())
    _benchmarks_on_path()
    from dpo_steps import optimizer_groups

    groups = optimizer_groups(trainer)  # DeepSpeed's own per-group lists under ZeRO (its param_groups are emptied)
    return {
        "distributed_type": str(trainer.accelerator.distributed_type),
        "world_size": trainer.accelerator.num_processes,
        "fsdp_units": fsdp_units,
        "dtensor_parameters": dtensors,
        # ZeRO-3: every parameter partitioned (`ds_id`), each rank holding a shard smaller than the tensor
        "zero3_partitioned": sum(hasattr(p, "ds_id") and p.ds_tensor.numel() < p.ds_numel for p in model.parameters()),
        "parameters": sum(1 for _ in model.parameters()),
        "optimizer_groups": groups,
        "losses": {str(e["step"]): e["loss"] for e in trainer.state.log_history if "loss" in e},
        # the end-of-run check (tensors changed per part), when the run made it
        "tunable_parts_report": getattr(trainer, "tunable_parts_report", None),
        "torch": torch.__version__,
    }


def _fixed_inputs(processor):
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8))
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is shown here?"}]}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True)
    return dict(processor(text=[text], images=[image], return_tensors="pt"))


def _benchmarks_on_path() -> None:
    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks", "gpu")
    if path not in sys.path:
        sys.path.insert(0, path)


def _allow_fsdp_on_cpu() -> None:
    """accelerate's FSDP path on CPU processes: see `benchmarks/gpu/dpo_steps.py:allow_fsdp_on_cpu`."""
    _benchmarks_on_path()
    from dpo_steps import allow_fsdp_on_cpu

    allow_fsdp_on_cpu()


def _install() -> None:
    from pivot_hf.trainer import PivotDPOTrainer, PivotSFTTrainer
    from pivot_hf.trainer.grpo import PivotGRPOTrainer

    if os.environ.get("PIVOT_TEST_FSDP_ON_CPU") == "1":
        _allow_fsdp_on_cpu()
    for trainer_class in (PivotDPOTrainer, PivotSFTTrainer, PivotGRPOTrainer):
        _wrap_save_model(trainer_class)


def _wrap_save_model(trainer_class) -> None:
    original = trainer_class.save_model

    def save_model(self, output_dir=None, _internal_call=False):
        result = original(self, output_dir, _internal_call)
        if _internal_call:
            return result
        import torch
        from safetensors.torch import save_file

        output_dir = output_dir or self.args.output_dir
        report = _report(self)
        inputs = {k: v.to(self.accelerator.device) for k, v in _fixed_inputs(self.processing_class).items()}
        model = self.model
        was_training = model.training
        model.eval()
        with torch.no_grad():
            logits = model(**inputs).logits.float().cpu()
        model.train(was_training)
        if self.accelerator.is_main_process:
            tensors = {f"input.{k}": v.cpu().contiguous() for k, v in inputs.items()}
            save_file(
                {"logits": logits.contiguous(), **tensors}, os.path.join(output_dir, "distributed_check.safetensors")
            )
            with open(os.path.join(output_dir, "distributed_check.json"), "w", encoding="utf-8") as f:
                json.dump(report, f, indent=2)
        self.accelerator.wait_for_everyone()
        return result

    trainer_class.save_model = save_model


def _record_resume() -> None:
    """Each rank writes the checkpoint it resumes from to `<output_dir>/resumed_from.rank<N>` (for the resume test)."""
    from pivot_hf.trainer import PivotDPOTrainer

    original = PivotDPOTrainer._load_from_checkpoint

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        path = os.path.join(self.args.output_dir, f"resumed_from.rank{self.args.process_index}")
        with open(path, "w", encoding="utf-8") as f:
            f.write(str(resume_from_checkpoint))
        return original(self, resume_from_checkpoint, model)

    PivotDPOTrainer._load_from_checkpoint = _load_from_checkpoint


def main() -> None:
    script = sys.argv[1]
    sys.argv = [script] + sys.argv[2:]
    # The fault hooks of the single-process kill-and-resume tests (SIGKILL before an optimizer step, or in a save).
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from test_reliability_child import _install_hooks

    _install_hooks()
    _record_resume()
    _install()
    runpy.run_path(script, run_name="__main__")


if __name__ == "__main__":
    main()
