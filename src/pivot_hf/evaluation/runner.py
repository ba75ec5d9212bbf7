"""The `recipes/eval_vision.py` arguments and the per-task drivers (load data and models, extract, score, report)."""

from __future__ import annotations

import logging
import os
from dataclasses import asdict, dataclass, field

import numpy as np


logger = logging.getLogger(__name__)

TASKS = ("linear_probe", "prototype", "segmentation", "gradcam", "alignment")
# Seeds vary what they claim to vary. Segmentation: head initialisation and batch order (the paper reports six).
# Linear probe: the validation split. Alignment: the pairs drawn when `alignment_max_samples` is set (three draws);
# with all pairs the score is deterministic, so one seed (the paper's three seeds are three trained encoders: pass
# them as models). Prototype: deterministic, one seed.
DEFAULT_SEEDS = {"segmentation": [0, 1, 2, 3, 4, 5]}


def default_cache_dir() -> str:
    base = os.environ.get("HF_HOME", os.path.join(os.path.expanduser("~"), ".cache", "huggingface"))
    return os.path.join(base, "pivot_hf", "features")


@dataclass
class EvalVisionArguments:
    """Every knob of the vision-only evaluations (YAML via `--config` = CLI flags = these fields)."""

    task: str = field(
        metadata={"help": "One of: linear_probe, prototype, segmentation, gradcam, alignment.", "choices": TASKS}
    )
    model_name_or_path: list[str] = field(
        metadata={
            "help": "Exported encoder folder(s), Pivot checkpoint(s) or Hub ids; several are compared in one chart."
        }
    )
    output_dir: str = field(metadata={"help": "Where results.json, summary.md and summary.png are written."})
    model_labels: list[str] | None = field(
        default=None, metadata={"help": "Display names for the models (e.g. base sft pivot); default: folder names."}
    )
    dataset_name: str | None = field(
        default=None,
        metadata={
            "help": "ImageFolder dir, `save_to_disk` folder or Hub id (classification); ADE20K root (segmentation); "
            "folder with metadata.jsonl, saved dataset or Hub id such as minhuh/prh (alignment); MMPR JSONL or folder "
            "(gradcam)."
        },
    )
    dataset_config: str | None = field(default=None, metadata={"help": "Hub dataset configuration name."})
    dataset_revision: str | None = field(default=None, metadata={"help": "Hub dataset revision (e.g. wit_1024)."})
    train_split: str | None = field(default=None, metadata={"help": "Train split name (default: train/training)."})
    test_split: str | None = field(
        default=None, metadata={"help": "Test split name (default: test/validation/val; ImageNet's val is the test)."}
    )
    image_column: str | None = field(default=None, metadata={"help": "Image column of an HF dataset (auto-detected)."})
    label_column: str | None = field(default=None, metadata={"help": "Label column of an HF dataset (auto-detected)."})
    text_column: str | None = field(default=None, metadata={"help": "Caption column for alignment (auto-detected)."})
    max_train_samples: int | None = field(
        default=None, metadata={"help": "Random subset of train (the paper's 50K ImageNet subset: 50000)."}
    )
    max_test_samples: int | None = field(default=None, metadata={"help": "Random subset of the test split."})
    subset_seed: int = field(default=0, metadata={"help": "Seed of the random train/test subsets."})
    test_fraction: float = field(
        default=0.2, metadata={"help": "When the data has no test split, the stratified share of train used as test."}
    )
    seeds: list[int] | None = field(
        default=None,
        metadata={
            "help": "Seeds: linear_probe -> the validation split; segmentation -> head init + batch order (default "
            "6); alignment -> the pairs drawn (needs alignment_max_samples; default 3 then, else 1); prototype has "
            "no randomness (1), nor has gradcam. The paper's seeds are trained encoders: pass them as several models."
        },
    )
    # features
    source: str = field(
        default="encoder",
        metadata={
            "help": "encoder: the tower at the trained feature layer; projector: the LLM's visual tokens (Pivot).",
            "choices": ("encoder", "projector"),
        },
    )
    vision_feature_layer: int | None = field(
        default=None,
        metadata={"help": "Hidden state to read. Default: the checkpoint's (pivot_vision_feature_layer / -2)."},
    )
    pooling: str = field(
        default="mean",
        metadata={"help": "Per-image pooling for the probes: mean over patch tokens (paper).", "choices": ("mean",)},
    )
    alignment_pooling: str = field(
        default="auto",
        metadata={
            "help": "Vision pooling for alignment: auto = CLS token for families with one (CLIP, DINOv2, ViT, MAE), "
            "mean over patch tokens otherwise (SigLIP); first_token = token 0 whatever it is (platonic-rep literal).",
            "choices": ("auto", "cls", "mean", "first_token"),
        },
    )
    batch_size: int = field(default=64, metadata={"help": "Images per encoder forward."})
    dataloader_num_workers: int = field(
        default=0, metadata={"help": "Processes decoding/resizing images while the encoder runs (0: in the main one)."}
    )
    device: str | None = field(default=None, metadata={"help": "cuda / cpu (default: cuda when available)."})
    dtype: str = field(
        default="float32", metadata={"help": "Encoder dtype.", "choices": ("float32", "bfloat16", "float16")}
    )
    cache_dir: str | None = field(
        default=None, metadata={"help": "Feature cache folder (default: $HF_HOME/pivot_hf/features)."}
    )
    no_cache: bool = field(default=False, metadata={"help": "Do not read or write the feature cache."})
    cache_dtype: str = field(
        default="float32",
        metadata={
            "help": "Storage dtype of cached features (float16 halves ADE20K token caches).",
            "choices": ("float32", "float16"),
        },
    )
    # linear probe / prototype
    val_fraction: float = field(default=0.1, metadata={"help": "Share of train held out to choose C (per class)."})
    max_iter: int = field(default=1000, metadata={"help": "LogisticRegression max_iter (CLIP recipe: 1000)."})
    steps_per_decade: int = field(default=8, metadata={"help": "Resolution of the binary C search (CLIP: 8)."})
    c_tie_break: str = field(
        default="larger",
        metadata={
            "help": "Equal validation top-1 for several C: the larger C wins (reference) or the smaller.",
            "choices": ("larger", "smaller"),
        },
    )
    prototype_normalize: bool = field(
        default=False,
        metadata={
            "help": "False (paper): weights = raw class-mean features. True: cosine (L2-normalised features/means)."
        },
    )
    # segmentation
    num_classes: int = field(default=151, metadata={"help": "Segmentation outputs (ADE20K: 150 classes + unlabeled)."})
    head_hidden: int = field(default=1024, metadata={"help": "Hidden width of the MLP head D -> hidden -> C."})
    learning_rate: float = field(default=1e-3, metadata={"help": "AdamW learning rate of the segmentation head."})
    weight_decay: float = field(default=0.01, metadata={"help": "AdamW weight decay of the segmentation head."})
    seg_batch_size: int = field(default=32, metadata={"help": "Images per segmentation-head step."})
    num_train_epochs: int = field(default=5, metadata={"help": "Segmentation-head epochs."})
    seg_warmup_steps: int = field(default=500, metadata={"help": "Linear warmup updates from lr 0 (patch-seg: 500)."})
    seg_min_learning_rate: float = field(
        default=1e-4, metadata={"help": "Floor of the cosine decay (patch-seg's min_lr: 1e-4)."}
    )
    warmup_ratio: float | None = field(
        default=None, metadata={"help": "When set, warmup = this share of all updates instead of seg_warmup_steps."}
    )
    seg_drop_last: bool = field(default=True, metadata={"help": "Drop the last partial training batch (patch-seg)."})
    seg_autocast: str = field(
        default="auto",
        metadata={
            "help": "Head autocast: auto = bfloat16 on CUDA (patch-seg), none on CPU.",
            "choices": ("auto", "bfloat16", "none"),
        },
    )
    threshold: float = field(default=0.5, metadata={"help": "Sigmoid threshold for a positive patch prediction."})
    image_size: int | None = field(default=None, metadata={"help": "Square input size (default: the processor's)."})
    # alignment
    text_model_name_or_path: str | None = field(
        default=None,
        metadata={"help": "Reference LLM for caption features (default: the Pivot checkpoint's own LLM)."},
    )
    knn_k: int = field(default=10, metadata={"help": "k of mutual kNN."})
    clamp_quantile: float = field(
        default=0.95, metadata={"help": "Clamp each model's feature stack to this quantile of |x|."}
    )
    clamp_method: str = field(
        default="mean_per_sample",
        metadata={
            "help": "One threshold per stack: mean_per_sample (platonic-rep's measure_alignment.py default) = mean "
            "over samples of each sample's quantile over layers x dim; exact (its --precise) = sorted |x| at q*numel.",
            "choices": ("mean_per_sample", "exact"),
        },
    )
    alignment_include_embeddings: bool = field(
        default=False,
        metadata={"help": "Add the embeddings output to the vision layers (the reference uses block outputs only)."},
    )
    alignment_max_samples: int | None = field(
        default=None, metadata={"help": "Pairs drawn per seed (default: all pairs; the paper uses 1024 WIT pairs)."}
    )
    caption_max_length: int | None = field(
        default=None,
        metadata={"help": "Truncate captions to this many tokens (default: whole captions, as the reference)."},
    )
    # gradcam
    image: str | None = field(default=None, metadata={"help": "gradcam: one image path (instead of dataset_name)."})
    question: str | None = field(default=None, metadata={"help": "gradcam: the question of that sample."})
    chosen: str | None = field(default=None, metadata={"help": "gradcam: the chosen answer."})
    rejected: str | None = field(default=None, metadata={"help": "gradcam: the rejected answer."})
    image_root: str | None = field(
        default=None, metadata={"help": "gradcam: folder the JSONL image paths are relative to."}
    )
    max_samples: int = field(default=4, metadata={"help": "gradcam: samples read from dataset_name."})
    ref_model_name_or_path: str | None = field(
        default=None, metadata={"help": "gradcam: frozen DPO reference (default: the model itself, as at step 0)."}
    )
    beta: float = field(default=0.1, metadata={"help": "gradcam: DPO beta (official recipe: 0.1)."})
    gradcam_at: str = field(
        default="projector",
        metadata={
            "help": "Read gradients at the projector output (LLM visual tokens) or its input (encoder features).",
            "choices": ("projector", "encoder"),
        },
    )
    gradcam_method: str = field(
        default="l1",
        metadata={
            "help": "l1: |grad| summed over channels; gradcam: ReLU(grad-weighted activations).",
            "choices": ("l1", "gradcam"),
        },
    )
    fix_border: bool = field(default=False, metadata={"help": "gradcam: replace border patches by inner neighbours."})

    def __post_init__(self):
        if self.task not in TASKS:
            raise ValueError(f"--task must be one of {TASKS}, got {self.task!r}")
        if isinstance(self.model_name_or_path, str):
            self.model_name_or_path = [self.model_name_or_path]
        if self.model_labels and len(self.model_labels) != len(self.model_name_or_path):
            raise ValueError("--model_labels needs one label per --model_name_or_path")
        if self.seeds is None:
            if self.task == "alignment":
                self.seeds = [0, 1, 2] if self.alignment_max_samples else [0]
            else:
                self.seeds = DEFAULT_SEEDS.get(self.task, [0])
        if len(set(self.seeds)) != len(self.seeds):
            dup = sorted({s for s in self.seeds if self.seeds.count(s) > 1})
            raise ValueError(
                f"--seeds {self.seeds} repeats {dup}: a repeated seed reruns the same draw, so the mean counts it twice "
                "and the std understates the spread. Pass distinct seeds."
            )
        if not 0.0 < self.clamp_quantile <= 1.0:
            raise ValueError(f"--clamp_quantile must lie in (0, 1] (1 = no clamp), got {self.clamp_quantile}")
        if self.knn_k < 1:
            raise ValueError(f"--knn_k must be >= 1, got {self.knn_k}")
        if self.task == "alignment":
            from .alignment import check_alignment_seeds

            check_alignment_seeds(self.seeds, self.alignment_max_samples)
            if self.alignment_max_samples is not None and self.alignment_max_samples <= self.knn_k:
                raise ValueError(
                    f"--alignment_max_samples {self.alignment_max_samples} leaves no room for --knn_k {self.knn_k} "
                    "neighbours among the other pairs: draw more than knn_k pairs."
                )
        if self.task == "prototype" and len(self.seeds) > 1:
            raise ValueError(
                f"prototype with seeds {self.seeds}: the prototype probe has no randomness (class means of all train "
                "features), so every seed gives the same number. Pass one seed; --subset_seed draws the train/test "
                "subsets, and the paper's seeds are trained encoders -- pass each as a --model_name_or_path."
            )
        if self.task == "gradcam" and len(self.seeds) > 1:
            raise ValueError(
                f"gradcam with seeds {self.seeds}: a gradient map of fixed weights on a fixed sample has no "
                "randomness, so every seed gives the same map. Pass one seed (or none)."
            )

    def labels(self) -> list[str]:
        return self.model_labels or [os.path.basename(os.path.normpath(m)) or m for m in self.model_name_or_path]


# ---------------------------------------------------------------------------------------------------------------------
def _cache(args: EvalVisionArguments):
    from .features import FeatureCache

    return FeatureCache(None if args.no_cache else (args.cache_dir or default_cache_dir()))


def _backbone(args: EvalVisionArguments, name: str):
    from .features import VisionBackbone

    return VisionBackbone.from_pretrained(name, args.source, args.vision_feature_layer, args.device, args.dtype)


def _random_subset(split, n: int | None, seed: int):
    if n is None or n >= len(split):
        return split
    return split.subset(np.sort(np.random.default_rng(seed).choice(len(split), n, replace=False)))


def run(args: EvalVisionArguments, backbones: list | None = None) -> dict:
    """Run `args.task` for every model; write and return the report paths. `backbones` (tests) skips loading."""
    fn = {
        "linear_probe": _run_classification,
        "prototype": _run_classification,
        "segmentation": _run_segmentation,
        "alignment": _run_alignment,
        "gradcam": _run_gradcam,
    }[args.task]
    return fn(args, backbones)


def _settings(args: EvalVisionArguments, keys: list[str]) -> dict:
    d = asdict(args)
    return {k: d[k] for k in keys}


def _run_classification(args: EvalVisionArguments, backbones=None) -> dict:
    from .data import load_classification_dataset
    from .features import CACHE_STATS, extract_features
    from .linear_probe import check_classification_data, linear_probe, prototype_classifier, stratified_split
    from .protocol import classification_protocol
    from .reporting import write_results

    splits = load_classification_dataset(
        args.dataset_name, args.train_split, args.test_split, args.image_column, args.label_column,
        args.dataset_config, args.dataset_revision,
    )  # fmt: skip
    train = _random_subset(splits["train"], args.max_train_samples, args.subset_seed)
    if "test" in splits:
        test = _random_subset(splits["test"], args.max_test_samples, args.subset_seed)
    else:  # no test split: a fixed stratified share of train
        tr, te = stratified_split(train.labels, args.test_fraction, args.subset_seed)
        train, test = train.subset(tr), train.subset(te)
    check_classification_data(  # before any image is encoded
        args.task, train.labels, test.labels, train.class_names, args.val_fraction, tuple(args.seeds)
    )
    cache = _cache(args)
    runs = []
    for i, (name, label) in enumerate(zip(args.model_name_or_path, args.labels())):
        bb = backbones[i] if backbones else _backbone(args, name)
        feats = {}
        for split_name, split in (("train", train), ("test", test)):
            feats[split_name] = extract_features(
                bb, split.image, len(split), split.fingerprint, args.pooling, args.batch_size, cache,
                store_dtype=args.cache_dtype, num_workers=args.dataloader_num_workers, desc=f"{label} {split_name}",
            )  # fmt: skip
        per_seed = []
        for seed in args.seeds:
            if args.task == "linear_probe":
                r = linear_probe(
                    feats["train"], train.labels, feats["test"], test.labels, args.val_fraction, seed, args.max_iter,
                    args.steps_per_decade, tie_break=args.c_tie_break,
                )  # fmt: skip
            else:
                r = prototype_classifier(
                    feats["train"], train.labels, feats["test"], test.labels, args.prototype_normalize
                )
            per_seed.append({"seed": seed, **r})
        top1 = np.array([r["top1"] for r in per_seed])
        metrics = {"top1": float(top1.mean()), "top1_std": float(top1.std(ddof=1)) if len(top1) > 1 else 0.0}
        if args.task == "linear_probe":
            metrics["best_C"] = per_seed[0]["best_C"]
        runs.append(
            {
                "label": label,
                "model": bb.identity(),
                "metrics": metrics,
                "details": {"per_seed": per_seed, "feature_dim": int(feats["train"].shape[-1])},
                "images_encoded": bb.num_images_encoded,
            }
        )
    data = {
        "dataset_name": args.dataset_name,
        "train": {"fingerprint": train.fingerprint, "size": len(train)},
        "test": {"fingerprint": test.fingerprint, "size": len(test)},
        "num_classes": len(train.class_names),
    }
    keys = ["source", "vision_feature_layer", "pooling", "max_train_samples", "max_test_samples", "subset_seed"]
    keys += (
        ["val_fraction", "max_iter", "steps_per_decade", "c_tie_break"]
        if args.task == "linear_probe"
        else ["prototype_normalize"]
    )
    settings = _settings(args, keys)
    settings["classifier"] = (
        "sklearn LogisticRegression(L2, lbfgs); C swept coarse 1e-6..1e6 then binary to 1/8 decade; refit train+val"
        if args.task == "linear_probe"
        else "prototype: linear layer with the "
        + (
            "L2-normalised class means of L2-normalised features (cosine)"
            if args.prototype_normalize
            else "raw class means"
        )
    )
    settings["pooling_used"] = "mean over patch tokens (prefix tokens dropped)"
    out = write_results(
        args.output_dir, args.task, runs, "top1", settings, args.seeds, data, protocol=classification_protocol(args)
    )
    out["cache"] = {"hits": cache.hits, "misses": cache.misses, "process_hits": CACHE_STATS["hits"]}
    return out


def _run_segmentation(args: EvalVisionArguments, backbones=None) -> dict:
    import torch

    from .data import load_ade20k
    from .features import FeatureCache, extract_features
    from .protocol import segmentation_protocol
    from .reporting import write_results
    from .segmentation import (
        SegProbeConfig,
        check_seg_train_size,
        preprocess_image,
        segmentation_labels,
        summarize_seeds,
        train_segmentation_probe,
    )

    splits = load_ade20k(args.dataset_name)
    train = splits["train"].subset(args.max_train_samples, args.subset_seed)
    test = splits["test"].subset(args.max_test_samples, args.subset_seed)
    cfg = SegProbeConfig(
        num_classes=args.num_classes, hidden=args.head_hidden, lr=args.learning_rate, weight_decay=args.weight_decay,
        batch_size=args.seg_batch_size, epochs=args.num_train_epochs, warmup_steps=args.seg_warmup_steps,
        min_lr=args.seg_min_learning_rate, warmup_ratio=args.warmup_ratio, drop_last=args.seg_drop_last,
        autocast=args.seg_autocast, threshold=args.threshold,
    )  # fmt: skip
    check_seg_train_size(len(train), cfg)  # before any image is encoded
    cache = _cache(args)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    runs = []
    for i, (name, label) in enumerate(zip(args.model_name_or_path, args.labels())):
        bb = backbones[i] if backbones else _backbone(args, name)
        size = (args.image_size, args.image_size) if args.image_size else bb.input_size()
        patch = bb.patch_size()

        def prep(images, _size=size, _bb=bb):
            x = np.stack([preprocess_image(im, _size, _bb.image_processor) for im in images])
            return {"pixel_values": torch.from_numpy(x)}

        feats, labels = {}, {}
        # Labels first: a mask with class ids outside --num_classes stops the run before any image is encoded.
        for split_name, split in (("train", train), ("test", test)):
            lkey = FeatureCache.make_key(
                kind="seg-labels", data=split.fingerprint, size=size, patch=patch, c=cfg.num_classes
            )
            hit = cache.load(lkey)
            if hit is None:
                w = cache.writer(lkey, {"kind": "segmentation labels"})
                try:
                    lab = segmentation_labels(split, size, patch, cfg.num_classes, desc=f"masks {split_name}")
                except BaseException:
                    w.abort()
                    raise
                w.array("labels", lab.shape, lab.dtype)[:] = lab
                hit = w.commit()
            labels[split_name] = hit["labels"]
        for split_name, split in (("train", train), ("test", test)):
            feats[split_name] = extract_features(
                bb, lambda j, s=split: s[j][0], len(split), split.fingerprint, "none", args.batch_size, cache,
                preprocess=prep, store_dtype=args.cache_dtype, num_workers=args.dataloader_num_workers,
                extra_key={"crop": "center-square", "size": size, "resample": "bilinear"},
                desc=f"{label} {split_name}",
            )  # fmt: skip
            if labels[split_name].shape[1] != feats[split_name].shape[1]:
                raise ValueError(
                    f"{feats[split_name].shape[1]} visual tokens but a {labels[split_name].shape[1]}-patch label grid "
                    f"(size {size}, patch {patch}); segmentation needs one token per patch."
                )
        seed_runs = [
            train_segmentation_probe(feats["train"], labels["train"], feats["test"], labels["test"], cfg, s, device)
            for s in args.seeds
        ]
        summ = summarize_seeds(seed_runs)
        runs.append(
            {
                "label": label,
                "model": bb.identity(),
                "metrics": {
                    "macro_recall_mean": summ["macro_recall_mean"],
                    "macro_recall_std": summ["macro_recall_std"],
                },
                "details": summ,
                "images_encoded": bb.num_images_encoded,
            }
        )
    data = {
        "dataset_name": args.dataset_name,
        "train": {"fingerprint": train.fingerprint, "size": len(train)},
        "validation": {"fingerprint": test.fingerprint, "size": len(test)},
    }
    settings = _settings(
        args, ["source", "vision_feature_layer", "num_classes", "head_hidden", "learning_rate", "weight_decay",
               "seg_batch_size", "num_train_epochs", "seg_warmup_steps", "seg_min_learning_rate", "warmup_ratio",
               "seg_drop_last", "seg_autocast", "threshold", "image_size", "max_train_samples", "max_test_samples"],
    )  # fmt: skip
    settings["labels"] = "multi-hot union per patch; class 0 cleared where another class is present"
    settings["selection"] = "best epoch by validation macro recall (classes with >= 1 positive patch)"
    return write_results(
        args.output_dir, args.task, runs, "macro_recall_mean", settings, args.seeds, data,
        protocol=segmentation_protocol(args, cfg, device, [r["model"]["feature_layer"] for r in runs]),
    )  # fmt: skip


def _text_model(args: EvalVisionArguments, bb):
    import torch
    from transformers import AutoModel, AutoTokenizer

    if args.text_model_name_or_path:
        model = AutoModel.from_pretrained(args.text_model_name_or_path, use_kernels=False)
        tok = AutoTokenizer.from_pretrained(args.text_model_name_or_path)
        name = args.text_model_name_or_path
    elif bb.is_mllm:
        inner = getattr(bb.model, "model", bb.model)
        model, tok, name = inner.language_model, AutoTokenizer.from_pretrained(bb.name), f"{bb.name}:language_model"
    else:
        raise ValueError("alignment needs --text_model_name_or_path (a reference LLM) for an encoder-only model")
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    return model.eval().to(device), tok, name, device


def _run_alignment(args: EvalVisionArguments, backbones=None) -> dict:
    from .alignment import alignment_over_seeds, check_alignment_seeds, language_features
    from .data import load_caption_pairs
    from .features import extract_features, model_prefix_tokens, resolve_pooling
    from .protocol import alignment_protocol
    from .reporting import write_results

    pairs = load_caption_pairs(
        args.dataset_name, args.test_split, args.image_column, args.text_column, args.dataset_config,
        args.dataset_revision,
    )  # fmt: skip
    # Everything a run can be refused for is checked before any model runs.
    empty = [i for i, c in enumerate(pairs.captions) if not isinstance(c, str) or not c.strip()]
    if empty:  # an empty caption has no token to average: its feature would be a zero vector with arbitrary neighbours
        raise ValueError(
            f"{len(empty)} of {len(pairs)} captions in {args.dataset_name} are empty or not text (rows {empty[:10]}"
            f"{' ...' if len(empty) > 10 else ''}): give every image a caption or remove those pairs."
        )
    check_alignment_seeds(args.seeds, args.alignment_max_samples, len(pairs))
    n_pairs = min(len(pairs), args.alignment_max_samples or len(pairs))
    if args.knn_k >= n_pairs:
        raise ValueError(
            f"--knn_k {args.knn_k} needs more than {args.knn_k} pairs per seed, but each seed scores {n_pairs} "
            f"(of {len(pairs)} in {args.dataset_name}): lower --knn_k or use more pairs."
        )
    for i, name in enumerate(args.model_name_or_path):  # a family without CLS refuses cls pooling up front
        prefix = backbones[i].num_prefix_tokens() if backbones else model_prefix_tokens(name)
        try:
            resolve_pooling(prefix, args.alignment_pooling)
        except ValueError as e:
            raise ValueError(f"{name}: {e}") from None
    cache = _cache(args)
    runs, text_cache, pooled_with, text_dtypes = [], {}, [], []
    for i, (name, label) in enumerate(zip(args.model_name_or_path, args.labels())):
        bb = backbones[i] if backbones else _backbone(args, name)
        pooling = resolve_pooling(bb.num_prefix_tokens(), args.alignment_pooling)
        pooled_with.append(pooling)
        vis = extract_features(
            bb, pairs.image, len(pairs), pairs.fingerprint, pooling, args.batch_size, cache, all_layers=True,
            store_dtype=args.cache_dtype, num_workers=args.dataloader_num_workers, desc=f"{label} layers",
        )  # fmt: skip
        # The reference's vision layers are the block outputs; hidden state 0 (the embeddings) is not one of them
        # (and its CLS token is the same learned vector for every image).
        vis = np.asarray(vis if args.alignment_include_embeddings else vis[1:])
        model, tok, tname, device = _text_model(args, bb)
        if tname not in text_cache:  # one reference LLM serves every compared encoder
            text_cache[tname] = language_features(
                model, tok, pairs.captions, args.batch_size, device, args.caption_max_length
            )
        text_dtypes.append(str(next(model.parameters()).dtype).replace("torch.", ""))
        res = alignment_over_seeds(
            vis, text_cache[tname], args.knn_k, tuple(args.seeds), args.alignment_max_samples, args.clamp_quantile,
            args.clamp_method,
        )  # fmt: skip
        best = max(res["per_seed"], key=lambda r: r["alignment"])
        runs.append(
            {
                "label": label,
                "model": bb.identity(),
                "metrics": {
                    "alignment_mean": res["alignment_mean"],
                    "alignment_std": res["alignment_std"],
                    "best_vision_layer": best["best_vision_layer"],
                    "best_text_layer": best["best_text_layer"],
                },
                "details": {
                    **res,
                    "text_model": tname,
                    "vision_layers": int(vis.shape[0]),
                    "vision_pooling": pooling,
                    "vision_layer_index": "hidden-state index" if args.alignment_include_embeddings else "block index",
                },
                "images_encoded": bb.num_images_encoded,
            }
        )
    data = {"dataset_name": args.dataset_name, "fingerprint": pairs.fingerprint, "size": len(pairs)}
    settings = _settings(
        args, ["text_model_name_or_path", "knn_k", "clamp_quantile", "clamp_method", "alignment_max_samples",
               "caption_max_length", "alignment_pooling", "alignment_include_embeddings"],
    )  # fmt: skip
    settings["features"] = (
        "vision: per block output, the CLS token (families with one) or the mean over patch tokens; "
        "language: mean over caption tokens of every hidden state"
    )
    text_dtype = text_dtypes[0] if len(set(text_dtypes)) == 1 else ", ".join(text_dtypes)
    return write_results(
        args.output_dir, args.task, runs, "alignment_mean", settings, args.seeds, data,
        protocol=alignment_protocol(args, pooled_with, text_dtype),
    )  # fmt: skip


def map_concentration(tokens: np.ndarray, top_fraction: float = 0.1) -> float:
    """Share of the total gradient mass in the top `top_fraction` of tokens (1 = all in few tokens)."""
    t = np.sort(np.abs(np.asarray(tokens, dtype=np.float64)).ravel())[::-1]
    total = t.sum()
    return float(t[: max(1, int(round(top_fraction * t.size)))].sum() / total) if total > 0 else 0.0


def _run_gradcam(args: EvalVisionArguments, models=None) -> dict:
    import torch
    from PIL import Image
    from transformers import AutoModelForImageTextToText, AutoProcessor

    import pivot_hf  # noqa: F401  (registers the Pivot Auto classes)

    from .data import load_preference_pairs
    from .gradmaps import build_pair_inputs, gradient_maps, reference_logps, save_maps, to_device
    from .reporting import write_results

    if args.image:
        rows = [{"image": args.image, "question": args.question, "chosen": args.chosen, "rejected": args.rejected}]
    else:
        rows = load_preference_pairs(args.dataset_name, args.image_root, args.max_samples)
    if not rows:
        raise ValueError("gradcam: no single-image sample found")
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = getattr(torch, args.dtype)
    ref = None
    if args.ref_model_name_or_path:
        ref = (
            AutoModelForImageTextToText.from_pretrained(args.ref_model_name_or_path, dtype=dtype, use_kernels=False)
            .to(device)
            .eval()
        )
    runs = []
    for i, (name, label) in enumerate(zip(args.model_name_or_path, args.labels())):
        if models:
            model, processor = models[i]
        else:
            model = AutoModelForImageTextToText.from_pretrained(name, dtype=dtype, use_kernels=False).to(device)
            processor = AutoProcessor.from_pretrained(name)
        model.requires_grad_(False)  # gradients are taken w.r.t. the visual tokens only
        out_dir = os.path.join(args.output_dir, "gradmaps", label)
        per_sample = []
        for j, row in enumerate(rows):
            image = Image.open(row["image"]).convert("RGB")
            c, r = build_pair_inputs(processor, image, row["question"], row["chosen"], row["rejected"])
            c, r = to_device(c, device, dtype), to_device(r, device, dtype)
            ref_lp = reference_logps(ref if ref is not None else model, c, r)
            maps = gradient_maps(
                model, c, r, ref_logps=ref_lp, beta=args.beta, at=args.gradcam_at, method=args.gradcam_method,
                fix_border=args.fix_border,
            )  # fmt: skip
            paths = save_maps(out_dir, f"sample-{j}", image, maps, title=row["question"])
            per_sample.append(
                {
                    "image": row["image"],
                    "question": row["question"],
                    "sft_loss": maps["sft_loss"],
                    "dpo_loss": maps["dpo_loss"],
                    "sft_top10_mass": map_concentration(maps["sft_tokens"]),
                    "dpo_top10_mass": map_concentration(maps["dpo_tokens"]),
                    "sft_dpo_correlation": float(np.corrcoef(maps["sft_tokens"], maps["dpo_tokens"])[0, 1]),
                    "png": os.path.relpath(paths["png"], args.output_dir),
                }
            )
        keys = ("sft_top10_mass", "dpo_top10_mass", "sft_dpo_correlation", "sft_loss", "dpo_loss")
        metrics = {k: float(np.mean([s[k] for s in per_sample])) for k in keys}
        runs.append({"label": label, "model": {"name": name}, "metrics": metrics, "details": {"samples": per_sample}})
    settings = _settings(
        args, ["ref_model_name_or_path", "beta", "gradcam_at", "gradcam_method", "fix_border", "dtype"]
    )
    settings["reduction"] = "per visual token: L1 over channels, patch grid, divided by its max"
    data = {"dataset_name": args.dataset_name or args.image, "num_samples": len(rows)}
    return write_results(args.output_dir, args.task, runs, "dpo_top10_mass", settings, args.seeds, data)
