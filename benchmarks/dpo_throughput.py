"""PIVOT DPO throughput: the stock path (TRL DPOTrainer + transformers LLaVA, live reference) vs pivot_hf's fast path.

    python benchmarks/dpo_throughput.py --setting cpu            # mid-size random model, a few minutes on CPU
    python benchmarks/dpo_throughput.py --setting cpu --lengths mmpr --batch-pairs 8 --check
                                                                 # MMPR-like heavy-tailed lengths, 8 pairs per batch
    python benchmarks/dpo_throughput.py --setting real-shape     # SigLIP2-So400m/16 + Qwen2.5-0.5B on CPU, fp32
    python benchmarks/dpo_throughput.py --setting gpu            # real shape (SigLIP2-So400m/16 + Qwen2.5-1.5B), bf16
    python benchmarks/dpo_throughput.py --setting gpu --tiny     # the gpu code path on a tiny config (runs on CPU)

One run builds one random checkpoint (saved as a Pivot checkpoint and, with the same tensors, as a transformers LLaVA
checkpoint) and one preference dataset, then trains each path in its own subprocess (so peak RSS is separable) on
the same data, batch, seed and optimizer:

- stock: `trl.DPOTrainer` on `LlavaForConditionalGeneration` with a live reference model. Every TRL option that
  could apply to vision data is asked for: `padding_free=True` (TRL 1.16 disables it and pads) and, in a first
  trainer, `precompute_ref_log_probs=True` (TRL refuses it for vision datasets); `use_liger_kernel` with `--liger`
  on CUDA. What TRL refused or disabled is printed. The LLaVA checkpoint's tower is cut after the feature layer
  (`_cut_llava_tower`), so both paths run the same tower blocks; the blocks each forward really ran are counted by
  hooks and printed, and the FLOP model counts each path's own.
- ours:  `PivotDPOTrainer` (its `FastDPOMixin`) on `PivotForConditionalGeneration` with `precompute_ref_log_probs`:
  one image encoding and one prefix pass per pair, compact LM head, reference log-probs cached once and freed, pairs
  packed padding-free (`padding_free`, the default), the update-norm monitor on (logged every step, as in the recipes);
- ours-padded (with `--ablate-padding-free`): ours with `padding_free=False` (one padded row per pair).

`--lengths short` (default): 10-30-word answers. `--lengths mmpr`: heavy-tailed prompt and answer lengths like
MMPR-v1.2's (see `MMPR_MIX`).

Protocol, made for machines shared with other jobs: `--repeats` A/B pairs of runs (stock, ours, then ours, stock, ...;
default 3), each run's throughput the median step time after the warm-up step, the ratio ours/stock taken per A/B
pair, and the median [min-max] of those ratios printed, never the best run. Each worker also records its process
CPU-seconds per step (all threads): the CPU-time ratio measures the work each path does whatever share of the cores
it got. Ours pays the cached reference pass once per schedule: it is timed and amortised over 1 and over 3 epochs
(`--epochs`), both reported. The 1-minute load average at the start and end of every run is printed with the
figures. `--threads N` sets every worker's torch intra-op threads (default: torch's, one per core); on a machine
whose cores are busy with other jobs, `--threads 1` (or `OMP_NUM_THREADS=1`) avoids each kernel waiting at its
barrier for a preempted thread. `--check` exits 1 unless every path's loss agrees with stock's at every step
(`--check-rtol`, 1e-5 relative). The last line is `ratio ours/stock pairs/s, median [min-max] of N A/B pairs: ...`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
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
    # The paper's shape on CPU (random weights): SigLIP2-So400m/16 at 384 px (576 image tokens) + Qwen2.5-0.5B,
    # fp32 (the recipe's master weights), gradient checkpointing, sdpa; 2 pairs per batch, 1 warm-up + 2 measured
    # steps. `--text-layers N` keeps the first N LLM layers (a shallower LLM with the real tower and vocabulary).
    "real-shape": {
        "real_shape": True,
        "text_model": "Qwen2.5-0.5B-Instruct",
        "vocab": "qwen",
        "num_pairs": 6,
        "batch_size": 2,
        "max_steps": 3,
        "dtype": "float32",
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

    pivot_dir, llava_dir = workdir / "pivot", workdir / "llava-cut"
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
        text_cfg = Qwen2Config(
            **_json.loads(Path(real_config_path(setting.get("text_model", "Qwen2.5-1.5B-Instruct"))).read_text())
        )
        if setting.get("text_layers"):
            text_cfg.num_hidden_layers = setting["text_layers"]
            text_cfg.layer_types = text_cfg.layer_types[: setting["text_layers"]]
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
    llava = model.to_llava()
    del model
    _cut_llava_tower(llava).save_pretrained(llava_dir)
    processor.save_pretrained(llava_dir)
    return {"pivot": str(pivot_dir), "llava": str(llava_dir)}


def _cut_llava_tower(llava):
    """The LLaVA model with its vision tower cut after the feature layer, so that stock runs the tower blocks ours
    runs. transformers' LLaVA runs the whole tower (every block, the post-norm and SigLIP's pooling head) and keeps
    `hidden_states[vision_feature_layer]`; with feature layer -2 the last block and the head never reach the output.
    Cut: blocks above the feature layer dropped, `vision_use_head=False`, `vision_feature_layer=-1` (the output of
    the last kept block, before the post-norm): the same features, the same loss, the same tower work."""
    from pivot_hf.modeling_pivot import find_encoder_layers, resolve_feature_layer

    config = llava.config
    tower = llava.model.vision_tower
    parent, attr, layers = find_encoder_layers(tower)
    if not isinstance(config.vision_feature_layer, int):
        return llava
    keep = resolve_feature_layer(config.vision_feature_layer, len(layers))
    setattr(parent, attr, type(layers)(list(layers)[:keep]))
    config.vision_config.num_hidden_layers = keep
    tower.config.num_hidden_layers = keep
    if getattr(tower.config, "vision_use_head", False):
        for module in tower.modules():
            if getattr(module, "use_head", False):
                module.use_head, module.head = False, None
        config.vision_config.vision_use_head = tower.config.vision_use_head = False
    config.vision_feature_layer = -1
    return llava


class BlocksRun:
    """Counts the vision-tower blocks whose forward runs while active (forward hooks on every block; a block re-run
    by gradient checkpointing counts once), so each path's real tower work is measured, not inferred from configs."""

    def __init__(self, model):
        from pivot_hf.modeling_pivot import find_encoder_layers

        tower = model.model.vision_tower if hasattr(model, "model") else model.vision_tower
        self.layers = find_encoder_layers(tower)[2]
        self.ran: set[int] = set()

    def __enter__(self):
        # By index, not by iteration: a cut tower's block list iterates only the blocks below the cut, and a block
        # above it that ran anyway must be counted.
        self.handles = [
            self.layers[i].register_forward_hook(lambda *_, i=i: self.ran.add(i)) for i in range(len(self.layers))
        ]
        return self

    def __exit__(self, *exc):
        for handle in self.handles:
            handle.remove()

    @property
    def count(self) -> int:
        return len(self.ran)


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


def _setting(
    key: str, batch_pairs: int | None = None, lengths: str = "short", steps: int | None = None, text_layers=None
) -> dict:
    """A copy of `SETTINGS[key]` with the batch, length mix and step count of this run. Each run covers at most one
    epoch: the dataset holds `batch x steps` pairs when that is more than the setting's."""
    setting = dict(SETTINGS[key])
    if text_layers:
        setting["text_layers"] = text_layers
    if batch_pairs:
        setting["batch_size"] = batch_pairs
    if steps:
        setting["max_steps"] = steps
    elif lengths == "mmpr" and not setting.get("real_shape"):
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

    from flops import pair_block_keys
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
            keys["ours"] = int(pair_block_keys(prefix, chosen, rejected).sum())
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


def _time_monitor(trainer) -> dict:
    """Wall time spent in the update-norm monitor (ours; stock has none), accumulated in the returned dict: the
    callback's hooks are wrapped on this benchmark's own trainer instance."""
    spent = {"value": 0.0}
    callback = getattr(trainer, "update_norm_callback", None)
    if callback is None:
        return spent
    for name in ("on_step_begin", "on_pre_optimizer_step", "on_step_end"):
        method = getattr(callback, name)

        def timed(*a, _method=method, **k):
            t0 = time.perf_counter()
            try:
                return _method(*a, **k)
            finally:
                spent["value"] += time.perf_counter() - t0

        setattr(callback, name, timed)
    return spent


def loss_disagreement(reference: list[float], other: list[float]) -> float:
    """Largest relative difference of `other`'s per-step losses to `reference`'s; infinite when a loss is missing
    (different step counts, no steps) or not finite in either (a NaN compares False against any tolerance, so it
    would otherwise pass `--check`)."""
    if not reference or len(reference) != len(other):
        return float("inf")
    if not all(math.isfinite(x) for x in (*reference, *other)):
        return float("inf")
    return max(abs(a - b) / max(abs(a), 1e-12) for a, b in zip(reference, other))


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

    if args.threads:
        torch.set_num_threads(args.threads)
    load_start = os.getloadavg()[0]
    setting = _setting(args.setting_key, args.batch_pairs, args.lengths, args.steps, args.text_layers)
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
        "use_liger_kernel": bool(args.liger and on_gpu),
    }
    # transformers 5.23 renamed the key (the old one warns); the lower end of the tested range has only the old one.
    renamed = "activation_checkpointing" in {f.name for f in dataclasses.fields(trl.DPOConfig)}
    common["activation_checkpointing" if renamed else "gradient_checkpointing"] = setting["gradient_checkpointing"]
    ref_seconds = {"value": 0.0}
    ref_batches, ref_cpu = [], []
    # A previous run's cached reference log-probs would be reused (that is the resume path): start clean so the
    # reference pass is timed.
    shutil.rmtree(Path(common["output_dir"]) / "ref_logps", ignore_errors=True)
    # Hub kernels off in every arm (transformers 5.25+ turns them on by default): on a GPU with Hub access they would
    # swap in the same RMSNorm kernel Liger provides, in the "without Liger" arms too.
    load = {"dtype": dtype, "attn_implementation": attn, "use_kernels": False}
    stock_options = {}
    if args.worker == "stock":
        model = LlavaForConditionalGeneration.from_pretrained(paths["llava"], **load)
        ref = LlavaForConditionalGeneration.from_pretrained(paths["llava"], **load)
        # Every TRL option that could apply to vision data is asked for; what TRL refuses or disables is recorded.
        try:  # TRL raises on a vision dataset: no cached reference for stock
            trl.DPOTrainer(
                model=model,
                ref_model=ref,
                args=trl.DPOConfig(**common, precompute_ref_log_probs=True),
                train_dataset=dataset,
                processing_class=processor,
            )
            stock_options["precompute_ref_log_probs"] = "accepted"
        except ValueError as err:
            stock_options["precompute_ref_log_probs"] = "refused: " + str(err).split(". ")[0]
        config = trl.DPOConfig(**common, padding_free=True)
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
    if args.worker == "stock":
        stock_options["padding_free"] = "used" if trainer.padding_free else "disabled by TRL (falls back to padding)"
        stock_options["use_liger_kernel"] = "used" if common["use_liger_kernel"] else "off (CUDA only; --liger)"
    monitor_seconds = _time_monitor(trainer)
    t_train = time.perf_counter()
    with BlocksRun(trainer.model) as blocks:
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
        "vision_blocks_run": blocks.count,
        "stock_options": stock_options,
        "monitor_seconds_per_step": monitor_seconds["value"] / max(steps, 1),
        "threads": torch.get_num_threads(),
        "load_average": [load_start, os.getloadavg()[0]],
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
) -> dict:
    """One path's training run in its own process; its result dict, with `wall_seconds`, or `{"failed": reason}`
    when the process died (an out-of-memory kill reads as signal 9)."""
    out = workdir / f"result-{name}.json"
    out.unlink(missing_ok=True)
    cmd = [sys.executable, __file__, "--worker", name, "--setting-key", setting_key, "--paths", json.dumps(paths)]
    cmd += ["--data", data, "--workdir", str(workdir), "--out", str(out)]
    if liger:
        cmd.append("--liger")
    if force_cpu:
        cmd.append("--force-cpu")
    if plain_lm_head:
        cmd.append("--plain-lm-head")
    cmd += list(overrides)
    t0 = time.perf_counter()
    proc = subprocess.run(cmd)
    if proc.returncode != 0:
        killed = proc.returncode < 0 and -proc.returncode == 9
        return {"failed": f"exit {proc.returncode}" + (" (SIGKILL: out of memory?)" if killed else "")}
    result = json.loads(out.read_text())
    result["wall_seconds"] = time.perf_counter() - t0
    return result


def summarize(results: dict, config, epochs: int, compact_stock: bool, compact_ours: bool = True) -> dict:
    """Throughput, FLOPs, padding and loss agreement of every path in `results` (name -> worker result of one
    repeat), against `results["stock"]`. Ours' paths are charged their cached reference pass, amortised over
    `epochs`; each path's FLOPs count the tower blocks its forward ran."""
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
        kind = "stock" if is_stock else "ours"
        blocks = res.get("vision_blocks_run")
        useful = dpo_step_flops(config, shapes, kind, compact_head=compact, epochs=epochs, vision_blocks=blocks)
        executed = sum(
            padded_step_flops(
                config, b, name, image_tokens, compact_head=compact, epochs=epochs, vision_blocks=blocks
            )["total"]
            for b in batches
        )
        fl, ex = useful["total"] / n, executed / n
        loss_diff = loss_disagreement(stock["losses"], res["losses"])
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
            "step_cpu_seconds": res.get("step_cpu_seconds"),
            "reference_pass_seconds": res.get("reference_pass_seconds", 0.0),
            "monitor_seconds_per_step": res.get("monitor_seconds_per_step", 0.0),
            "vision_blocks_run": blocks,
            "threads": res.get("threads"),
            "load_average": res.get("load_average"),
            "ratio": pps / rows["stock"]["pairs_per_s"] if not is_stock else 1.0,
            "flops_ratio": rows["stock"]["executed_flops_per_pair"] / ex if not is_stock else 1.0,
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


def _spread(values: list[float]) -> dict:
    """Median and min-max of `values` (the tables quote these, never the best run)."""
    return {"median": _median(values), "min": min(values), "max": max(values), "n": len(values)}


def _fmt(spread: dict, digits: int = 2) -> str:
    return f"{spread['median']:.{digits}f} [{spread['min']:.{digits}f}-{spread['max']:.{digits}f}]"


def aggregate(repeats: list[dict], names: list[str], epochs_list: list[int]) -> dict:
    """Median and min-max over the A/B repeats, per path and per amortisation: pairs/s, CPU-seconds per pair, and the
    per-repeat ratios ours/stock (each repeat's ours divided by the stock run next to it)."""
    out = {}
    for epochs in epochs_list:
        per = {}
        for name in names:
            rows = [rep[epochs]["rows"][name] for rep in repeats]
            per[name] = {
                "pairs_per_s": _spread([r["pairs_per_s"] for r in rows]),
                "cpu_seconds_per_pair": _spread([1.0 / r["pairs_per_cpu_s"] for r in rows if r["pairs_per_cpu_s"]]),
                "wall_seconds_per_pair": _spread([1.0 / r["pairs_per_s"] for r in rows]),
                "peak_rss_mib": max(r["peak_rss_mib"] for r in rows),
                "loss_max_rel_diff": max(r["loss_max_rel_diff"] for r in rows),
            }
            if name != "stock":
                per[name]["ratio"] = _spread([r["ratio"] for r in rows])
                per[name]["cpu_ratio"] = _spread([r["cpu_ratio"] for r in rows if r["cpu_ratio"]])
                per[name]["flops_ratio"] = rows[0]["flops_ratio"]
        out[epochs] = per
    return out


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--setting", choices=["cpu", "gpu", "real-shape"], default="cpu")
    parser.add_argument("--tiny", action="store_true", help="gpu setting only: a tiny config of the same code path")
    parser.add_argument(
        "--lengths",
        choices=["short", "mmpr"],
        default=None,
        help="short: 10-30-word answers; mmpr: MMPR-v1.2-like heavy-tailed prompt/answer lengths (MMPR_MIX). "
        "Default: short, mmpr for real-shape",
    )
    parser.add_argument(
        "--batch-pairs", type=int, default=None, help="pairs per device batch (default: the setting's)"
    )
    parser.add_argument("--steps", type=int, default=None, help="training steps (default: the setting's; mmpr: <= 6)")
    parser.add_argument(
        "--text-layers", type=int, default=None, help="real-shape/gpu: keep the first N LLM layers (a shallower LLM)"
    )
    parser.add_argument(
        "--ablate-padding-free",
        action="store_true",
        help="also run ours with padding_free=False (one padded row per pair), interleaved with the others",
    )
    parser.add_argument(
        "--epochs",
        default="1,3",
        help="schedules (comma-separated epochs) the cached reference pass is amortised over; each is reported",
    )
    parser.add_argument("--liger", action="store_true", help="gpu: TRL's use_liger_kernel in both paths")
    parser.add_argument(
        "--repeats",
        type=int,
        default=None,
        help="A/B pairs of runs (stock, ours, then ours, stock, ...); default 3, 1 at the real shape",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch intra-op threads of every worker (default: torch's, one per core). On a machine shared with "
        "other jobs, fewer threads than cores avoids waiting on a preempted thread at every kernel",
    )
    parser.add_argument(
        "--check", action="store_true", help="exit 1 unless every path's loss agrees with stock's at every step"
    )
    parser.add_argument("--check-rtol", type=float, default=1e-5, help="relative loss tolerance of --check")
    parser.add_argument(
        "--force-memory", action="store_true", help="real-shape on CPU: run even where the memory estimate says no"
    )
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
    if args.lengths is None:
        args.lengths = "mmpr" if args.setting == "real-shape" else "short"
    if args.worker:
        worker(args)
        return

    import torch
    import transformers
    import trl

    from pivot_hf import PivotConfig

    key = "gpu-tiny" if (args.setting == "gpu" and args.tiny) else args.setting
    setting = _setting(key, args.batch_pairs, args.lengths, args.steps, args.text_layers)
    on_gpu = torch.cuda.is_available()
    if args.setting == "gpu" and not on_gpu and not args.tiny:
        sys.exit("--setting gpu needs a CUDA GPU (use --tiny to exercise the code path on CPU).")
    repeats = args.repeats or (1 if setting.get("real_shape") else 3)
    epochs_list = sorted({int(e) for e in str(args.epochs).split(",") if e.strip()})
    suffix = f"-L{args.text_layers}" if args.text_layers else ""
    workdir = Path(args.workdir or f"/tmp/pivot-dpo-bench-{key}{suffix}")
    workdir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    paths = build_checkpoint(setting, workdir)
    config = PivotConfig.from_pretrained(paths["pivot"])
    data = build_dataset(setting, workdir, config.vision_config.image_size, args.lengths)
    print(f"[setup] checkpoint + data in {time.perf_counter() - t0:.0f}s: {workdir}", flush=True)
    force_cpu = not on_gpu
    if setting.get("real_shape") and not on_gpu:
        _memory_preflight(paths, args.force_memory)
    overrides = ["--lengths", args.lengths, "--batch-pairs", str(setting["batch_size"])]
    overrides += ["--steps", str(setting["max_steps"])]
    if args.text_layers:
        overrides += ["--text-layers", str(args.text_layers)]
    if args.threads:
        overrides += ["--threads", str(args.threads)]
    names = ["stock", "ours-padded", "ours"] if args.ablate_padding_free else ["stock", "ours"]
    # A/B alternation: every repeat runs each path once, back to back, so a neighbour's burst or the machine's drift
    # lands on both sides of a ratio; the ratio is taken per repeat, and its median and spread are reported.
    runs, failed = [], {}
    for repeat in range(repeats):
        results = {}
        # A B, then B A, ...: a path that always ran first would carry any order effect (caches, the machine's
        # drift within a pair) into every ratio.
        for name in names if repeat % 2 == 0 else names[::-1]:
            res = _run_worker(
                name, key, paths, data, workdir, args.liger, force_cpu, args.plain_lm_head, tuple(overrides)
            )
            if "failed" in res:
                failed[name] = res["failed"]
                print(f"[{name} #{repeat}] failed: {res['failed']}", flush=True)
                continue
            results[name] = res
            print(
                f"[{name} #{repeat}] {res['wall_seconds']:.0f}s wall, {res['step_seconds']:.2f}s/step "
                f"({res['step_cpu_seconds']:.2f} CPU-s), {res['threads']} threads, load "
                f"{res['load_average'][0]:.1f}-{res['load_average'][1]:.1f}, losses {res['losses']}",
                flush=True,
            )
        if failed:
            break
        runs.append({name: results[name] for name in names})  # summaries read stock first, whatever ran first
    if failed:
        for name, reason in failed.items():
            print(f"{name} could not run on this machine: {reason}")
        sys.exit(1)
    # TRL scores every position in the LM head off CUDA, only completion positions on CUDA.
    per_repeat = [
        {e: summarize(r, config, e, compact_stock=on_gpu, compact_ours=not args.plain_lm_head) for e in epochs_list}
        for r in runs
    ]
    stats = aggregate(per_repeat, names, epochs_list)
    last = per_repeat[-1][max(epochs_list)]
    blocks = {name: runs[0][name]["vision_blocks_run"] for name in names}
    loads = [x for r in runs for res in r.values() for x in res["load_average"]]
    summary = {
        "setting": key,
        "lengths": args.lengths,
        "device": runs[0]["stock"]["device"],
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__, "trl": trl.__version__},
        "batch_pairs": setting["batch_size"],
        "steps": setting["max_steps"],
        "text_layers": args.text_layers,
        "repeats": repeats,
        "threads": runs[0]["stock"]["threads"],
        "load_average": {"min": min(loads), "max": max(loads)},
        "vision_blocks_run": blocks,
        "stock_options": runs[0]["stock"]["stock_options"],
        "tokens_per_pair": last["tokens_per_pair"],
        "prefix_share": last["prefix_share"],
        "loss_max_rel_diff": max(rep[e]["loss_max_rel_diff"] for rep in per_repeat for e in epochs_list),
        "by_epochs": {str(e): v for e, v in stats.items()},
        # The last repeat's rows and the median ratio at the longest schedule (what the GPU check reports).
        "rows": last["rows"],
        "ratio": stats[max(epochs_list)]["ours"]["ratio"]["median"],
        "runs": [{e: rep[e]["rows"] for e in epochs_list} for rep in per_repeat],
    }
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=2))
    _print_summary(summary, last, names, epochs_list, runs, on_gpu)
    if len(set(blocks.values())) != 1:
        print(f"warning: the paths ran different numbers of tower blocks: {blocks} (the FLOP counts follow each)")
    if args.check:
        bad = summary["loss_max_rel_diff"] > args.check_rtol
        print(
            f"--check: max relative loss difference {summary['loss_max_rel_diff']:.2e} "
            f"{'>' if bad else '<='} {args.check_rtol:.0e}: {'FAIL' if bad else 'ok'}"
        )
        if bad:
            sys.exit(1)


# Peak RSS above the tensors counted by the preflight (activations with gradient checkpointing, the LM head's logits
# over 151k tokens, libraries, allocator slack), in units of the checkpoint's weights, measured at the real shape on
# CPU (SigLIP2-So400m/16 + Qwen2.5-0.5B, 2 pairs, 2026-12-07): stock 21.5 GiB peak - 17.2 GiB of tensors = 4.3 GiB
# = 1.25x the 3.44 GiB of weights; ours 17.0 - 13.8 = 3.2 GiB = 0.93x.
_MEASURED_OVERHEAD = {"stock": 1.25, "ours": 0.93}


def _memory_preflight(paths: dict, force: bool) -> None:
    """Before the real-shape runs on CPU: the peak each path is expected to reach against the memory available.
    Tensors: stock holds policy + live reference + gradients + AdamW's two moments = 5x the weights; ours 4x (the
    reference lives only during the cached pass, before the optimizer state exists). On top, what the measured run
    held beyond its tensors (`_MEASURED_OVERHEAD`). Exits with the figures when stock cannot fit, naming
    `--text-layers` (a shallower LLM, the real tower)."""
    import psutil

    weights = sum(f.stat().st_size for f in Path(paths["pivot"]).glob("*.safetensors"))
    available = psutil.virtual_memory().available
    tensors = {"stock": 5 * weights, "ours": 4 * weights}
    need = {path: tensors[path] + _MEASURED_OVERHEAD[path] * weights for path in tensors}
    print(
        f"[memory] weights {weights / 2**30:.1f} GiB; tensors at the peak: stock {tensors['stock'] / 2**30:.1f} GiB, "
        f"ours {tensors['ours'] / 2**30:.1f} GiB; expected peak with activations and libraries: stock "
        f"{need['stock'] / 2**30:.1f} GiB, ours {need['ours'] / 2**30:.1f} GiB; available now "
        f"{available / 2**30:.1f} GiB",
        flush=True,
    )
    if need["stock"] > available and not force:
        sys.exit(
            "stock cannot run at this shape on this machine now (policy + live reference + gradients + AdamW "
            f"{tensors['stock'] / 2**30:.1f} GiB, with activations and libraries about {need['stock'] / 2**30:.1f} "
            f"GiB; {available / 2**30:.1f} GiB available): use --text-layers N for a shallower LLM with the real "
            "tower, or --force-memory to try anyway."
        )


def _print_summary(summary: dict, last: dict, names: list[str], epochs_list: list[int], runs: list, on_gpu: bool):
    stats = summary["by_epochs"]
    load = summary["load_average"]
    print(
        f"\nsetting={summary['setting']} lengths={summary['lengths']} device={summary['device']} "
        f"batch={summary['batch_pairs']} pairs, {summary['tokens_per_pair']:.0f} tokens/pair, shared prefix "
        f"{summary['prefix_share']:.0%} of a row; {summary['repeats']} A/B repeats, {summary['threads']} threads, "
        f"load average {load['min']:.1f}-{load['max']:.1f} (1-min, at the start and end of every run); vision "
        f"blocks run {summary['vision_blocks_run']}"
    )
    print("stock's TRL options: " + "; ".join(f"{k}: {v}" for k, v in summary["stock_options"].items()))
    rows = last["rows"]
    print(f"last repeat, {max(epochs_list)}-epoch amortisation:")
    print(
        f"{'path':11} {'pairs/s':>9} {'tokens/s':>10} {'padding':>8} {'peak RSS MiB':>13} {'CUDA MiB':>9} "
        f"{'GFLOP/pair':>11} {'TFLOP/s':>8} {'MFU':>6} {'monitor s':>9} {'loss rel':>9}  losses"
    )
    for name, row in rows.items():
        cuda = f"{row['cuda_max_allocated_mib']:.0f}" if row["cuda_max_allocated_mib"] else "-"
        mfu = f"{row['mfu']:.1%}" if row["mfu"] else "-"
        losses = ", ".join(f"{x:.6f}" for x in row["losses"])
        print(
            f"{name:11} {row['pairs_per_s']:9.3f} {row['tokens_per_s']:10.1f} {row['padding_share']:8.1%} "
            f"{row['peak_rss_mib']:13.0f} {cuda:>9} {row['executed_flops_per_pair'] / 1e9:11.1f} "
            f"{row['achieved_tflops']:8.3f} {mfu:>6} {row['monitor_seconds_per_step']:9.3f} "
            f"{row['loss_max_rel_diff']:9.1e}  [{losses}]"
        )
    print(f"\nmedian [min-max] over {summary['repeats']} A/B repeats:")
    for epochs in epochs_list:
        per = stats[str(epochs)] if str(epochs) in stats else stats[epochs]
        for name in names:
            entry = per[name]
            line = (
                f"  {epochs}-epoch {name:11} pairs/s {_fmt(entry['pairs_per_s'], 3)}, wall s/pair "
                f"{_fmt(entry['wall_seconds_per_pair'])}, CPU-s/pair {_fmt(entry['cpu_seconds_per_pair'])}"
            )
            if name != "stock":
                line += (
                    f"; ratio to stock {_fmt(entry['ratio'])}, per CPU-second {_fmt(entry['cpu_ratio'])}, "
                    f"FLOP model {entry['flops_ratio']:.2f}"
                )
            print(line)
    print(f"max relative loss difference to stock, every step of every repeat: {summary['loss_max_rel_diff']:.2e}")
    mem = "peak RSS" if not on_gpu else "CUDA max allocated"
    key = "peak_rss_mib" if not on_gpu else "cuda_max_allocated_mib"
    stock_mem = max(r["stock"][key] or 0 for r in runs)
    ours_mem = max(r["ours"][key] or 0 for r in runs)
    headline = []
    for epochs in epochs_list:
        per = stats[str(epochs)] if str(epochs) in stats else stats[epochs]
        headline.append(
            f"{epochs}-epoch {_fmt(per['ours']['ratio'])} (CPU-time ratio {_fmt(per['ours']['cpu_ratio'])})"
        )
    print(
        f"ratio ours/stock pairs/s, median [min-max] of {summary['repeats']} A/B pairs: "
        + ", ".join(headline)
        + f" | {mem} stock {stock_mem:.0f} MiB, ours {ours_mem:.0f} MiB | load {load['min']:.1f}-{load['max']:.1f}"
    )


if __name__ == "__main__":
    main()
