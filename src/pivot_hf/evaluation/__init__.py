"""Vision-only evaluations of (PIVOT-trained) vision encoders: linear / prototype probes, segmentation probe,
gradient maps of the SFT and DPO losses, and representation alignment. Entry point: `recipes/eval_vision.py`."""

from .alignment import (
    alignment_matrix,
    alignment_over_seeds,
    clamp_threshold,
    language_features,
    mutual_knn,
    preprocess_features,
    preprocess_stack,
)
from .features import (
    CACHE_STATS,
    FeatureCache,
    VisionBackbone,
    encode_images,
    extract_features,
    module_fingerprint,
    resolve_pooling,
)
from .gradmaps import GradientMapCallback, build_pair_inputs, gradient_maps, visual_token_leaf
from .linear_probe import linear_probe, prototype_classifier, stratified_split, sweep_regularization
from .protocol import protocol_record
from .reporting import write_results
from .runner import TASKS, EvalVisionArguments, run
from .segmentation import RecallAccumulator, SegProbeConfig, patch_multihot, seg_lr, train_segmentation_probe


__all__ = [
    "CACHE_STATS",
    "TASKS",
    "EvalVisionArguments",
    "FeatureCache",
    "GradientMapCallback",
    "RecallAccumulator",
    "SegProbeConfig",
    "VisionBackbone",
    "alignment_matrix",
    "alignment_over_seeds",
    "build_pair_inputs",
    "clamp_threshold",
    "encode_images",
    "extract_features",
    "gradient_maps",
    "language_features",
    "linear_probe",
    "module_fingerprint",
    "mutual_knn",
    "patch_multihot",
    "preprocess_features",
    "preprocess_stack",
    "protocol_record",
    "prototype_classifier",
    "resolve_pooling",
    "run",
    "seg_lr",
    "stratified_split",
    "sweep_regularization",
    "train_segmentation_probe",
    "visual_token_leaf",
    "write_results",
]
