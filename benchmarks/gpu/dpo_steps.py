"""Run `recipes/dpo.py` (under `accelerate launch`) and report how the model was held and what the steps cost.

    accelerate launch --config_file CFG benchmarks/gpu/dpo_steps.py --report OUT.json recipes/dpo.py [recipe args]

The recipe runs unchanged, as `__main__`; after its final save the main process writes `OUT.json`: the accelerate
distributed type, the FSDP2 units or ZeRO-3 partitioned parameters, the optimizer's per-part groups, the per-step
losses, the tunable-part check, the training wall time and the peak CUDA memory. With `PIVOT_FSDP_ON_CPU=1` the FSDP
path of accelerate also runs on CPU processes (gloo), which is how the GPU check's code path is exercised without a GPU.
"""

from __future__ import annotations

import json
import os
import runpy
import sys
import time


def allow_fsdp_on_cpu() -> None:
    """Let accelerate run its FSDP path on CPU processes (gloo).

    accelerate 1.15 enables FSDP only for accelerator devices: with `use_cpu` its state becomes `MULTI_CPU` and drops
    the FSDP plugin the launcher configured (`AcceleratorState.__init__` lists the device types eligible for FSDP, and
    CPU is not among them), although `fully_shard` itself runs on CPU with gloo. This restores that one decision;
    everything after it (`fsdp2_prepare_model`, `fully_shard` of the wrap classes, the optimizer on DTensors, the
    FULL_STATE_DICT gather at save) is accelerate's and transformers' own code, as on GPUs.
    """
    from accelerate.state import AcceleratorState, PartialState
    from accelerate.utils import DistributedType

    original = AcceleratorState.__init__

    def __init__(self, *args, fsdp_plugin=None, **kwargs):
        original(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
        if fsdp_plugin is not None and self.distributed_type == DistributedType.MULTI_CPU:
            self.distributed_type = DistributedType.FSDP
            self.fsdp_plugin = fsdp_plugin
            # Every later `AcceleratorState()` copies the process state's type over its own: change it there too.
            PartialState._shared_state["distributed_type"] = DistributedType.FSDP

    AcceleratorState.__init__ = __init__


def sharding_report(trainer) -> dict:
    """How the prepared model is held: FSDP2 units and DTensor parameters, or ZeRO-3 partitioned parameters."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # pragma: no cover - torch without FSDP2
        FSDPModule = ()
    model = trainer.model_wrapped if trainer.model_wrapped is not None else trainer.model
    module = getattr(model, "module", model)
    params = list(module.parameters())
    return {
        "distributed_type": str(trainer.accelerator.distributed_type).rsplit(".", 1)[-1],
        "num_processes": trainer.accelerator.num_processes,
        "fsdp_units": [name or "<root>" for name, m in module.named_modules() if isinstance(m, FSDPModule)],
        "dtensor_parameters": sum(type(p).__name__ == "DTensor" for p in params),
        # partitioned: each rank holds a shard smaller than the tensor
        "zero3_partitioned_parameters": sum(hasattr(p, "ds_id") and p.ds_tensor.numel() < p.ds_numel for p in params),
        "parameters": len(params),
        # QLoRA: bitsandbytes layers of the LLM, and the trainable parameters after PEFT wrapping.
        "quantized_linear_layers": sum(type(m).__name__ in ("Linear4bit", "Linear8bitLt") for m in module.modules()),
        "trainable_parameters": sum(p.numel() for p in params if p.requires_grad),
        "optimizer_groups": optimizer_groups(trainer) if trainer.optimizer is not None else [],
    }


def optimizer_groups(trainer) -> list[dict]:
    """Each optimizer group's name, initial LR, number of tensors and the parts (`part_of`) those tensors belong to.

    Outside a step DeepSpeed's ZeRO-3 optimizer leaves `param_groups[i]["params"]` empty (and ZeRO-1/2 hold flat fp32
    copies there): the model's parameters of each group are in its own lists, `fp16_groups` (stage 3) or
    `bit16_groups` (stages 1/2), in the order of `param_groups`.
    """
    from pivot_hf.trainer.tunable import part_of

    names = {id(p): n for n, p in trainer.accelerator.unwrap_model(trainer.model).named_parameters()}
    inner = getattr(trainer.optimizer, "optimizer", trainer.optimizer)  # accelerate's wrapper -> DeepSpeed's / torch's
    members = getattr(inner, "fp16_groups", None) or getattr(inner, "bit16_groups", None)
    if members is None:
        members = [g["params"] for g in trainer.optimizer.param_groups]
    return [
        {
            "name": g.get("name"),
            "lr": g.get("initial_lr", g["lr"]),
            "tensors": len(params),
            "parts": sorted({part_of(names.get(id(p), "?")) or "?" for p in params}),
        }
        for g, params in zip(trainer.optimizer.param_groups, members)
    ]


def install(report_path: str) -> None:
    from pivot_hf.trainer import PivotDPOTrainer

    original_train = PivotDPOTrainer.train

    def train(self, *args, **kwargs):
        import torch

        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        result = original_train(self, *args, **kwargs)
        wall = time.perf_counter() - start
        report = sharding_report(self)
        report.update(
            {
                "train_wall_seconds": round(wall, 2),
                "train_runtime": result.metrics.get("train_runtime"),
                "global_step": self.state.global_step,
                "losses": [e["loss"] for e in self.state.log_history if "loss" in e],
                "peak_cuda_memory_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2)
                if torch.cuda.is_available()
                else None,
                "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
                "tensors_changed": {
                    part: [e["changed"], e["total"]]
                    for part, e in (getattr(self, "tunable_parts_report", None) or {}).items()
                },
            }
        )
        if self.accelerator.is_main_process:
            with open(report_path, "w", encoding="utf-8") as f:
                json.dump(report, f, indent=2)
        return result

    PivotDPOTrainer.train = train


def main() -> None:
    argv = sys.argv[1:]
    if len(argv) < 3 or argv[0] != "--report":
        raise SystemExit("usage: dpo_steps.py --report OUT.json recipes/dpo.py [recipe args]")
    report_path, script, rest = argv[1], argv[2], argv[3:]
    if os.environ.get("PIVOT_FSDP_ON_CPU") == "1":
        allow_fsdp_on_cpu()
    install(report_path)
    sys.argv = [script] + rest
    runpy.run_path(script, run_name="__main__")


if __name__ == "__main__":
    main()
