"""The protocol knobs of each vision-only evaluation next to the reference code's value, for results.json.

Every results.json carries `protocol`: the reference implementation the task follows, each knob as
`{"value": ours, "reference": theirs, "source": where the reference value comes from}`, and `differs_from_reference`,
the knobs whose value is not the reference's, so a reported number is never ambiguous about how it was computed.
"""

from __future__ import annotations


PLATONIC = "platonic-rep (Huh et al. 2024), extract_features.py + measure_alignment.py as its README runs them"
CLIP_LP = "CLIP linear-probe recipe (Radford et al. 2021, App. A.3) as ported by CLIP_benchmark"
PATCH_SEG = "patch-seg (Covert et al. 2025), scripts/train.py defaults with --output-head mlp --dataset ade20k"
PAPER = "PIVOT paper, App. E.3 (ImageNet classification)"


def _knob(value, reference, source: str) -> dict:
    return {"value": value, "reference": reference, "source": source}


def protocol_record(reference: str, knobs: dict[str, dict]) -> dict:
    """`{"reference", "knobs", "differs_from_reference"}`; a knob differs when its value is not the reference's."""
    differs = [k for k, v in knobs.items() if v["reference"] is not None and v["value"] != v["reference"]]
    return {"reference": reference, "knobs": knobs, "differs_from_reference": differs}


def alignment_protocol(args, pooling_used: list[str], text_dtype: str) -> dict:
    pooling = pooling_used[0] if len(set(pooling_used)) == 1 else "per model: " + ", ".join(pooling_used)
    knobs = {
        "clamp_scope": _knob("whole (samples, layers, dim) stack", "whole (samples, layers, dim) stack",
                             "metrics.remove_outliers on each model's stacked feature file"),
        "clamp_method": _knob(args.clamp_method, "mean_per_sample",
                              "measure_alignment.py without --precise: exact=False"),
        "clamp_quantile": _knob(args.clamp_quantile, 0.95, "measure_alignment.prepare_features q=0.95"),
        "knn_k": _knob(args.knn_k, 10, "--topk 10"),
        "vision_pooling": _knob(pooling, "cls", "extract_features.py --pool cls: token 0 of every block output"),
        "vision_layers": _knob(
            "all hidden states (embeddings included)" if args.alignment_include_embeddings else "block outputs",
            "block outputs", "timm return_nodes blocks.{i}.add_1",
        ),
        "text_pooling": _knob("mean over tokens, every hidden state incl. embeddings",
                              "mean over tokens, every hidden state incl. embeddings", "extract_features.py --pool avg"),
        "caption_max_length": _knob(args.caption_max_length, None, "tokenizer(texts, padding='longest'), no truncation"),
        "text_model_dtype": _knob(text_dtype, "bfloat16", "models.load_llm: bfloat16 on a bf16-capable GPU"),
        "pairs_per_seed": _knob(args.alignment_max_samples or "all", "all", "all 1024 WIT pairs (minhuh/prh wit_1024)"),
        "seeds_vary": _knob(
            "the pairs drawn per seed" if args.alignment_max_samples else "nothing (one seed; seeds = trained encoders)",
            None, "the paper's 3 seeds are trained encoders",
        ),
    }  # fmt: skip
    return protocol_record(PLATONIC, knobs)


def classification_protocol(args) -> dict:
    if args.task == "prototype":
        knobs = {
            "prototype_weights": _knob(
                "cosine: L2-normalised class means of L2-normalised features" if args.prototype_normalize
                else "raw per-class mean features", "raw per-class mean features", PAPER,
            ),
            "pooling": _knob(args.pooling, "mean", PAPER),
            "seeds_vary": _knob("nothing (deterministic; seeds = trained encoders)", None, PAPER),
        }  # fmt: skip
        return protocol_record(PAPER, knobs)
    knobs = {
        "classifier": _knob("sklearn LogisticRegression (L2, lbfgs)", "sklearn LogisticRegression (L2, lbfgs)", PAPER),
        "max_iter": _knob(args.max_iter, 1000, PAPER),
        "c_grid": _knob("coarse C 1e-6..1e6 every 2 decades, then binary halving",
                        "coarse C 1e-6..1e6 every 2 decades, then binary halving", CLIP_LP),
        "steps_per_decade": _knob(args.steps_per_decade, 8, CLIP_LP),
        "c_tie_break": _knob(args.c_tie_break, "larger",
                             "CLIP_benchmark find_peak: ascending lambda, strictly better replaces the best"),
        "refit": _knob("train + validation", "train + validation", CLIP_LP),
        "val_fraction": _knob(args.val_fraction, None, "a validation split held out of train (share not fixed)"),
        "pooling": _knob(args.pooling, "mean", PAPER),
        "seeds_vary": _knob("the validation split held out of train", None, "lbfgs itself is deterministic"),
    }  # fmt: skip
    return protocol_record(CLIP_LP, knobs)


def _seg_features(feature_layers: list, source: str) -> str:
    if source == "projector":
        return "projector output (LLM visual tokens)"
    layers = sorted({str(x) for x in feature_layers})
    return f"hidden_states[{', '.join(layers)}] (the checkpoint's feature layer), no final norm"


def segmentation_protocol(args, cfg, device: str, feature_layers: list | None = None) -> dict:
    """`feature_layers`: the hidden-state index each compared model was read at (`VisionBackbone.feature_layer`)."""
    amp = cfg.autocast_dtype(device)
    layers = feature_layers if feature_layers is not None else [args.vision_feature_layer]
    knobs = {
        # patch-seg reads timm `forward_features`: the last block's tokens after the final LayerNorm. We read the
        # layer the MLLM was trained on, which differs, so every run says so.
        "features": _knob(_seg_features(layers, args.source), "last block output after the final LayerNorm",
                          "patchseg.vision_backbones.modify_backbone: timm forward_features, prefix tokens dropped"),
        "learning_rate": _knob(args.learning_rate, 1e-3, "--lr 1e-3"),
        "min_learning_rate": _knob(cfg.min_lr, 1e-4, "--min-lr 1e-4"),
        "warmup": _knob(f"{cfg.warmup_ratio} x steps" if cfg.warmup_ratio is not None else f"{cfg.warmup_steps} steps",
                        "500 steps", "--warmup-steps 500 (timm CosineLRScheduler, warmup_lr_init 0)"),
        "schedule": _knob("cosine per update, phase from step 0, lr_min floor",
                          "cosine per update, phase from step 0, lr_min floor",
                          "timm CosineLRScheduler(t_in_epochs=False, warmup_prefix=False)"),
        "weight_decay": _knob(args.weight_decay, 0.01, "--weight-decay 0.01"),
        "batch_size": _knob(args.seg_batch_size, 32, "--batch-size 32"),
        "epochs": _knob(args.num_train_epochs, 5, "--num-epochs 5"),
        "drop_last": _knob(cfg.drop_last, True, "train DataLoader(drop_last=True)"),
        "autocast": _knob(str(amp).replace("torch.", "") if amp is not None else "none", "bfloat16",
                          "--dtype bfloat16: torch.autocast(cuda, bf16) around head and loss"),
        "head": _knob(f"Linear(D, {args.head_hidden}) -> GELU -> Linear({args.head_hidden}, C)",
                      "Linear(D, 1024) -> GELU -> Linear(1024, C)", "--output-head mlp --hidden-size 1024"),
        "threshold": _knob(args.threshold, 0.5, "patchseg.loss metrics: sigmoid > 0.5"),
        "selection": _knob("best epoch by validation macro recall", "best epoch by validation macro recall",
                           "scripts/train.py keeps the best macro_recall"),
        "seeds_vary": _knob("head initialisation and batch order", "head initialisation and batch order", "--seed"),
    }  # fmt: skip
    return protocol_record(PATCH_SEG, knobs)
