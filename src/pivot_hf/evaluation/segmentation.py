"""Patch-level segmentation probe (ADE20K; the protocol of Covert et al. 2025 that the paper's Fig. 8 follows).

- Images: largest centre square crop, resized to the encoder input (bilinear; masks nearest), normalised as the encoder
  expects. The patch grid is floor(size / patch); the remainder is cropped (27x27 for patch 14 at 384 px).
- Labels: per patch, multi-hot "class present anywhere in the patch" (union); class 0 (unlabeled) cleared wherever the
  patch holds another class.
- Head on frozen patch features: Linear(D, 1024) -> GELU -> Linear(1024, C); BCE-with-logits over patches x classes;
  AdamW (lr 1e-3, wd 0.01), batch 32 images, 5 epochs. The schedule and loop follow the reference code (patch-seg's
  `scripts/train.py` defaults, which the paper follows): timm's `CosineLRScheduler` stepped per update with 500 warmup
  steps from 0 and `lr_min` 1e-4, the cosine measured from step 0 (no warmup prefix), i.e. the update with 0-based
  index t uses lr(t) = lr * t / 500 for t < 500, else 1e-4 + (lr - 1e-4) * (1 + cos(pi * t / T)) / 2 with T = epochs
  * (N // batch); the last partial batch is dropped; bf16 autocast on CUDA (float32 on CPU, where bf16 is slow).
- Metric: sigmoid > 0.5; per class TP/FN over all validation patches; macro recall over classes with >= 1 positive
  patch; best epoch by validation macro recall; mean and std over seeds.
"""

from __future__ import annotations

import contextlib
import logging
import math
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image
from torch import nn
from tqdm.auto import tqdm


logger = logging.getLogger(__name__)

ADE20K_NUM_CLASSES = 151  # 150 classes + 0 = unlabeled


def center_square_crop(image: Image.Image) -> Image.Image:
    w, h = image.size
    s = min(w, h)
    left, top = (w - s) // 2, (h - s) // 2
    return image.crop((left, top, left + s, top + s))


def preprocess_image(image: Image.Image, size: tuple[int, int], image_processor) -> np.ndarray:
    """Centre square crop, bilinear resize to `size` (H, W), rescale and normalise with the processor's statistics."""
    img = center_square_crop(image.convert("RGB")).resize((size[1], size[0]), Image.BILINEAR)
    x = np.asarray(img, dtype=np.float32) * float(getattr(image_processor, "rescale_factor", 1 / 255))
    mean = np.asarray(getattr(image_processor, "image_mean", None) or (0.5, 0.5, 0.5), dtype=np.float32)
    std = np.asarray(getattr(image_processor, "image_std", None) or (0.5, 0.5, 0.5), dtype=np.float32)
    if getattr(image_processor, "do_normalize", True):
        x = (x - mean) / std
    return x.transpose(2, 0, 1)


def preprocess_mask(mask: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Same centre square crop as the image, then nearest-neighbour resize (class ids must not be interpolated)."""
    h, w = mask.shape
    s = min(h, w)
    top, left = (h - s) // 2, (w - s) // 2
    sq = mask[top : top + s, left : left + s]
    img = Image.fromarray(sq.astype(np.int32)).resize((size[1], size[0]), Image.NEAREST)
    return np.asarray(img, dtype=np.int64)


def patch_multihot(mask: np.ndarray, patch: int, num_classes: int = ADE20K_NUM_CLASSES) -> np.ndarray:
    """(H, W) integer mask -> (gh * gw, C) bool: class c present anywhere in the patch; class 0 cleared where any other
    class is present. Pixels with ids >= num_classes are ignored. Rows are in raster order over the grid."""
    gh, gw = mask.shape[0] // patch, mask.shape[1] // patch
    m = mask[: gh * patch, : gw * patch].reshape(gh, patch, gw, patch).transpose(0, 2, 1, 3).reshape(gh * gw, -1)
    out = np.zeros((gh * gw, num_classes), dtype=bool)
    rows = np.repeat(np.arange(gh * gw), m.shape[1])
    vals = m.reshape(-1)
    keep = (vals >= 0) & (vals < num_classes)
    out[rows[keep], vals[keep]] = True
    out[out[:, 1:].any(axis=1), 0] = False
    return out


class RecallAccumulator:
    """Per-class TP and FN summed over every patch seen; macro recall over classes with at least one positive."""

    def __init__(self, num_classes: int):
        self.tp = np.zeros(num_classes, dtype=np.int64)
        self.fn = np.zeros(num_classes, dtype=np.int64)

    def update(self, pred: np.ndarray, target: np.ndarray) -> None:
        pred, target = (
            np.asarray(pred, bool).reshape(-1, self.tp.size),
            np.asarray(target, bool).reshape(-1, self.tp.size),
        )
        self.tp += (pred & target).sum(axis=0)
        self.fn += (~pred & target).sum(axis=0)

    def per_class_recall(self) -> np.ndarray:
        pos = self.tp + self.fn
        return np.where(pos > 0, self.tp / np.maximum(pos, 1), np.nan)

    def macro_recall(self) -> float:
        r = self.per_class_recall()
        return float(np.nanmean(r)) if np.any(~np.isnan(r)) else float("nan")


def build_head(dim: int, num_classes: int, hidden: int = 1024) -> nn.Module:
    return nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, num_classes))


AUTOCAST_CHOICES = ("auto", "bfloat16", "none")


@dataclass
class SegProbeConfig:
    num_classes: int = ADE20K_NUM_CLASSES
    hidden: int = 1024
    lr: float = 1e-3
    weight_decay: float = 0.01
    batch_size: int = 32  # images per step (all their patches)
    epochs: int = 5
    warmup_steps: int = 500
    min_lr: float = 1e-4
    warmup_ratio: float | None = None  # when set, warmup = round(ratio * total steps) instead of warmup_steps
    drop_last: bool = True
    autocast: str = "auto"  # auto: bf16 on CUDA, none elsewhere
    threshold: float = 0.5

    def steps_per_epoch(self, num_train: int) -> int:
        return num_train // self.batch_size if self.drop_last else -(-num_train // self.batch_size)

    def warmup(self, total_steps: int) -> int:
        return int(round(self.warmup_ratio * total_steps)) if self.warmup_ratio is not None else self.warmup_steps

    def autocast_dtype(self, device: str) -> torch.dtype | None:
        if self.autocast not in AUTOCAST_CHOICES:
            raise ValueError(f"autocast must be one of {AUTOCAST_CHOICES}, got {self.autocast!r}")
        on_cuda = str(device).startswith("cuda")
        if self.autocast == "bfloat16" or (self.autocast == "auto" and on_cuda):
            return torch.bfloat16
        return None


def seg_lr(step: int, base_lr: float, min_lr: float, warmup_steps: int, total_steps: int) -> float:
    """Learning rate of the update with 0-based index `step` under the reference schedule (timm `CosineLRScheduler`,
    per-update, `warmup_lr_init=0`, no warmup prefix, one cycle): linear warmup from 0, then a cosine from `base_lr`
    to `min_lr` whose phase counts from step 0, and `min_lr` from `total_steps` on."""
    if step < warmup_steps:
        return base_lr * step / warmup_steps
    if step >= total_steps:
        return min_lr
    return min_lr + 0.5 * (base_lr - min_lr) * (1.0 + math.cos(math.pi * step / total_steps))


def check_seg_train_size(num_train: int, cfg: SegProbeConfig) -> None:
    if cfg.steps_per_epoch(num_train) < 1:
        raise ValueError(
            f"segmentation: {num_train} training images and seg_batch_size {cfg.batch_size} with drop_last leave no "
            "full batch; lower --seg_batch_size or pass --seg_drop_last false."
        )


def _unpack(labels_packed: np.ndarray, idx: np.ndarray, num_classes: int) -> torch.Tensor:
    bits = np.unpackbits(np.asarray(labels_packed[idx]), axis=-1, count=num_classes)
    return torch.from_numpy(bits.astype(np.float32))


def _autocast(device: str, dtype: torch.dtype | None):
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=torch.device(device).type, dtype=dtype)


@torch.no_grad()
def evaluate_head(head, feats, labels_packed, cfg: SegProbeConfig, device="cpu") -> RecallAccumulator:
    acc = RecallAccumulator(cfg.num_classes)
    head.eval()
    amp = cfg.autocast_dtype(device)
    for s in range(0, len(feats), cfg.batch_size):
        idx = np.arange(s, min(s + cfg.batch_size, len(feats)))
        x = torch.from_numpy(np.asarray(feats[idx], dtype=np.float32)).to(device)
        with _autocast(device, amp):
            prob = torch.sigmoid(head(x).float())
        acc.update((prob > cfg.threshold).cpu().numpy(), _unpack(labels_packed, idx, cfg.num_classes).numpy() > 0)
    return acc


def train_segmentation_probe(
    train_feats: np.ndarray,
    train_labels_packed: np.ndarray,
    val_feats: np.ndarray,
    val_labels_packed: np.ndarray,
    cfg: SegProbeConfig,
    seed: int = 0,
    device: str = "cpu",
    record_lr: bool = False,
) -> dict:
    """One seed (head initialisation and batch order). Features (N, P, D); labels packed with
    `np.packbits(..., axis=-1)` to (N, P, ceil(C/8)). With `record_lr`, the result holds the learning rate each update
    ran with (`lr_per_step`)."""
    check_seg_train_size(len(train_feats), cfg)
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    head = build_head(train_feats.shape[-1], cfg.num_classes, cfg.hidden).to(device)
    opt = torch.optim.AdamW(head.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    steps_per_epoch = cfg.steps_per_epoch(len(train_feats))
    total = steps_per_epoch * cfg.epochs
    warmup = cfg.warmup(total)
    amp = cfg.autocast_dtype(device)
    loss_fn = nn.BCEWithLogitsLoss()
    history, best, lrs, step = [], None, [], 0
    for epoch in range(cfg.epochs):
        head.train()
        order = rng.permutation(len(train_feats))
        losses = []
        for b in tqdm(range(steps_per_epoch), desc=f"seg seed {seed} epoch {epoch}", leave=False):
            # sorted: sequential reads from the memory-mapped cache (the batch's order does not change its loss)
            idx = np.sort(order[b * cfg.batch_size : (b + 1) * cfg.batch_size])
            x = torch.from_numpy(np.asarray(train_feats[idx], dtype=np.float32)).to(device)
            y = _unpack(train_labels_packed, idx, cfg.num_classes).to(device)
            lr = seg_lr(step, cfg.lr, cfg.min_lr, warmup, total)
            for group in opt.param_groups:
                group["lr"] = lr
            with _autocast(device, amp):
                loss = loss_fn(head(x).float(), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if record_lr:
                lrs.append(opt.param_groups[0]["lr"])
            losses.append(loss.item())
            step += 1
        acc = evaluate_head(head, val_feats, val_labels_packed, cfg, device)
        rec = acc.macro_recall()
        history.append({"epoch": epoch + 1, "train_loss": float(np.mean(losses)), "val_macro_recall": rec})
        logger.info("seg probe seed %d epoch %d loss %.4f macro recall %.4f", seed, epoch + 1, np.mean(losses), rec)
        if best is None or rec > best["val_macro_recall"]:
            best = {"epoch": epoch + 1, "val_macro_recall": rec, "per_class_recall": acc.per_class_recall()}
    out = {
        "seed": seed,
        "macro_recall": best["val_macro_recall"],
        "best_epoch": best["epoch"],
        "num_classes_with_positives": int(np.sum(~np.isnan(best["per_class_recall"]))),
        "num_steps": total,
        "warmup_steps": warmup,
        "autocast": str(amp).replace("torch.", "") if amp is not None else "none",
        "history": history,
    }
    if record_lr:
        out["lr_per_step"] = lrs
    return out


def segmentation_labels(
    dataset, size: tuple[int, int], patch: int, num_classes: int, desc: str = "masks"
) -> np.ndarray:
    """Packed multi-hot patch labels (N, P, ceil(C/8)) for every (image, mask) of an ADE20K-style split."""
    out = None
    for i in tqdm(range(len(dataset)), desc=desc):
        _, mask = dataset[i]
        if mask.size and (mask.max() >= num_classes or mask.min() < 0):
            # out-of-range ids would be dropped from the labels without a word (ADE20K: 0..150 for 151 outputs)
            where = getattr(dataset, "mask_paths", None)
            raise ValueError(
                f"mask {where[i] if where else i} holds class ids {int(mask.min())}..{int(mask.max())}, outside "
                f"0..{num_classes - 1} (--num_classes {num_classes}): raise --num_classes or remap the mask."
            )
        lab = patch_multihot(preprocess_mask(mask, size), patch, num_classes)
        packed = np.packbits(lab, axis=-1)
        if out is None:
            out = np.zeros((len(dataset), *packed.shape), dtype=np.uint8)
        out[i] = packed
    return out


def summarize_seeds(runs: list[dict]) -> dict:
    vals = np.array([r["macro_recall"] for r in runs], dtype=np.float64)
    return {
        "macro_recall_mean": float(vals.mean()),
        "macro_recall_std": float(vals.std(ddof=1)) if len(vals) > 1 else 0.0,
        "seeds": [r["seed"] for r in runs],
        "per_seed": runs,
    }
