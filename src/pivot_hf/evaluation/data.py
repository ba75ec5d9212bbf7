"""Datasets for the vision-only evaluations: classification, ADE20K-style segmentation, image-caption pairs.

Every dataset here exposes `__len__`, `__getitem__` and a `fingerprint` string that changes when the underlying data
changes; the feature cache (`features.py`) keys on that fingerprint, so a stale cache can never be read for new data.

Sources (`dataset_name`):
- an ImageFolder directory: `<root>/<split>/<class>/<image>` (or `<root>/<class>/<image>`, a single "train" split);
- a folder written by `datasets.Dataset.save_to_disk` / `DatasetDict.save_to_disk` (`load_from_disk`);
- a Hub id (`datasets.load_dataset`; kept for online use, not exercised by the offline tests);
- for segmentation, the ADE20K layout `images/{training,validation}/*.jpg` + `annotations/{training,validation}/*.png`;
- for image-caption pairs, a folder with `metadata.jsonl` (`file_name` + `text`; the `datasets` imagefolder way).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image


IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm")
# Split names as they appear in the wild, mapped to the three roles a probe needs.
SPLIT_ALIASES = {
    "train": ("train", "training"),
    "test": ("test", "validation", "val", "valid"),
}
IMAGE_COLUMNS = ("image", "img", "jpg", "png", "pixel_values")
LABEL_COLUMNS = ("label", "labels", "fine_label", "class", "cls")
TEXT_COLUMNS = ("text", "caption", "captions", "sentence", "txt")


def _sha(*parts: object) -> str:
    h = hashlib.sha256()
    for p in parts:
        h.update(json.dumps(p, sort_keys=True, default=str).encode())
    return h.hexdigest()[:16]


def _to_rgb(image) -> Image.Image:
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    if isinstance(image, dict) and ("bytes" in image or "path" in image):  # undecoded `datasets` Image feature
        import io

        data = image.get("bytes")
        return Image.open(io.BytesIO(data) if data is not None else image["path"]).convert("RGB")
    if isinstance(image, str | os.PathLike):
        return Image.open(image).convert("RGB")
    arr = np.asarray(image)
    if arr.ndim == 2:
        arr = np.stack([arr] * 3, axis=-1)
    return Image.fromarray(arr.astype(np.uint8)).convert("RGB")


def _file_listing_fingerprint(paths: Sequence[str], root: str) -> str:
    """Hash of relative paths, sizes and modification times: cheap for ImageNet-sized folders, yet any edit shows."""
    rows = []
    for p in paths:
        st = os.stat(p)
        rows.append((os.path.relpath(p, root), st.st_size, st.st_mtime_ns))
    return _sha(rows)


# ---------------------------------------------------------------------------------------------------------------------
# Classification
# ---------------------------------------------------------------------------------------------------------------------
@dataclass
class ClassificationSplit:
    """A list-like split of (PIL image, int label). `fingerprint` identifies its exact content and order."""

    source: object  # list of paths, or a `datasets.Dataset`
    labels: np.ndarray
    class_names: list[str]
    fingerprint: str
    image_column: str | None = None

    def __len__(self) -> int:
        return len(self.labels)

    def image(self, i: int) -> Image.Image:
        if isinstance(self.source, list):
            return _to_rgb(self.source[i])
        return _to_rgb(self.source[int(i)][self.image_column])

    def __getitem__(self, i: int):
        return self.image(i), int(self.labels[i])

    def subset(self, indices: Sequence[int]) -> ClassificationSplit:
        """Rows `indices` (e.g. the paper's 50K random ImageNet-train subset); the fingerprint covers the indices."""
        idx = np.asarray(indices, dtype=np.int64)
        if isinstance(self.source, list):
            source = [self.source[i] for i in idx]
        else:
            source = self.source.select(idx.tolist())
        return ClassificationSplit(
            source, self.labels[idx], self.class_names, _sha(self.fingerprint, idx.tolist()), self.image_column
        )


def _find_split_dirs(root: str) -> dict[str, str]:
    found = {}
    entries = {e.lower(): e for e in os.listdir(root) if os.path.isdir(os.path.join(root, e))}
    for role, names in SPLIT_ALIASES.items():
        for n in names:
            if n in entries:
                found[role] = os.path.join(root, entries[n])
                break
    return found


def _class_dirs(split_dir: str) -> list[str]:
    # Hidden folders (`.ipynb_checkpoints`, `.git`, ...) are not classes.
    return sorted(
        e for e in os.listdir(split_dir) if not e.startswith(".") and os.path.isdir(os.path.join(split_dir, e))
    )


def _image_folder_split(split_dir: str, class_names: list[str] | None = None) -> ClassificationSplit:
    classes = class_names or _class_dirs(split_dir)
    paths, labels = [], []
    for ci, c in enumerate(classes):
        cdir = os.path.join(split_dir, c)
        if not os.path.isdir(cdir):
            continue
        for dirpath, _, files in sorted(os.walk(cdir)):
            for f in sorted(files):
                if f.lower().endswith(IMAGE_EXTENSIONS):
                    paths.append(os.path.join(dirpath, f))
                    labels.append(ci)
    if not paths:
        raise ValueError(f"No images found under {split_dir} (expected <class>/<image> sub-folders).")
    fp = _sha("imagefolder", classes, _file_listing_fingerprint(paths, split_dir))
    return ClassificationSplit(paths, np.asarray(labels, dtype=np.int64), list(classes), fp)


def _is_saved_dataset(path: str) -> bool:
    return os.path.isfile(os.path.join(path, "dataset_dict.json")) or os.path.isfile(
        os.path.join(path, "dataset_info.json")
    )


def _pick_column(columns: Sequence[str], candidates: Sequence[str], wanted: str | None, what: str) -> str:
    if wanted:
        if wanted not in columns:
            raise ValueError(f"{what} column {wanted!r} not in {list(columns)}")
        return wanted
    for c in candidates:
        if c in columns:
            return c
    raise ValueError(f"Could not find a {what} column among {list(columns)}; pass it explicitly.")


def _hf_split(ds, image_column: str | None, label_column: str | None) -> ClassificationSplit:
    from datasets import ClassLabel

    img_col = _pick_column(ds.column_names, IMAGE_COLUMNS, image_column, "image")
    lab_col = _pick_column(ds.column_names, LABEL_COLUMNS, label_column, "label")
    feat = ds.features[lab_col]
    labels = np.asarray(ds[lab_col], dtype=np.int64)
    names = list(feat.names) if isinstance(feat, ClassLabel) else [str(i) for i in range(int(labels.max()) + 1)]
    fp = _sha("hf", getattr(ds, "_fingerprint", None), len(ds), img_col, lab_col)
    return ClassificationSplit(ds, labels, names, fp, img_col)


def load_classification_dataset(
    dataset_name: str,
    train_split: str | None = None,
    test_split: str | None = None,
    image_column: str | None = None,
    label_column: str | None = None,
    dataset_config: str | None = None,
    revision: str | None = None,
) -> dict[str, ClassificationSplit]:
    """Load `{"train": ..., "test": ...}` (test may be absent) from an ImageFolder dir, a saved dataset or a Hub id.

    For ImageNet the "test" role is ImageNet's validation set, as in the CLIP linear-probe protocol; the probe's own
    validation split is carved out of train later (`linear_probe.stratified_split`).
    """
    if os.path.isdir(dataset_name) and not _is_saved_dataset(dataset_name):
        dirs = _find_split_dirs(dataset_name)
        if train_split:
            dirs["train"] = os.path.join(dataset_name, train_split)
        if test_split:
            dirs["test"] = os.path.join(dataset_name, test_split)
        if "train" not in dirs:  # a flat ImageFolder: the whole folder is the train split
            dirs = {"train": dataset_name}
        out = {"train": _image_folder_split(dirs["train"])}
        if "test" in dirs:
            extra = sorted(set(_class_dirs(dirs["test"])) - set(out["train"].class_names))
            if extra:  # their images could never be predicted right; dropping them silently would shrink the test set
                raise ValueError(
                    f"Test classes {extra} under {dirs['test']} have no train folder under {dirs['train']}: a probe "
                    "cannot predict a class it never saw. Add their train images or remove the folders."
                )
            out["test"] = _image_folder_split(dirs["test"], out["train"].class_names)
        return out

    import datasets

    if os.path.isdir(dataset_name):
        ds = datasets.load_from_disk(dataset_name)
    else:  # Hub id: the online path (not exercised offline)
        ds = datasets.load_dataset(dataset_name, dataset_config, revision=revision)
    if isinstance(ds, datasets.Dataset):
        ds = datasets.DatasetDict({train_split or "train": ds})
    names = {k.lower(): k for k in ds.keys()}

    def resolve(role: str, explicit: str | None) -> str | None:
        if explicit:
            return explicit
        for n in SPLIT_ALIASES[role]:
            if n in names:
                return names[n]
        return None

    out = {}
    tr, te = resolve("train", train_split), resolve("test", test_split)
    if tr is None:
        raise ValueError(f"No train split in {list(ds.keys())}; pass --train_split.")
    out["train"] = _hf_split(ds[tr], image_column, label_column)
    if te is not None:
        out["test"] = _hf_split(ds[te], image_column, label_column)
    return out


# ---------------------------------------------------------------------------------------------------------------------
# Segmentation (ADE20K layout)
# ---------------------------------------------------------------------------------------------------------------------
@dataclass
class SegmentationSplit:
    """Pairs of (RGB image, integer mask) from the ADE20K folder layout; class 0 = unlabeled."""

    image_paths: list[str]
    mask_paths: list[str]
    fingerprint: str

    def __len__(self) -> int:
        return len(self.image_paths)

    def __getitem__(self, i: int) -> tuple[Image.Image, np.ndarray]:
        image = Image.open(self.image_paths[i]).convert("RGB")
        mask = np.asarray(Image.open(self.mask_paths[i]))
        if mask.ndim == 3:  # a palette/RGB mask saved by mistake: the class id is in the first channel
            mask = mask[..., 0]
        return image, mask.astype(np.int64)

    def subset(self, n: int | None, seed: int = 0) -> SegmentationSplit:
        if n is None or n >= len(self):
            return self
        idx = np.sort(np.random.default_rng(seed).choice(len(self), n, replace=False))
        return SegmentationSplit(
            [self.image_paths[i] for i in idx], [self.mask_paths[i] for i in idx], _sha(self.fingerprint, idx.tolist())
        )


def load_ade20k(root: str) -> dict[str, SegmentationSplit]:
    """ADEChallengeData2016 layout: `root/images/{training,validation}/*.jpg` +
    `root/annotations/{training,validation}/*.png`."""
    out = {}
    for role, name in (("train", "training"), ("test", "validation")):
        img_dir, ann_dir = os.path.join(root, "images", name), os.path.join(root, "annotations", name)
        if not os.path.isdir(img_dir):
            continue
        images, masks = [], []
        for f in sorted(os.listdir(img_dir)):
            if not f.lower().endswith(IMAGE_EXTENSIONS):
                continue
            m = os.path.join(ann_dir, os.path.splitext(f)[0] + ".png")
            if not os.path.isfile(m):
                raise FileNotFoundError(f"Annotation {m} missing for image {f}")
            images.append(os.path.join(img_dir, f))
            masks.append(m)
        fp = _sha("ade20k", _file_listing_fingerprint(images + masks, root))
        out[role] = SegmentationSplit(images, masks, fp)
    if "train" not in out or "test" not in out:
        raise ValueError(f"{root} is not in the ADE20K layout (images/{{training,validation}}, annotations/...).")
    return out


# ---------------------------------------------------------------------------------------------------------------------
# Image-caption pairs (alignment)
# ---------------------------------------------------------------------------------------------------------------------
@dataclass
class CaptionPairs:
    images: object  # list of paths, or a `datasets.Dataset`
    captions: list[str]
    fingerprint: str
    image_column: str | None = None

    def __len__(self) -> int:
        return len(self.captions)

    def image(self, i: int) -> Image.Image:
        if isinstance(self.images, list):
            return _to_rgb(self.images[i])
        return _to_rgb(self.images[int(i)][self.image_column])

    def __getitem__(self, i: int):
        return self.image(i), self.captions[i]

    def subset(self, indices: Sequence[int]) -> CaptionPairs:
        idx = [int(i) for i in indices]
        imgs = [self.images[i] for i in idx] if isinstance(self.images, list) else self.images.select(idx)
        return CaptionPairs(imgs, [self.captions[i] for i in idx], _sha(self.fingerprint, idx), self.image_column)


def load_caption_pairs(
    dataset_name: str,
    split: str | None = None,
    image_column: str | None = None,
    text_column: str | None = None,
    dataset_config: str | None = None,
    revision: str | None = None,
) -> CaptionPairs:
    """Image-caption pairs: a folder with `metadata.jsonl` (`file_name`, `text`), a saved dataset, or a Hub id
    (e.g. `minhuh/prh` at revision `wit_1024`, the paper's 1024 WIT pairs). A list of captions keeps the first."""
    meta = os.path.join(dataset_name, "metadata.jsonl")
    if os.path.isfile(meta):
        paths, caps = [], []
        with open(meta, encoding="utf-8") as f:
            for line in f:
                if line.strip():
                    row = json.loads(line)
                    paths.append(os.path.join(dataset_name, row["file_name"]))
                    text = row[_pick_column(list(row), TEXT_COLUMNS, text_column, "text")]
                    caps.append(text[0] if isinstance(text, list) else text)
        return CaptionPairs(paths, caps, _sha("captions", caps, _file_listing_fingerprint(paths, dataset_name)))

    import datasets

    if os.path.isdir(dataset_name):
        ds = datasets.load_from_disk(dataset_name)
    else:
        ds = datasets.load_dataset(dataset_name, dataset_config, revision=revision)
    if isinstance(ds, datasets.DatasetDict):
        ds = ds[split or list(ds.keys())[0]]
    img_col = _pick_column(ds.column_names, IMAGE_COLUMNS, image_column, "image")
    txt_col = _pick_column(ds.column_names, TEXT_COLUMNS, text_column, "text")
    caps = [c[0] if isinstance(c, list) else c for c in ds[txt_col]]
    return CaptionPairs(ds, caps, _sha("hf-captions", getattr(ds, "_fingerprint", None), len(ds)), img_col)


# ---------------------------------------------------------------------------------------------------------------------
# Preference pairs (gradient maps)
# ---------------------------------------------------------------------------------------------------------------------
def load_preference_pairs(path: str, image_root: str | None = None, max_samples: int | None = None) -> list[dict]:
    """Rows `{"image", "question", "chosen", "rejected"}` from an MMPR-style JSONL (images relative to `image_root`,
    default: the JSONL's folder), or from an MMPR folder with `meta.json` (first subset)."""
    if os.path.isdir(path) and os.path.isfile(os.path.join(path, "meta.json")):
        with open(os.path.join(path, "meta.json"), encoding="utf-8") as f:
            meta = json.load(f)
        first = next(iter(meta.values()))
        image_root = image_root or os.path.join(path, first["root"])
        path = os.path.join(path, first["annotation"])
    image_root = image_root or os.path.dirname(os.path.abspath(path))
    rows = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            if not line.strip():
                continue
            row = json.loads(line)
            if not isinstance(row.get("image"), str):  # multi-image and text-only rows have no single heat map
                continue
            row["image"] = os.path.join(image_root, row["image"])
            rows.append(row)
            if max_samples and len(rows) >= max_samples:
                break
    return rows
