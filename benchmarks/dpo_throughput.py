"""PIVOT DPO throughput: the stock path (TRL DPOTrainer + transformers LLaVA, live reference) vs pivot_hf's fast path.

    python benchmarks/dpo_throughput.py --setting cpu            # mid-size random model, a few minutes on CPU
    python benchmarks/dpo_throughput.py --setting gpu            # real shape (SigLIP2-So400m/16 + Qwen2.5-1.5B), bf16
    python benchmarks/dpo_throughput.py --setting gpu --tiny     # the gpu code path on a tiny config (runs on CPU)
    python benchmarks/dpo_throughput.py --setting cpu --lengths mmpr --batch-pairs 8 --ablate-padding-free
                                                                 # MMPR-like heavy-tailed lengths, 8 pairs per batch

One run builds one random checkpoint (saved as a Pivot checkpoint and, with the same tensors, as a transformers LLaVA
checkpoint) and one preference dataset, then trains each path in its own subprocess (so peak RSS is separable) on
the same data, batch, seed and optimizer:

- stock: `trl.DPOTrainer` on `LlavaForConditionalGeneration` with a live reference model (TRL's defaults);
- ours:  `PivotDPOTrainer` (its `FastDPOMixin`) on `PivotForConditionalGeneration` with `precompute_ref_log_probs`:
  one image encoding and one prefix pass per pair, compact LM head, reference log-probs cached once and freed, pairs
  packed padding-free (`padding_free`, the default);
- ours-padded (with `--ablate-padding-free`): ours with `padding_free=False` (one padded row per pair).

`--lengths short` (default): 10-30-word answers. `--lengths mmpr`: heavy-tailed prompt and answer lengths like
MMPR-v1.2's (see `MMPR_MIX`).

Throughput is measured over training steps after a warm-up step. Ours also pays the cached reference pass once per
schedule: it is timed and amortised over `--epochs` (3, the paper's schedule) of the benchmark dataset. Losses are
logged at every step and must agree. The last line is `ratio ours/stock pairs/s: <x> | peak memory stock ... ours ...`.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path


os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TQDM_DISABLE", "1")

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

# Settings: model shape, image size, data sizes, training options. "image_tokens" follows from image/patch size.
SETTINGS = {
    # A mid-size model in which, as in the paper, image tokens dominate the sequence: 256 image tokens (a 16x16 grid,
    # the paper's 24x24 scaled down) + a short question + short answers; the vision tower is ~1/3 of a row's FLOPs as
    # for So400m vs Qwen2.5-1.5B. A 4k BPE vocabulary keeps the LM head at the paper's small share of the compute.
    "cpu": {
        "vision": {
            "hidden_size": 384,
            "intermediate_size": 1536,
            "num_hidden_layers": 4,
            "num_attention_heads": 6,
            "image_size": 192,
            "patch_size": 12,
        },
        "text": {
            "hidden_size": 512,
            "intermediate_size": 1536,
            "num_hidden_layers": 4,
            "num_attention_heads": 8,
            "num_key_value_heads": 2,
        },
        "vocab": "bpe4k",
        "num_pairs": 16,
        "batch_size": 2,
        "max_steps": 8,
        "dtype": "float32",
        "gradient_checkpointing": False,
        "attn_implementation": "sdpa",
    },
    # The paper's shape with random weights: SigLIP2-So400m/16 at 384 px (576 tokens) + Qwen2.5-1.5B, bf16,
    # gradient checkpointing and sdpa as in the official recipe.
    "gpu": {
        "real_shape": True,
        "vocab": "qwen",
        "num_pairs": 64,
        "batch_size": 8,
        "max_steps": 6,
        "dtype": "bfloat16",
        "gradient_checkpointing": True,
        "attn_implementation": "sdpa",
    },
    # The gpu code path on a tiny model, so it is exercised where no GPU is available.
    "gpu-tiny": {
        "vision": {
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_hidden_layers": 3,
            "num_attention_heads": 2,
            "image_size": 96,
            "patch_size": 16,
        },
        "text": {
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
        },
        "vocab": "qwen",
        "num_pairs": 4,
        "batch_size": 2,
        "max_steps": 2,
        "dtype": "bfloat16",
        "gradient_checkpointing": True,
        "attn_implementation": "sdpa",
    },
}

WORDS = (
    "the a red blue green small large cat dog car tree house person table cup book street sky cloud river boat "
    "left right top bottom image shows there is are two three four many one on in near behind under next to with "
    "and of color number count what where which how describe answer because looks like holding standing sitting"
).split()


# MMPR-v1.2-like lengths, in words of WORDS (the benchmark's BPE maps a word to about one token). MMPR (InternVL's
# Mixed Preference Optimization data) mixes short-answer VQA (general VQA, charts/OCR, counting: a word, a number, an
# option letter or one sentence) with chain-of-thought reasoning samples (math, science, charts: responses of a few
# hundred tokens, `<think>` chains in v1.2) whose rejected answers come from a different sampled chain or are cut and
# re-continued (DropoutNTP), so chosen and rejected lengths differ. The mix below encodes that shape (no access to the
# dataset here; the proportions are an assumption modeled on the MPO paper's source mix and on the layout of the
# `mmpr-mini` samples): (share, answer words lo-hi, rejected/chosen length ratio lo-hi). Questions: 6-20 words, and a
# quarter 20-60 words (multiple-choice options, longer problem statements).
MMPR_MIX = (
    (0.50, (1, 8), (0.5, 2.0)),  # short answers: a word, a number, a letter, a short phrase
    (0.25, (10, 60), (0.4, 1.6)),  # one to three sentences of description or explanation
    (0.25, (200, 600), (0.3, 1.3)),  # reasoning chains; rejected: another chain or a cut-and-continued one
)


def _answer_lengths(rng, lengths: str) -> tuple[int, int, int]:
    """(question, chosen, rejected) lengths in words for one MMPR-like pair."""
    question = rng.randint(20, 60) if rng.random() < 0.25 else rng.randint(6, 20)
    draw, acc, kind = rng.random(), 0.0, MMPR_MIX[-1]
    for entry in MMPR_MIX:
        acc += entry[0]
        if draw <= acc:
            kind = entry
            break
    _, (lo, hi), (rlo, rhi) = kind
    chosen = rng.randint(lo, hi)
    rejected = max(1, min(int(chosen * rng.uniform(rlo, rhi)), hi))
    return question, chosen, rejected


# ------------------------------------------------------------------------------------------------------- setup
def _bpe_tokenizer(folder: Path, vocab_size: int = 4096):
    """A small byte-level BPE with Qwen's ChatML special tokens and chat template (a CPU-sized vocabulary)."""
    import random

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    from pivot_hf.testing import qwen_tokenizer_path

    rng = random.Random(0)
    corpus = [" ".join(rng.choice(WORDS) for _ in range(30)) for _ in range(2000)]
    special = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=special, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(corpus, trainer)
    qwen = AutoTokenizer.from_pretrained(qwen_tokenizer_path())
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>", chat_template=qwen.chat_template
    )
    fast.save_pretrained(folder)
    return fast


def build_checkpoint(setting: dict, workdir: Path) -> dict:
    """Random Pivot + LLaVA checkpoints with the same tensors, and the processor. Returns their paths."""
    import torch
    from transformers import (
        AutoTokenizer,
        Qwen2Config,
        Qwen2ForCausalLM,
        SiglipImageProcessorPil,
        SiglipVisionConfig,
        SiglipVisionModel,
    )

    from pivot_hf import PivotForConditionalGeneration, PivotProcessor

    pivot_dir, llava_dir = workdir / "pivot", workdir / "llava"
    if (pivot_dir / "config.json").exists() and (llava_dir / "config.json").exists():
        return {"pivot": str(pivot_dir), "llava": str(llava_dir)}
    torch.manual_seed(0)
    parts = workdir / "parts"
    dtype = getattr(torch, setting["dtype"])
    if setting.get("real_shape"):
        import json as _json

        from pivot_hf.testing import qwen_tokenizer_path, real_config_path

        vision_cfg = SiglipVisionConfig(
            **_json.loads(Path(real_config_path("siglip2-so400m-patch16-384.vision")).read_text())
        )
        text_cfg = Qwen2Config(**_json.loads(Path(real_config_path("Qwen2.5-1.5B-Instruct")).read_text()))
        tokenizer = AutoTokenizer.from_pretrained(qwen_tokenizer_path())
        image_size = vision_cfg.image_size
    else:
        vision_cfg = SiglipVisionConfig(**setting["vision"])
        image_size = setting["vision"]["image_size"]
        if setting["vocab"] == "qwen":
            from pivot_hf.testing import qwen_tokenizer_path

            tokenizer = AutoTokenizer.from_pretrained(qwen_tokenizer_path())
        else:
            tokenizer = _bpe_tokenizer(parts / "tokenizer")
        text_cfg = Qwen2Config(
            **setting["text"],
            vocab_size=len(tokenizer),
            max_position_embeddings=4096,
            tie_word_embeddings=True,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    with torch.device("cpu"):
        vision = SiglipVisionModel(vision_cfg).to(dtype)
        vision.save_pretrained(parts / "vision")
        del vision
        SiglipImageProcessorPil(size={"height": image_size, "width": image_size}).save_pretrained(parts / "vision")
        text_cfg.vocab_size = max(text_cfg.vocab_size, len(tokenizer))
        llm = Qwen2ForCausalLM(text_cfg).to(dtype)
        llm.save_pretrained(parts / "text")
        del llm
    tokenizer.save_pretrained(parts / "text")
    processor = PivotProcessor.from_vision_text_pretrained(str(parts / "vision"), str(parts / "text"))
    model = PivotForConditionalGeneration.from_vision_text_pretrained(
        str(parts / "vision"), str(parts / "text"), tokenizer=processor.tokenizer, torch_dtype=dtype
    )
    model.save_pretrained(pivot_dir)
    processor.save_pretrained(pivot_dir)
    model.to_llava().save_pretrained(llava_dir)
    processor.save_pretrained(llava_dir)
    return {"pivot": str(pivot_dir), "llava": str(llava_dir)}


def build_dataset(setting: dict, workdir: Path, image_size: int, lengths: str = "short") -> str:
    """`num_pairs` preference rows (random images, question and answers of `lengths`), saved so all workers read the
    same bytes (and the same dataset fingerprint)."""
    import random

    import numpy as np
    from datasets import Dataset
    from PIL import Image

    folder = workdir / ("data" if lengths == "short" else f"data-{lengths}-{setting['num_pairs']}")
    if (folder / "dataset_info.json").exists():
        return str(folder)
    rng = random.Random(0)
    nrng = np.random.default_rng(0)
    rows = []
    for _ in range(setting["num_pairs"]):
        image = Image.fromarray(nrng.integers(0, 255, (image_size, image_size, 3), dtype=np.uint8))
        if lengths == "short":  # drawn interleaved with the words, as the published short-answer numbers were
            question = " ".join(rng.choice(WORDS) for _ in range(rng.randint(8, 14))) + "?"
            chosen = " ".join(rng.choice(WORDS) for _ in range(rng.randint(10, 30))) + "."
            rejected = " ".join(rng.choice(WORDS) for _ in range(rng.randint(10, 30))) + "."
        else:
            n_question, n_chosen, n_rejected = _answer_lengths(rng, lengths)
            question = " ".join(rng.choice(WORDS) for _ in range(n_question)) + "?"
            chosen = " ".join(rng.choice(WORDS) for _ in range(n_chosen)) + "."
            rejected = " ".join(rng.choice(WORDS) for _ in range(n_rejected)) + "."
        rows.append(
            {
                "images": [image],
                "prompt": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}],
                "chosen": [{"role": "assistant", "content": [{"type": "text", "text": chosen}]}],
                "rejected": [{"role": "assistant", "content": [{"type": "text", "text": rejected}]}],
            }
        )
    Dataset.from_list(rows).save_to_disk(str(folder))
    return str(folder)


def _setting(key: str, batch_pairs: int | None = None, lengths: str = "short", steps: int | None = None) -> dict:
    """A copy of `SETTINGS[key]` with the batch, length mix and step count of this run. Each run covers at most one
    epoch: the dataset holds `batch x steps` pairs when that is more than the setting's."""
    setting = dict(SETTINGS[key])
    if batch_pairs:
        setting["batch_size"] = batch_pairs
    if steps:
        setting["max_steps"] = steps
    elif lengths == "mmpr":
        setting["max_steps"] = min(setting["max_steps"], 6)  # long rows: 1 warm-up + 5 timed steps keep runs short
    setting["lengths"] = lengths
    setting["num_pairs"] = max(setting["num_pairs"], setting["batch_size"] * setting["max_steps"])
    return setting


# ------------------------------------------------------------------------------------------------------ worker
def _peak_memory() -> dict:
    import torch

    out = {"peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    if torch.cuda.is_available():
        out["cuda_max_allocated_mib"] = torch.cuda.max_memory_allocated() / 2**20
    return out


def _batch_shapes(trainer, dataset, batch_size: int) -> tuple[list[dict], list[dict]]:
    """Prefix / answer lengths of every pair as collated (for the FLOP count and tokens/s), and the LLM rows each path
    runs per batch (`rows`: widths of the rows a path processes, padding included) for the padding share.

    Batches are the dataset's consecutive rows (training shuffles them; the lengths are i.i.d., so the statistics are
    the same)."""
    import torch

    from pivot_hf.trainer.fast_dpo import plan_pairs
    from pivot_hf.trainer.fast_dpo.collator import _RefLogpsCollator
    from pivot_hf.trainer.fast_dpo.packing import _place_units

    collator = trainer.data_collator
    collator = collator.inner if isinstance(collator, _RefLogpsCollator) else collator
    image_token_id = trainer.model.config.image_token_id
    shapes, batches = [], []
    columns = [c for c in dataset.column_names if not c.startswith("ref_")]
    for start in range(0, len(dataset), batch_size):
        rows = [{k: dataset[i][k] for k in columns} for i in range(start, min(start + batch_size, len(dataset)))]
        batch = collator(rows)
        plan = plan_pairs(batch["input_ids"], batch["attention_mask"], image_token_id)
        lengths = batch["attention_mask"].sum(1)
        pairs = len(rows)
        image_tokens = int((batch["input_ids"][0] == image_token_id).sum())
        for i in range(pairs):
            prefix = int(plan["prefix"][i])
            shapes.append(
                {
                    "prefix": prefix,
                    "chosen": int(lengths[i]) - prefix,
                    "rejected": int(lengths[pairs + i]) - prefix,
                    "images": 1,
                    "image_tokens": image_tokens,
                    "width": int(batch["input_ids"].shape[1]),
                    "tokens": int(lengths[i] + lengths[pairs + i]),
                }
            )
        width = int(batch["input_ids"].shape[1])
        packed = (plan["lengths"][:pairs] + plan["lengths"][pairs:] - plan["prefix"]).to(torch.long)
        rows = {"stock": [width] * (2 * pairs), "ours-padded": [int(packed.max())] * pairs}
        keys = {}
        if trainer.model.config.get_text_config()._attn_implementation == "sdpa":
            # One row without padding; attention per pair: [prefix | chosen] causal, rejected over [prefix | rejected]
            # (a masked kernel computes the whole rectangle).
            rows["ours"] = [int(packed.sum())]
            prefix, chosen = plan["prefix"], plan["lengths"][:pairs] - plan["prefix"]
            rejected = plan["lengths"][pairs:] - plan["prefix"]
            head = prefix + chosen
            keys["ours"] = int((head * (head + 1) // 2 + rejected * (prefix + rejected)).sum())
        else:  # eager: rows as wide as the longest pair, dense block mask
            _, _, pf_width, pf_rows = _place_units(packed, True, None)
            rows["ours"] = [pf_width] * pf_rows
        batches.append(
            {
                "pairs": pairs,
                "tokens": int(lengths.sum()),  # valid tokens of the collated rows (prefix counted twice)
                "packed_tokens": int(packed.sum()),  # valid tokens once the prefix is shared
                "answer_tokens": int((lengths - plan["prefix"].repeat(2)).sum()),
                "rows": rows,
                "keys": keys,
            }
        )
    return shapes, batches


def _median(values: list[float]) -> float:
    values = sorted(values)
    mid = len(values) // 2
    return values[mid] if len(values) % 2 else (values[mid - 1] + values[mid]) / 2


def worker(args) -> None:
    import torch
    import trl
    from datasets import load_from_disk
    from transformers import LlavaForConditionalGeneration, TrainerCallback

    import pivot_hf  # noqa: F401  (registers the Auto classes)
    from pivot_hf import PivotForConditionalGeneration, PivotProcessor

    setting = _setting(args.setting_key, args.batch_pairs, args.lengths, args.steps)
    paths = json.loads(args.paths)
    on_gpu = torch.cuda.is_available() and not args.force_cpu
    dtype = getattr(torch, setting["dtype"]) if on_gpu or setting["dtype"] == "float32" else torch.float32
    attn = setting["attn_implementation"]
    processor = PivotProcessor.from_pretrained(paths["pivot"])
    dataset = load_from_disk(args.data)
    common = {
        "output_dir": str(Path(args.workdir) / f"run-{args.worker}"),
        "per_device_train_batch_size": setting["batch_size"],
        "max_steps": setting["max_steps"],
        "learning_rate": 1e-5,
        "lr_scheduler_type": "constant",
        "beta": 0.1,
        "loss_type": ["sigmoid"],
        "logging_steps": 1,
        "save_strategy": "no",
        "report_to": "none",
        "seed": 0,
        "data_seed": 0,
        "dataloader_num_workers": 0,
        "disable_tqdm": True,
        "max_length": None,
        "use_cpu": not on_gpu,
        "bf16": on_gpu and dtype == torch.bfloat16,
        "gradient_checkpointing": setting["gradient_checkpointing"],
        "use_liger_kernel": bool(args.liger and on_gpu),
    }
    ref_seconds = {"value": 0.0}
    ref_batches, ref_cpu = [], []
    # A previous run's cached reference log-probs would be reused (that is the resume path): start clean so the
    # reference pass is timed.
    shutil.rmtree(Path(common["output_dir"]) / "ref_logps", ignore_errors=True)
    # Hub kernels off in every arm (transformers 5.25+ turns them on by default): on a GPU with Hub access they would
    # swap in the same RMSNorm kernel Liger provides, in the "without Liger" arms too.
    load = {"dtype": dtype, "attn_implementation": attn, "use_kernels": False}
    if args.worker == "stock":
        model = LlavaForConditionalGeneration.from_pretrained(paths["llava"], **load)
        ref = LlavaForConditionalGeneration.from_pretrained(paths["llava"], **load)
        config = trl.DPOConfig(**common)
        trainer_cls = trl.DPOTrainer
    else:
        from pivot_hf.trainer.fast_dpo import FastDPOMixin

        try:
            from pivot_hf.configs import PivotDPOConfig
            from pivot_hf.trainer.dpo import PivotDPOTrainer as base_cls

            config = PivotDPOConfig(
                **common,
                precompute_ref_log_probs=True,
                check_tunable_parts_changed=False,
                compact_lm_head=not args.plain_lm_head,
                padding_free=args.worker == "ours",
            )
        except ImportError:  # the project trainer is optional for this harness
            base_cls = type("_FastDPOTrainer", (FastDPOMixin, trl.DPOTrainer), {})
            config = trl.DPOConfig(**common, precompute_ref_log_probs=True, padding_free=args.worker == "ours")

        class _Timed(base_cls):
            # Each reference batch is timed: the pass is charged as its median batch time x batches, the same
            # steady-state convention as the training steps (the first call of a process pays one-off warm-up).
            def compute_ref_log_probs(self, *a, **k):
                t0, c0 = time.perf_counter(), time.process_time()
                try:
                    return super().compute_ref_log_probs(*a, **k)
                finally:
                    ref_batches.append(time.perf_counter() - t0)
                    ref_cpu.append(time.process_time() - c0)

            def _run_reference_pass(self, *a, **k):
                t0 = time.perf_counter()
                try:
                    return super()._run_reference_pass(*a, **k)
                finally:
                    ref_seconds["value"] += time.perf_counter() - t0

        trainer_cls = _Timed
        model = PivotForConditionalGeneration.from_pretrained(paths["pivot"], **load)
        ref = None  # the policy before its first step is the reference; cached, then freed

    step_times, step_cpu, losses = [], [], []

    class _Clock(TrainerCallback):
        def on_step_end(self, _args, state, control, **kwargs):
            if on_gpu:
                torch.cuda.synchronize()
            step_times.append(time.perf_counter())
            step_cpu.append(time.process_time())

        def on_log(self, _args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:
                losses.append(float(logs["loss"]))

    if on_gpu:
        torch.cuda.reset_peak_memory_stats()
    t_init = time.perf_counter()
    trainer = trainer_cls(
        model=model,
        ref_model=ref,
        args=config,
        train_dataset=dataset,
        processing_class=processor,
        callbacks=[_Clock()],
    )
    init_seconds = time.perf_counter() - t_init
    t_train = time.perf_counter()
    trainer.train()
    shapes, batches = _batch_shapes(trainer, dataset, setting["batch_size"])
    steps = len(step_times)
    # Steady state: the steps after the warm-up one. The median step time is reported, since the machines these run on
    # may be shared and a neighbour's burst would otherwise land in one path's mean only; the mean is kept as well.
    durations = [b - a for a, b in zip(step_times, step_times[1:])]
    median = _median(durations)
    mean = (step_times[-1] - step_times[0]) / len(durations)
    pairs_per_step = setting["batch_size"]
    result = {
        "worker": args.worker,
        "steps": steps,
        "pairs_per_step": pairs_per_step,
        "step_seconds": median,
        "step_seconds_mean": mean,
        "first_step_seconds": step_times[0] - t_train,
        "init_seconds": init_seconds,
        "reference_pass_seconds_wall": ref_seconds["value"],
        "reference_pass_seconds": _median(ref_batches) * len(ref_batches) if ref_batches else 0.0,
        # CPU time of the process (all threads): on a machine shared with other jobs it measures the work done,
        # whatever share of the cores the process got; the wall-clock figures above are what users see.
        "step_cpu_seconds": _median([b - a for a, b in zip(step_cpu, step_cpu[1:])]),
        "reference_pass_cpu_seconds": _median(ref_cpu) * len(ref_cpu) if ref_cpu else 0.0,
        "dataset_pairs": len(dataset),
        "losses": losses,
        "shapes": shapes,
        "batches": batches,
        "dtype": str(dtype),
        "device": torch.cuda.get_device_name() if on_gpu else platform.processor() or platform.machine(),
        **_peak_memory(),
    }
    Path(args.out).write_text(json.dumps(result))


# -------------------------------------------------------------------------------------------------------- main
def _run_worker(
    name: str,
    setting_key: str,
    paths: dict,
    data: str,
    workdir: Path,
    liger: bool,
    force_cpu: bool,
    plain_lm_head: bool = False,
    overrides: tuple = (),
):
    out = workdir / f"result-{name}.json"
    cmd = [
        sys.executable,
        __file__,
        "--worker",
        name,
        "--setting-key",
        setting_key,
        "--paths",
        json.dumps(paths),
        "--data",
        data,
        "--workdir",
        str(workdir),
        "--out",
        str(out),
    ]
    if liger:
        cmd.append("--liger")
    if force_cpu:
        cmd.append("--force-cpu")
    if plain_lm_head:
        cmd.append("--plain-lm-head")
    cmd += list(overrides)
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True)
    result = json.loads(out.read_text())
    result["wall_seconds"] = time.perf_counter() - t0
    return result


def summarize(results: dict, config, epochs: int, compact_stock: bool, compact_ours: bool = True) -> dict:
    """Throughput, FLOPs, padding and loss agreement of every path in `results` (name -> worker result), against
    `results["stock"]`. Ours' paths are charged their cached reference pass, amortised over `epochs`."""
    from flops import dpo_step_flops, padded_step_flops, padding_share, peak_flops

    stock = results["stock"]
    shapes, batches = stock["shapes"], stock["batches"]
    n = len(shapes)
    tokens_per_pair = sum(s["tokens"] for s in shapes) / n
    image_tokens = shapes[0]["image_tokens"]
    peak = peak_flops(stock["device"])
    rows = {}
    for name, res in results.items():
        is_stock = name == "stock"
        train_pps = res["pairs_per_step"] / res["step_seconds"]
        pps = train_pps
        if not is_stock:  # `epochs` passes over the dataset plus one cached reference pass
            ref_per_pair = res["reference_pass_seconds"] / res["dataset_pairs"]
            pps = 1.0 / (1.0 / train_pps + ref_per_pair / epochs)
        cpu_pps = None
        if res.get("step_cpu_seconds"):
            cpu_pps = res["pairs_per_step"] / res["step_cpu_seconds"]
            if not is_stock:
                cpu_pps = 1.0 / (1.0 / cpu_pps + res["reference_pass_cpu_seconds"] / res["dataset_pairs"] / epochs)
        compact = compact_stock if is_stock else compact_ours
        useful = dpo_step_flops(config, shapes, "stock" if is_stock else "ours", compact_head=compact, epochs=epochs)
        executed = sum(
            padded_step_flops(config, b, name, image_tokens, compact_head=compact, epochs=epochs)["total"]
            for b in batches
        )
        fl, ex = useful["total"] / n, executed / n
        loss_diff = max(abs(a - b) / max(abs(a), 1e-12) for a, b in zip(stock["losses"], res["losses"]))
        rows[name] = {
            "pairs_per_s": pps,
            "train_only_pairs_per_s": train_pps,
            "tokens_per_s": pps * tokens_per_pair,
            "peak_rss_mib": res["peak_rss_mib"],
            "cuda_max_allocated_mib": res.get("cuda_max_allocated_mib"),
            "flops_per_pair": fl,
            "executed_flops_per_pair": ex,
            "padding_share": padding_share(batches, name),
            "achieved_tflops": pps * ex / 1e12,
            "mfu": (pps * ex / peak) if peak else None,
            "losses": res["losses"],
            "loss_max_rel_diff": loss_diff,
            "step_seconds": res["step_seconds"],
            "reference_pass_seconds": res.get("reference_pass_seconds", 0.0),
            "ratio": pps / rows["stock"]["pairs_per_s"] if not is_stock else 1.0,
            "pairs_per_cpu_s": cpu_pps,
            "cpu_ratio": cpu_pps / rows["stock"]["pairs_per_cpu_s"] if cpu_pps and not is_stock else None,
        }
    return {
        "rows": rows,
        "ratio": rows["ours"]["ratio"],
        "loss_max_rel_diff": max(r["loss_max_rel_diff"] for r in rows.values()),
        "tokens_per_pair": tokens_per_pair,
        "prefix_share": sum(s["prefix"] for s in shapes)
        / sum(s["prefix"] + max(s["chosen"], s["rejected"]) for s in shapes),
    }


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--setting", choices=["cpu", "gpu"], default="cpu")
    parser.add_argument("--tiny", action="store_true", help="gpu setting only: a tiny config of the same code path")
    parser.add_argument(
        "--lengths",
        choices=["short", "mmpr"],
        default="short",
        help="short: 10-30-word answers; mmpr: MMPR-v1.2-like heavy-tailed prompt/answer lengths (MMPR_MIX)",
    )
    parser.add_argument(
        "--batch-pairs", type=int, default=None, help="pairs per device batch (default: the setting's)"
    )
    parser.add_argument("--steps", type=int, default=None, help="training steps (default: the setting's; mmpr: <= 6)")
    parser.add_argument(
        "--ablate-padding-free",
        action="store_true",
        help="also run ours with padding_free=False (one padded row per pair), interleaved with the others",
    )
    parser.add_argument("--epochs", type=int, default=3, help="schedule the cached reference pass is amortised over")
    parser.add_argument("--liger", action="store_true", help="gpu: TRL's use_liger_kernel in both paths")
    parser.add_argument("--repeats", type=int, default=2, help="alternating runs per path; the best is kept")
    parser.add_argument("--workdir", default=None)
    parser.add_argument("--json", default=None, help="also write the summary here")
    parser.add_argument(
        "--plain-lm-head",
        action="store_true",
        help="ablation: ours scores every position in the LM head like TRL does off CUDA (compact_lm_head=False), "
        "so the CPU ratio shows the shared image/prefix and cached reference alone, as on a GPU",
    )
    # Internal: worker mode.
    parser.add_argument("--worker", choices=["stock", "ours", "ours-padded"], help=argparse.SUPPRESS)
    parser.add_argument("--setting-key", help=argparse.SUPPRESS)
    parser.add_argument("--paths", help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    parser.add_argument("--force-cpu", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        worker(args)
        return

    import torch
    import transformers
    import trl

    from pivot_hf import PivotConfig

    key = "gpu-tiny" if (args.setting == "gpu" and args.tiny) else args.setting
    setting = _setting(key, args.batch_pairs, args.lengths, args.steps)
    on_gpu = torch.cuda.is_available()
    if args.setting == "gpu" and not on_gpu and not args.tiny:
        sys.exit("--setting gpu needs a CUDA GPU (use --tiny to exercise the code path on CPU).")
    workdir = Path(args.workdir or f"/tmp/pivot-dpo-bench-{key}")
    workdir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    paths = build_checkpoint(setting, workdir)
    config = PivotConfig.from_pretrained(paths["pivot"])
    data = build_dataset(setting, workdir, config.vision_config.image_size, args.lengths)
    print(f"[setup] checkpoint + data in {time.perf_counter() - t0:.0f}s: {workdir}", flush=True)
    force_cpu = not on_gpu
    overrides = ["--lengths", args.lengths, "--batch-pairs", str(setting["batch_size"])]
    overrides += ["--steps", str(setting["max_steps"])]
    names = ("stock", "ours-padded", "ours") if args.ablate_padding_free else ("stock", "ours")
    results = {}
    # Alternating repeats, best steady-state throughput of each path kept (shared machines are noisy); the peak
    # memory reported is the largest over the repeats.
    for repeat in range(args.repeats):
        for name in names:
            res = _run_worker(
                name, key, paths, data, workdir, args.liger, force_cpu, args.plain_lm_head, tuple(overrides)
            )
            print(
                f"[{name} #{repeat}] {res['wall_seconds']:.0f}s wall, {res['step_seconds']:.2f}s/step, losses "
                f"{res['losses']}",
                flush=True,
            )
            best = results.get(name)
            if best is not None:
                res["peak_rss_mib"] = max(res["peak_rss_mib"], best["peak_rss_mib"])
                if best["step_seconds"] <= res["step_seconds"]:
                    best["peak_rss_mib"] = res["peak_rss_mib"]
                    best["reference_pass_seconds"] = min(best["reference_pass_seconds"], res["reference_pass_seconds"])
                    continue
                res["reference_pass_seconds"] = min(best["reference_pass_seconds"], res["reference_pass_seconds"])
            results[name] = res
    # TRL scores every position in the LM head off CUDA, only completion positions on CUDA.
    summary = summarize(results, config, args.epochs, compact_stock=on_gpu, compact_ours=not args.plain_lm_head)
    summary.update(
        {
            "setting": key,
            "lengths": args.lengths,
            "device": results["stock"]["device"],
            "versions": {"torch": torch.__version__, "transformers": transformers.__version__, "trl": trl.__version__},
            "batch_pairs": setting["batch_size"],
            "steps": setting["max_steps"],
            "epochs": args.epochs,
            "load_average": os.getloadavg(),
        }
    )
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=2))
    rows = summary["rows"]
    print(
        f"\nsetting={key} lengths={args.lengths} device={summary['device']} batch={setting['batch_size']} pairs, "
        f"{summary['tokens_per_pair']:.0f} tokens/pair, shared prefix {summary['prefix_share']:.0%} of a row, "
        f"load average {summary['load_average'][0]:.1f}"
    )
    print(
        f"{'path':11} {'pairs/s':>9} {'tokens/s':>10} {'padding':>8} {'peak RSS MiB':>13} {'CUDA MiB':>9} "
        f"{'GFLOP/pair':>11} {'TFLOP/s':>8} {'MFU':>6} {'loss rel':>9}  losses"
    )
    for name, row in rows.items():
        cuda = f"{row['cuda_max_allocated_mib']:.0f}" if row["cuda_max_allocated_mib"] else "-"
        mfu = f"{row['mfu']:.1%}" if row["mfu"] else "-"
        losses = ", ".join(f"{x:.6f}" for x in row["losses"])
        print(
            f"{name:11} {row['pairs_per_s']:9.3f} {row['tokens_per_s']:10.1f} {row['padding_share']:8.1%} "
            f"{row['peak_rss_mib']:13.0f} {cuda:>9} {row['executed_flops_per_pair'] / 1e9:11.1f} "
            f"{row['achieved_tflops']:8.3f} {mfu:>6} {row['loss_max_rel_diff']:9.1e}  [{losses}]"
        )
    for name, row in rows.items():
        if name != "stock":
            print(
                f"{name}: training only {row['train_only_pairs_per_s']:.3f} pairs/s; cached reference pass "
                f"{row['reference_pass_seconds']:.1f}s for {results[name]['dataset_pairs']} pairs, amortised over "
                f"{args.epochs} epochs; ratio to stock {row['ratio']:.2f}"
                + (f" (per CPU-second of the process: {row['cpu_ratio']:.2f})" if row["cpu_ratio"] else "")
            )
    print(f"max relative loss difference to stock, every step: {summary['loss_max_rel_diff']:.2e}")
    mem = "peak RSS" if not on_gpu else "CUDA max allocated"
    stock_mem = rows["stock"]["peak_rss_mib"] if not on_gpu else rows["stock"]["cuda_max_allocated_mib"]
    ours_mem = rows["ours"]["peak_rss_mib"] if not on_gpu else rows["ours"]["cuda_max_allocated_mib"]
    print(
        f"ratio ours/stock pairs/s: {summary['ratio']:.2f} | {mem} stock {stock_mem:.0f} MiB, ours {ours_mem:.0f} MiB"
    )


if __name__ == "__main__":
    main()
