"""Full vs LoRA-on-the-LLM + full-tower PIVOT DPO: trainable parameters and peak memory.

    python benchmarks/peft_memory.py [--workdir /tmp/pivot-peft-bench] [--steps 4] [--skip-measure]

1. Measured (CPU setting of `benchmarks/dpo_throughput.py`: SigLIP-like tower 4x384, Qwen2-like LLM 4x512, 256 image
   tokens, 2 pairs per batch, fp32): each variant trains `--steps` DPO steps in its own subprocess, so peak RSS is
   separable. `full`: every part trains, the reference a separately loaded frozen copy (the recipe's default).
   `lora`: `use_peft` with r=16 on every linear layer of the LLM, tower and projector in full (PEFT's
   `modules_to_save`), the reference the adapter-disabled policy (no second model).
2. Modelled at the paper's shape (SigLIP2-So400m/16 at 384 px + Qwen2.5-1.5B / 7B, one pair of 576 image + 64
   prompt + 2 x 300 answer tokens per micro-batch, gradient checkpointing) for one 24 GB / 80 GB GPU: bytes of
   weights, gradients, AdamW states and the reference, and the FLOPs of one pair (`benchmarks/flops.py`).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
from pathlib import Path


BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))

GIB = 2**30
LORA_R = 16


# ------------------------------------------------------------------------------------------------------ measured
def worker(variant: str, workdir: Path, steps: int) -> dict:
    import torch
    from datasets import load_from_disk
    from peft import LoraConfig

    import dpo_throughput as b
    from pivot_hf import PivotForConditionalGeneration, PivotProcessor
    from pivot_hf.configs import PivotDPOConfig
    from pivot_hf.trainer import PivotDPOTrainer, trainable_split
    from pivot_hf.trainer.adapters import scoped_target_modules

    torch.set_num_threads(1)
    setting = b.SETTINGS["cpu"]
    paths = b.build_checkpoint(setting, workdir)
    data = load_from_disk(b.build_dataset(setting, workdir, setting["vision"]["image_size"]))
    # Hub kernels off (transformers 5.25+ defaults to on): both variants measure the same layers.
    model = PivotForConditionalGeneration.from_pretrained(paths["pivot"], use_kernels=False)
    processor = PivotProcessor.from_pretrained(paths["pivot"])
    args = PivotDPOConfig(
        output_dir=str(workdir / f"run-{variant}"),
        per_device_train_batch_size=setting["batch_size"],
        max_steps=steps,
        learning_rate=1e-4,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
        max_length=None,
        use_cpu=True,
        seed=0,
        check_tunable_parts_changed=True,
    )
    kwargs = {}
    if variant == "full":
        kwargs["ref_model"] = PivotForConditionalGeneration.from_pretrained(paths["pivot"], use_kernels=False)
    else:
        targets = scoped_target_modules(model, "all-linear", ["language_model"])
        kwargs["peft_config"] = LoraConfig(r=LORA_R, lora_alpha=2 * LORA_R, target_modules=targets)
    trainer = PivotDPOTrainer(model, args=args, train_dataset=data, processing_class=processor, **kwargs)
    split = trainable_split(trainer.model)
    trainer.train()
    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    held = sum(p.numel() for p in trainer.model.parameters())
    if trainer.ref_model is not None:
        held += sum(p.numel() for p in trainer.ref_model.parameters())
    return {
        "variant": variant,
        "trainable": {part: c["trainable"] for part, c in split.items()},
        "trainable_total": sum(c["trainable"] for c in split.values()),
        "parameters_held": held,
        "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
        "first_loss": losses[0] if losses else None,
        "changed": {p: e["changed"] for p, e in trainer.tunable_parts_report.items()},
    }


def measure(workdir: Path, steps: int) -> list[dict]:
    rows = []
    for variant in ("full", "lora"):
        cmd = [sys.executable, __file__, "--worker", variant, "--workdir", str(workdir), "--steps", str(steps)]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
        rows.append(json.loads(out.strip().splitlines()[-1]))
    return rows


# ------------------------------------------------------------------------------------------------------ modelled
def _part_sizes(text: str) -> dict[str, int]:
    import torch

    from pivot_hf import PivotForConditionalGeneration
    from pivot_hf.testing import real_shape_pivot_config
    from pivot_hf.trainer import part_of
    from pivot_hf.trainer.adapters import scoped_target_modules

    config = real_shape_pivot_config(text=text)
    with torch.device("meta"):
        model = PivotForConditionalGeneration(config)
    sizes = {"vision_tower": 0, "projector": 0, "language_model": 0}
    unreached = set(model.unreached_vision_parameter_names())
    for name, p in model.named_parameters():
        if name not in unreached:
            sizes[part_of(name) or "language_model"] += p.numel()
    lora = 0
    for name in scoped_target_modules(model, "all-linear", ["language_model"]):
        layer = model.get_submodule(name)
        lora += LORA_R * (layer.in_features + layer.out_features)
    sizes["lora"] = lora
    sizes["config"] = config
    return sizes


def memory_model(text: str, image_tokens: int = 576, prompt: int = 64, answer: int = 300) -> dict:
    """Bytes of one-GPU PIVOT DPO (no ZeRO/FSDP), gradient checkpointing, one pair per micro-batch.

    Trained weights: fp32 weight + fp32 gradient + AdamW's two fp32 moments = 16 B/param (bf16 autocast; pivot-hf
    warns that bf16-stored weights round lr-1e-6 steps away, so they are loaded in fp32). Frozen weights: bf16, 2 B
    (4-bit NF4 with nested quantization: ~0.53 B incl. its scales). Full: the reference is a bf16 copy of everything.
    LoRA: the tower and projector are held twice (PEFT's frozen bf16 original + the trained fp32 copy), no reference.
    Activations (Korthikanti et al. 2022, sdpa, full recompute): 2 B x tokens x hidden per layer boundary + one
    layer's ~34 B x tokens x hidden, for tower and LLM; plus fp32 log-softmax over the answer tokens' vocabulary.
    """
    from flops import _llm_token_flops, _vision_flops, pair_forward_flops

    s = _part_sizes(text)
    config = s["config"]
    tower, proj, llm, lora = s["vision_tower"], s["projector"], s["language_model"], s["lora"]
    v, t = config.vision_config, config.text_config
    tokens = image_tokens + prompt + 2 * answer  # one packed pair
    act = 2 * image_tokens * v.hidden_size * v.num_hidden_layers + 34 * image_tokens * v.hidden_size
    act += 2 * tokens * t.hidden_size * t.num_hidden_layers + 34 * tokens * t.hidden_size
    act += 2 * answer * t.vocab_size * 4
    full = {"weights+grads+adam": 16 * (tower + proj + llm), "reference": 2 * (tower + proj + llm), "activations": act}
    lora_ = {
        "weights+grads+adam": 16 * (tower + proj + lora) + 2 * (tower + proj),
        "frozen LLM": 2 * llm,
        "reference": 0,
        "activations": act,
    }
    qlora = dict(lora_, **{"frozen LLM": int(0.53 * llm)})
    # FLOPs of one pair on the fast path (shared prefix): vision and LLM forward separately.
    fwd = pair_forward_flops(config, image_tokens + prompt, answer, answer, 1, image_tokens, "ours", 2 * answer)
    vision = _vision_flops(config, image_tokens)
    text_fwd = fwd - vision
    dense, _ = _llm_token_flops(config)
    flops = {
        # forward + backward (2x forward: input and weight gradients) + the live reference's forward
        "full": 3 * fwd + fwd,
        # frozen LLM: backward computes input gradients only (1x forward); LoRA's own FLOPs are ~r/d of the layer's
        "lora": 3 * vision + 2 * text_fwd + fwd,
    }
    return {
        "text": text,
        "parameters": {"vision_tower (reached)": tower, "projector": proj, "language_model": llm, "lora r16": lora},
        "bytes": {"full": full, "lora": lora_, "qlora": qlora},
        "flops_per_pair": flops,
        "dense_flops_per_token": dense,
    }


def _gib(x: float) -> str:
    return f"{x / GIB:.1f}"


def markdown(measured: list[dict], models: list[dict]) -> str:
    lines = []
    if measured:
        lines += [
            "| variant | trainable params (tower / projector / LLM) | params held (incl. reference) | peak RSS MiB | "
            "step-1 loss |",
            "| --- | --- | --- | --- | --- |",
        ]
        for row in measured:
            tr = row["trainable"]
            lines.append(
                f"| {row['variant']} | {row['trainable_total'] / 1e6:.2f}M ({tr['vision_tower'] / 1e6:.2f}M / "
                f"{tr['projector'] / 1e6:.2f}M / {tr['language_model'] / 1e6:.2f}M) | {row['parameters_held'] / 1e6:.1f}M"
                f" | {row['peak_rss_mib']} | {row['first_loss']:.6f} |"
            )
        lines.append("")
    lines += [
        "| LLM | variant | trained + optimizer | frozen LLM | reference | activations | total GiB | fits 24 / 80 GB | "
        "TFLOP per pair |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for m in models:
        for variant, parts in m["bytes"].items():
            total = sum(parts.values())
            fits = f"{'yes' if total < 22 * GIB else 'no'} / {'yes' if total < 76 * GIB else 'no'}"
            flops = m["flops_per_pair"]["full" if variant == "full" else "lora"] / 1e12
            lines.append(
                f"| {m['text']} | {variant} | {_gib(parts['weights+grads+adam'])} | "
                f"{_gib(parts.get('frozen LLM', 0))} | {_gib(parts['reference'])} | {_gib(parts['activations'])} | "
                f"{_gib(total)} | {fits} | {flops:.2f} |"
            )
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", default="/tmp/pivot-peft-bench")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--skip-measure", action="store_true")
    parser.add_argument("--worker", choices=["full", "lora"], default=None)
    args = parser.parse_args(argv)
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    if args.worker:
        print(json.dumps(worker(args.worker, workdir, args.steps)))
        return
    measured = [] if args.skip_measure else measure(workdir, args.steps)
    models = [memory_model("Qwen2.5-1.5B-Instruct"), memory_model("Qwen2.5-7B-Instruct")]
    print(markdown(measured, models))


if __name__ == "__main__":
    main()
