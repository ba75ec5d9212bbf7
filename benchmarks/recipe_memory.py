"""Peak memory of the headline recipe at the paper's shape on CPU, and what holds it.

    python benchmarks/recipe_memory.py                      # recipes/so400m.yaml, 2 steps, So400m/16 + Qwen2.5-0.5B
    python benchmarks/recipe_memory.py --update_norm_memory_mib -1    # the monitor without a budget (a full copy)

Runs `recipes/dpo.py`'s `main` in this process on a random-weight Pivot checkpoint of SigLIP2-So400m/16 (384 px, 576
image tokens) + Qwen2.5-0.5B (the package's real configs, built by `dpo_throughput.py --setting real-shape`) and a few
MMPR-like pairs, with the recipe's own keys except what a 2-step CPU run must change: `max_steps 2`,
`gradient_accumulation_steps 1` (gradients accumulate in place, so the peak does not depend on it), the reference
log-probs precomputed (`precompute_ref_log_probs`), `use_cpu` (the recipe's `bf16: true` then autocasts on the CPU),
no checkpoint saving, no tracker, no dataloader workers. Extra
`--key value` arguments go to the recipe.

While it runs, a thread samples the process RSS every 10 ms and attributes it to the phase the run is in (loading,
reference pass, forward+backward, optimizer step, ...); the tensors each component holds are counted exactly: weights,
gradients, optimizer state, the update-norm monitor's copy, the reference model while it lives, and the activations
(every tensor autograd saves for the backward pass, once per storage, parameters left out). Prints one table and
writes it as JSON with `--json`.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import resource
import shutil
import sys
import threading
import time
from pathlib import Path


os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
GIB = 2**30


class Sampler(threading.Thread):
    """RSS every `interval` seconds; the maximum per phase label (`self.phase`)."""

    def __init__(self, interval: float = 0.01):
        super().__init__(daemon=True)
        import psutil

        self.process = psutil.Process()
        self.interval = interval
        self.phase = "start"
        self.peaks: dict[str, float] = {}
        self.marks: dict[str, float] = {}
        self.running = True

    def rss(self) -> float:
        return self.process.memory_info().rss

    def mark(self, name: str) -> None:
        """The RSS now, under `name`."""
        self.marks[name] = self.rss()

    def run(self):
        while self.running:
            value = self.rss()
            if value > self.peaks.get(self.phase, 0):
                self.peaks[self.phase] = value
            time.sleep(self.interval)


def _bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", default="/tmp/pivot-dpo-bench-real-shape")
    parser.add_argument("--pairs", type=int, default=2, help="MMPR-like pairs in the dataset (batch 1: one per step)")
    parser.add_argument("--json", default=None)
    parser.add_argument("--tiny", action="store_true", help="the same run on a tiny model (checks the harness)")
    args, recipe_overrides = parser.parse_known_args(argv)

    sys.path.insert(0, str(HERE))
    import torch

    from dpo_throughput import _setting, build_checkpoint, build_dataset

    sampler = Sampler()
    sampler.start()
    key = "gpu-tiny" if args.tiny else "real-shape"
    setting = _setting(key, batch_pairs=1, lengths="mmpr", steps=args.pairs)
    setting["dtype"] = "float32"  # the recipe loads fp32 weights (bf16 is autocast)
    workdir = Path(args.workdir + ("-tiny" if args.tiny else ""))
    sampler.phase = "building the random checkpoint (not the recipe)"
    paths = build_checkpoint(setting, workdir)
    image_size = setting["vision"]["image_size"] if args.tiny else 384
    data = build_dataset(setting, workdir, image_size, "mmpr")
    import gc

    gc.collect()

    spec = importlib.util.spec_from_file_location("pivot_recipe_dpo", REPO / "recipes" / "dpo.py")
    recipe = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(recipe)
    counts: dict[str, float] = {}
    from transformers import TrainerCallback

    class Probe(TrainerCallback):
        """Phase labels and exact tensor sizes at the step's boundaries."""

        def __init__(self, trainer):
            self.trainer = trainer

        def on_step_begin(self, args, state, control, **kwargs):
            sampler.mark(f"step {state.global_step + 1} begin")
            sampler.phase = f"forward + backward (step {state.global_step + 1})"

        def on_pre_optimizer_step(self, args, state, control, **kwargs):
            model = self.trainer.model
            counts["grads"] = _bytes(p.grad for p in model.parameters() if p.grad is not None)
            snapshot = self.trainer.update_norm_callback._snapshot
            if snapshot is not None:
                counts["monitor"] = _bytes(copy for pairs in snapshot["trainable"].values() for *_, copy in pairs)
            sampler.phase = "optimizer step"

        def on_step_end(self, args, state, control, **kwargs):
            optimizer = self.trainer.optimizer
            counts["optimizer"] = _bytes(
                t for st in optimizer.state.values() for t in st.values() if isinstance(t, torch.Tensor)
            )
            sampler.phase = "between steps"

        def on_train_end(self, args, state, control, **kwargs):
            sampler.phase = "end of training (tunable-part check, curves)"

    base = recipe.PivotDPOTrainer

    class Measured(base):
        def __init__(self, model, ref_model, *a, **k):
            counts["weights"] = _bytes(model.parameters())
            counts["trainable"] = _bytes(p for p in model.parameters())
            counts["reference model"] = _bytes(ref_model.parameters()) if ref_model is not None else 0
            sampler.mark("models loaded")
            sampler.phase = "trainer setup + reference pass"
            super().__init__(model, ref_model, *a, **k)
            counts["trainable"] = _bytes(p for p in self.model.parameters() if p.requires_grad)
            self.add_callback(Probe(self))

        def _run_reference_pass(self, *a, **k):
            sampler.phase = "reference pass"
            try:
                return super()._run_reference_pass(*a, **k)
            finally:
                sampler.phase = "trainer setup + reference pass"
                sampler.mark("after the reference pass")

        def train(self, *a, **k):
            sampler.mark("before training")
            return super().train(*a, **k)

        def training_step(self, model, *a, **k):
            # Activations counted exactly: every tensor autograd saves for the backward pass of this step, once per
            # storage, parameters (saved by linear layers for the input gradient) left out. RSS cannot say this:
            # the allocator reuses the pages the previous step's gradients freed.
            params = {p.untyped_storage().data_ptr() for p in self.model.parameters()}
            saved: dict[int, int] = {}

            def pack(tensor):
                storage = tensor.untyped_storage()
                if storage.data_ptr() not in params and storage.device.type == "cpu":
                    saved[storage.data_ptr()] = storage.nbytes()
                return tensor

            with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
                loss = super().training_step(model, *a, **k)
            counts["activations"] = max(counts.get("activations", 0), sum(saved.values()))
            return loss

        def save_model(self, *a, **k):
            sampler.phase = "saving the model"
            try:
                return super().save_model(*a, **k)
            finally:
                sampler.phase = "run summary"

    recipe.PivotDPOTrainer = Measured  # this harness's own copy of the recipe module
    out = workdir / "recipe-memory-run"
    # A run folder left by an earlier run holds its reference log-probs cache: reusing it would skip the reference
    # pass this harness measures.
    shutil.rmtree(out, ignore_errors=True)
    recipe_args = [
        "--config",
        str(REPO / "recipes" / "so400m.yaml"),
        "--model_name_or_path",
        paths["pivot"],
        "--dataset_name",
        data,
        "--num_samples",
        str(args.pairs),
        "--output_dir",
        str(out),
        "--max_steps",
        "2",
        "--gradient_accumulation_steps",
        "1",
        "--precompute_ref_log_probs",
        "true",
        "--save_strategy",
        "no",
        "--report_to",
        "none",
        "--dataloader_num_workers",
        "0",
        "--use_cpu",
        "true",
        *recipe_overrides,
    ]
    load_before = os.getloadavg()[0]
    sampler.mark("before the recipe")
    sampler.phase = "loading (config, data, policy, reference)"
    t0 = time.perf_counter()
    trainer = recipe.main(recipe_args)
    seconds = time.perf_counter() - t0
    sampler.phase = "saving"
    sampler.running = False
    sampler.join()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    monitor_budget = getattr(trainer.args, "update_norm_memory_mib", None)
    baseline = sampler.marks["before the recipe"]
    # RSS growth over each step's start: step 1 also allocates the gradients; from step 2 on the allocator reuses
    # freed pages, so this is a lower bound on what the step's transient tensors take.
    growth = {
        step: sampler.peaks.get(f"forward + backward (step {step})", 0) - value
        for step, value in ((k.split()[1], v) for k, v in sampler.marks.items() if k.startswith("step "))
    }
    table = {
        "weights (policy)": counts.get("weights", 0),
        "gradients": counts.get("grads", 0),
        "optimizer state (AdamW)": counts.get("optimizer", 0),
        "reference model (until its log-probs are cached)": counts.get("reference model", 0),
        "update-norm monitor copy": counts.get("monitor", 0),
        "activations (tensors saved for backward, largest step)": counts.get("activations", 0),
        "process before the recipe (Python, torch, libraries)": baseline,
    }
    report = {
        "peak_rss_gib": peak / GIB,
        "components_gib": {k: v / GIB for k, v in table.items()},
        "phase_peaks_gib": {k: v / GIB for k, v in sampler.peaks.items()},
        "marks_gib": {k: v / GIB for k, v in sampler.marks.items()},
        "rss_growth_during_step_gib": {k: v / GIB for k, v in growth.items()},
        "update_norm_memory_mib": monitor_budget,
        "seconds": seconds,
        "load_average": [load_before, os.getloadavg()[0]],
        "recipe_args": recipe_args,
        "torch_threads": torch.get_num_threads(),
    }
    shape = "a tiny model" if args.tiny else "SigLIP2-So400m/16 + Qwen2.5-0.5B"
    print(f"\nheadline recipe (recipes/so400m.yaml), {shape}, 2 steps on CPU, {seconds:.0f}s")
    print(f"peak RSS: {peak / GIB:.2f} GiB (update_norm_memory_mib={monitor_budget}); load {load_before:.1f}")
    print("component                                                      GiB")
    for name, value in table.items():
        print(f"  {name:60} {value / GIB:6.2f}")
    print("RSS peak per phase:")
    for name, value in sampler.peaks.items():
        print(f"  {name:60} {value / GIB:6.2f}")
    print("RSS growth during forward + backward, over the step's start:")
    for step, value in growth.items():
        print(f"  {'step ' + step:60} {value / GIB:6.2f}")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
