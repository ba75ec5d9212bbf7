"""Image paths, validation and lazy RGB decoding.

Rows never hold pixels: they hold a path that was resolved and confined to its image root at conversion time. Pixels
are decoded only when a trainer's collator touches a row, through `LazyImages`, a `datasets` transform
(`Dataset.with_transform`) that survives `select`, `shuffle` and the `remove_columns` that `transformers.Trainer` applies.
"""

from __future__ import annotations

import hashlib
import io
import os
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image, ImageOps


# PIL's own default (about 89.5 megapixels); above it PIL warns, above twice it refuses. We check explicitly so the skip
# has a clear reason instead of a warning lost in the logs.
DEFAULT_MAX_IMAGE_PIXELS = 89_478_485


@dataclass
class ImageCheck:
    """Result of validating one image file (no pixels are kept)."""

    ok: bool
    reason: str | None = None  # a `SKIP_REASONS` key when not ok
    mode: str | None = None
    format: str | None = None
    size: tuple[int, int] | None = None


def resolve_image_path(root: str, rel: Any) -> tuple[str | None, str | None]:
    """Resolve `rel` under `root`, following symlinks; return `(absolute_path, None)` or `(None, skip_reason)`.

    A path is refused (`path_escapes_root`) when its real location is outside the real root: `..` components, absolute
    paths elsewhere and symlinks pointing out all end up there. This keeps a malicious or sloppy annotation file from
    reading arbitrary files of the training machine.
    """
    if not isinstance(rel, str) or not rel.strip():
        return None, "invalid_image_field"
    real_root = os.path.realpath(root)
    real = os.path.realpath(os.path.join(real_root, rel.strip()))
    try:
        inside = os.path.commonpath([real_root, real]) == real_root
    except ValueError:  # different drives on Windows
        inside = False
    if not inside:
        return None, "path_escapes_root"
    if not os.path.isfile(real):
        return None, "image_missing"
    return real, None


def check_image(source: str | bytes, max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS, min_side: int = 1) -> ImageCheck:
    """Verify that `source` (a path or encoded bytes) decodes fully, without keeping its pixels.

    `Image.verify()` catches broken PNG chunks but not a truncated JPEG, so the image is also decoded once (with JPEG
    draft mode, which decodes at reduced scale and still fails on truncated data).
    """
    opener = (lambda: io.BytesIO(source)) if isinstance(source, bytes | bytearray) else (lambda: source)
    try:
        with warnings.catch_warnings():
            # A DecompressionBombWarning is turned into our own explicit size check below.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(opener()) as im:
                fmt, mode, size = im.format, im.mode, im.size
                if size[0] * size[1] > max_pixels:
                    return ImageCheck(False, "image_too_large", mode, fmt, size)
                if min(size) < min_side:
                    return ImageCheck(False, "image_too_small", mode, fmt, size)
                im.verify()
            with Image.open(opener()) as im:
                if im.format == "JPEG":
                    im.draft("RGB", (max(1, size[0] // 8), max(1, size[1] // 8)))
                im.load()
    except Image.DecompressionBombError:
        return ImageCheck(False, "image_too_large")
    except FileNotFoundError:
        return ImageCheck(False, "image_missing")
    except Exception:  # PIL raises many types (OSError, SyntaxError, ValueError, struct.error...) for corrupt files
        return ImageCheck(False, "image_unreadable")
    return ImageCheck(True, None, mode, fmt, size)


def image_digest(source: Any, base_dir: str | None = None) -> bytes:
    """16-byte BLAKE2b digest of an image's content as stored: a file's bytes, a `{"bytes", "path"}` dict's bytes, or
    a PIL image's mode, size and pixels. A file that cannot be read digests its error, so that its replacement by a
    readable file still changes the digest."""
    h = hashlib.blake2b(digest_size=16)
    if isinstance(source, dict):
        source = source.get("bytes") or source.get("path")
    if isinstance(source, Image.Image):
        h.update(f"{source.mode}{source.size}".encode())
        h.update(source.tobytes())
    elif isinstance(source, bytes | bytearray):
        h.update(source)
    elif isinstance(source, str):
        path = source if base_dir is None or os.path.isabs(source) else os.path.join(base_dir, source)
        try:
            with open(path, "rb") as f:
                return hashlib.file_digest(f, lambda: hashlib.blake2b(digest_size=16)).digest()
        except OSError as error:
            h.update(f"unreadable:{path}:{type(error).__name__}".encode())
    else:
        h.update(repr(source).encode())
    return h.digest()


def dataset_images_digest(dataset, batch_size: int = 256) -> str | None:
    """One digest of every image of `dataset`, row by row in order (None when it has no image column).

    The reference-log-prob cache puts it in its key: replacing image files at the same paths changes the digest and
    forces a recompute, which the paths alone would not. Cost: one read of every image file, no decoding. Measured
    on 20,000 rows of 120 kB files (2.4 GB): 4.0 s of CPU (~600 MB/s BLAKE2b), 34-40 s wall on a 2-core machine at
    load 16 (`benchmarks/image_digest.py`); the reference pass it guards costs a forward per pair.
    """
    raw = dataset.with_format(None)
    column = "images" if "images" in raw.column_names else ("image" if "image" in raw.column_names else None)
    if column is None:
        return None
    feature = raw.features.get(column) if raw.features else None
    if feature is not None:
        from .loader import _has_decoded_images, _without_decoding

        if _has_decoded_images(feature):
            raw = raw.cast_column(column, _without_decoding(feature))
    total = hashlib.blake2b(digest_size=16)
    for batch in raw.select_columns([column]).iter(batch_size=batch_size):
        for images in batch[column]:
            items = images if isinstance(images, list | tuple) else ([] if images is None else [images])
            total.update(len(items).to_bytes(4, "little"))
            for image in items:
                total.update(image_digest(image))
    return total.hexdigest()


def to_rgb(im: Image.Image) -> Image.Image:
    """Convert any PIL mode to 8-bit RGB the way a human would expect it to look.

    - 16/32-bit integer and float modes are scaled to 8 bit (`Image.convert` would clip them, turning most photos white).
    - Modes with transparency are composited on white (dropping alpha would expose arbitrary colours under it).
    - Animated images (GIF, APNG, WebP) keep their first frame.
    """
    if getattr(im, "is_animated", False):
        im.seek(0)
    mode = im.mode
    if mode == "RGB":
        return im.copy() if im.readonly else im
    if mode.startswith("I;16") or mode in ("I", "F"):
        arr = np.asarray(im, dtype=np.float64)
        if mode.startswith("I;16"):
            arr = arr / 257.0  # 65535 -> 255
        elif mode == "I" and arr.max(initial=0) > 255:
            arr = np.clip(arr, 0, 65535) / 257.0
        elif mode == "F" and arr.max(initial=0) <= 1.0:
            arr = arr * 255.0
        gray = np.clip(np.rint(arr), 0, 255).astype(np.uint8)
        return Image.fromarray(gray, mode="L").convert("RGB")
    has_alpha = mode in ("RGBA", "LA", "PA", "RGBa", "La") or (mode == "P" and "transparency" in im.info)
    if has_alpha:
        rgba = im.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return im.convert("RGB")


def load_image(source: Any, base_dir: str | None = None, max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS) -> Image.Image:
    """Open `source` (path, `{"bytes", "path"}` dict as stored by `datasets.Image`, or PIL image) as an RGB image."""
    if isinstance(source, Image.Image):
        return to_rgb(source)
    if isinstance(source, dict):
        if source.get("bytes"):
            source = source["bytes"]
        else:
            source = source.get("path")
    if isinstance(source, bytes | bytearray):
        fp: Any = io.BytesIO(source)
    elif isinstance(source, str):
        fp = source if base_dir is None or os.path.isabs(source) else os.path.join(base_dir, source)
    else:
        raise TypeError(f"cannot load an image from {type(source).__name__}")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        with Image.open(fp) as im:
            if im.size[0] * im.size[1] > max_pixels:
                raise ValueError(f"image {fp!r} has {im.size[0]}x{im.size[1]} pixels, more than {max_pixels}")
            out = to_rgb(_upright(im))
            out.load()
    return out


def _upright(im: Image.Image) -> Image.Image:
    """Apply the EXIF orientation (phone photos are stored sideways with a rotation tag), as viewers and
    `transformers.image_utils.load_image` do."""
    try:
        return ImageOps.exif_transpose(im) or im
    except Exception:  # a malformed EXIF block must not cost the image
        return im


# Set by `LazyImages` on a row whose image could not be read when it was accessed (the reason); the trainers' collate
# guard leaves such rows out of their batch and counts them.
UNREADABLE_KEY = "pivot_unreadable_image"


@dataclass
class LazyImages:
    """`datasets` transform that turns the `images` column (paths) into RGB PIL images on access.

    Use `dataset.with_transform(LazyImages())`: nothing is decoded until a row is read, and every batch is decoded
    independently, so memory does not grow with the number of rows iterated. It is a dataclass (picklable) so that
    `DataLoader` workers can receive it.

    A row whose image cannot be read at that point (deleted or replaced after the data was checked) does not raise:
    its images become `[]` and the batch gains `UNREADABLE_KEY` (the reason per row, None for good rows), which the
    Pivot trainers' collate guard uses to skip and count it. A single `image` column is decoded the same way.
    """

    column: str = "images"
    base_dir: str | None = None
    max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS

    def __call__(self, batch: dict[str, list]) -> dict[str, list]:
        single = self.column == "images" and "images" not in batch and "image" in batch
        column = "image" if single else self.column
        if column not in batch:
            return batch
        decoded, problems = [], []
        for sources in batch[column]:
            items = [sources] if single and sources is not None else (sources or [])
            try:
                images = [load_image(src, self.base_dir, self.max_pixels) for src in items]
                problems.append(None)
            except Exception as error:  # any decode failure: the collate guard skips and counts the row
                images = []
                problems.append(f"{type(error).__name__}: {error}"[:200])
            decoded.append((images[0] if images else None) if single else images)
        batch[column] = decoded
        if any(problems):
            batch[UNREADABLE_KEY] = problems
        return batch
