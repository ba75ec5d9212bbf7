"""Frozen-encoder feature extraction with a disk cache.

Two kinds of models are read:
- an exported encoder folder (a plain transformers vision model + image processor): features at the trained
  feature layer (`config.pivot_vision_feature_layer`, else -2, else what the caller passes);
- a Pivot (or LLaVA) checkpoint: `source="encoder"` gives the tower's patch features at the MLLM's feature layer
  (before the projector, `get_vision_features`), `source="projector"` the LLM's visual tokens (`get_image_features`).

The cache key hashes the weights that produce the features (not the path: a checkpoint re-trained into the same folder
must miss), the image preprocessing, the dataset fingerprint, the layer, the source and the pooling. Arrays are stored
as `.npy` files (read back memory-mapped with `allow_pickle=False`) plus a `meta.json`, written into a temporary
folder that is renamed into place at the end, so an interrupted run never leaves a half cache that a later run reads.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from ..modeling_pivot import encode_images


logger = logging.getLogger(__name__)

# Process-wide counters (the cache object keeps its own too); tests and logs read them to prove cache reuse.
CACHE_STATS = {"hits": 0, "misses": 0}
POOLINGS = ("mean", "none", "cls", "first_token")
ALIGNMENT_POOLINGS = ("auto", "cls", "mean", "first_token")


# ---------------------------------------------------------------------------------------------------------------------
# Identity
# ---------------------------------------------------------------------------------------------------------------------
def module_fingerprint(*modules: torch.nn.Module) -> str:
    """Content hash of the parameters and buffers of `modules` (names, dtypes, shapes and bytes)."""
    h = hashlib.blake2b(digest_size=16)
    for mi, module in enumerate(modules):
        for name, tensor in sorted(module.state_dict().items()):
            t = tensor.detach().to("cpu").contiguous().reshape(-1)
            h.update(f"{mi}:{name}:{t.dtype}:{tuple(tensor.shape)}".encode())
            # A byte view hashes any dtype (bf16 included, which numpy cannot represent).
            h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def _processor_fingerprint(image_processor) -> str:
    if image_processor is None:
        return "none"
    d = image_processor.to_dict() if hasattr(image_processor, "to_dict") else vars(image_processor)
    d = {k: v for k, v in d.items() if not k.startswith("_") and k not in ("processor_class", "auto_map")}
    return hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()[:16]


# ---------------------------------------------------------------------------------------------------------------------
# Encoding backends
# ---------------------------------------------------------------------------------------------------------------------
def _num_prefix_tokens(vision_config) -> int | None:
    from pivot_hf.configuration_pivot import num_vision_prefix_tokens, vision_config_from_any

    return num_vision_prefix_tokens(vision_config_from_any(vision_config))


def all_layer_patch_features(
    vision_tower, pixel_values, num_prefix_tokens: int | None = None, keep_prefix: bool = False, **vision_inputs
) -> list[torch.Tensor | list[torch.Tensor]]:
    """Tokens of every hidden state (embeddings output first), prefix tokens (CLS/registers) dropped unless
    `keep_prefix` (then the full sequence, CLS at index 0 for families that have one).

    SigLIP2 NaFlex inputs give, per hidden state, one `(valid_patches_i, D)` tensor per image: padding patches are
    not features and must not enter a mean.
    """
    out = vision_tower(pixel_values=pixel_values, output_hidden_states=True, return_dict=True, **vision_inputs)
    prefix = _num_prefix_tokens(vision_tower.config) if num_prefix_tokens is None else num_prefix_tokens
    if prefix is None:
        raise ValueError(
            f"Unknown vision family {vision_tower.config.model_type!r}: cannot tell CLS/patch tokens apart."
        )
    hidden = [h if keep_prefix else h[:, prefix:] for h in out.hidden_states]
    mask = vision_inputs.get("pixel_attention_mask")
    if mask is None:
        return hidden
    mask = mask.to(torch.bool)  # NaFlex families have no prefix tokens, so the mask lines up with the sequence
    return [[tokens[m] for tokens, m in zip(h, mask)] for h in hidden]


def resolve_pooling(num_prefix_tokens: int | None, requested: str) -> str:
    """The alignment pooling actually used: "auto" is the CLS token for families with one (a prefix token at index
    0: CLIP, DINOv2, ViT, MAE, ...), the mean over patch tokens otherwise (SigLIP, SigLIP2). Raises for "cls" on a
    family without a CLS token."""
    if requested not in ALIGNMENT_POOLINGS:
        raise ValueError(f"alignment pooling must be one of {ALIGNMENT_POOLINGS}, got {requested!r}")
    has_cls = bool(num_prefix_tokens)
    if requested == "auto":
        return "cls" if has_cls else "mean"
    if requested == "cls" and not has_cls:
        raise ValueError("--alignment_pooling cls: this vision family has no CLS token; use auto or mean")
    return requested


def model_prefix_tokens(model_name_or_path: str) -> int | None:
    """Leading non-patch tokens (CLS, registers) of a checkpoint's vision tower, read from its config alone (no
    weights), as `VisionBackbone.num_prefix_tokens` gives once loaded; None for an unknown family."""
    from transformers import AutoConfig

    import pivot_hf  # noqa: F401  (registers the Pivot config with AutoConfig)

    cfg = AutoConfig.from_pretrained(model_name_or_path)
    if _is_mllm_config(cfg.to_dict()):
        prefix = getattr(cfg, "vision_num_prefix_tokens", None)
        return _num_prefix_tokens(cfg.vision_config) if prefix is None else prefix
    return _num_prefix_tokens(cfg)


def _read_config(path: str) -> dict:
    cfg = os.path.join(path, "config.json")
    if os.path.isfile(cfg):
        with open(cfg, encoding="utf-8") as f:
            return json.load(f)
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(path).to_dict()


def _is_mllm_config(cfg: dict) -> bool:
    return (
        "text_config" in cfg and "vision_config" in cfg and cfg.get("model_type") not in ("siglip", "clip", "siglip2")
    )


@dataclass
class VisionBackbone:
    """A frozen image -> patch-token function with an identity, built from an encoder or an MLLM.

    `encode(pixel_values, **vision_inputs)` returns (B, N, D) at the chosen layer/source; `encode_all_layers` returns
    one (B, N, D) per hidden state of the tower (alignment). `num_images_encoded` counts images sent through the model:
    it stays unchanged when the cache serves a request.
    """

    model: torch.nn.Module
    image_processor: object
    source: str = "encoder"  # "encoder" (tower at the feature layer) | "projector" (LLM visual tokens)
    feature_layer: int | list[int] = -2
    name: str = "model"
    is_mllm: bool = False
    device: str = "cpu"
    dtype: torch.dtype = torch.float32
    num_images_encoded: int = 0
    _fingerprint: str | None = field(default=None, repr=False)

    @classmethod
    def from_pretrained(
        cls,
        model_name_or_path: str,
        source: str = "encoder",
        feature_layer: int | None = None,
        device: str | None = None,
        dtype: str | torch.dtype = "float32",
    ) -> VisionBackbone:
        from transformers import AutoImageProcessor, AutoModel

        dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        cfg = _read_config(model_name_or_path)
        if _is_mllm_config(cfg):
            from transformers import AutoModelForImageTextToText

            import pivot_hf  # noqa: F401  (registers the Pivot classes with the Auto classes)

            model = AutoModelForImageTextToText.from_pretrained(model_name_or_path, dtype=dtype, use_kernels=False)
            layer = model.config.vision_feature_layer if feature_layer is None else feature_layer
            is_mllm = True
        else:
            if source != "encoder":
                raise ValueError(f"{model_name_or_path} is a vision encoder: only source='encoder' applies.")
            model = AutoModel.from_pretrained(model_name_or_path, dtype=dtype, use_kernels=False)
            if hasattr(model, "vision_model") and not hasattr(
                model, "embeddings"
            ):  # a dual encoder: keep the image half
                model = model.vision_model
            layer = feature_layer if feature_layer is not None else cfg.get("pivot_vision_feature_layer", -2)
            is_mllm = False
        processor = AutoImageProcessor.from_pretrained(model_name_or_path)
        model.eval().requires_grad_(False).to(device)
        layer = [int(i) for i in layer] if isinstance(layer, (list, tuple)) else int(layer)
        return cls(model, processor, source, layer, model_name_or_path, is_mllm, device, dtype)

    # -- identity --------------------------------------------------------------------------------------------------
    @property
    def vision_tower(self) -> torch.nn.Module:
        if not self.is_mllm:
            return self.model
        inner = getattr(self.model, "model", self.model)
        return inner.vision_tower

    @property
    def projector(self) -> torch.nn.Module:
        inner = getattr(self.model, "model", self.model)
        return inner.multi_modal_projector

    def fingerprint(self) -> str:
        """Hash of the weights that produce the features, so an unchanged encoder hits whatever folder it is in."""
        if self._fingerprint is None:
            mods = [self.vision_tower] + ([self.projector] if self.source == "projector" else [])
            self._fingerprint = module_fingerprint(*mods)
        return self._fingerprint

    def identity(self) -> dict:
        return {
            "name": self.name,
            "weights_fingerprint": self.fingerprint(),
            "source": self.source,
            "feature_layer": self.feature_layer,
            "vision_model_type": self.vision_tower.config.model_type,
            "image_processor": _processor_fingerprint(self.image_processor),
        }

    # -- encoding --------------------------------------------------------------------------------------------------
    def preprocess(self, images: Sequence[Image.Image]) -> dict:
        return dict(self.image_processor(images=list(images), return_tensors="pt"))

    @torch.no_grad()
    def encode(self, pixel_values: torch.Tensor, **vision_inputs) -> torch.Tensor:
        pixel_values = pixel_values.to(self.device, self.dtype)
        vision_inputs = {k: v.to(self.device) if torch.is_tensor(v) else v for k, v in vision_inputs.items()}
        self.num_images_encoded += pixel_values.shape[0]
        if not self.is_mllm:
            return encode_images(self.model, pixel_values, self.feature_layer, **vision_inputs)
        if self.source == "encoder":
            if hasattr(self.model, "get_vision_features"):
                return self.model.get_vision_features(
                    pixel_values, vision_feature_layer=self.feature_layer, **vision_inputs
                )
            # A plain LLaVA checkpoint: the tower's hidden state at the MLLM's own feature layer.
            return encode_images(self.vision_tower, pixel_values, self.feature_layer, **vision_inputs)
        out = self.model.get_image_features(
            pixel_values=pixel_values, vision_feature_layer=self.feature_layer, **vision_inputs
        )
        feats = getattr(out, "pooler_output", out)
        if isinstance(feats, (list, tuple)):
            # One tensor per image: stacked when they line up, kept as a list for NaFlex's varying patch counts.
            return torch.stack(list(feats)) if len({f.shape for f in feats}) == 1 else list(feats)
        return feats

    @torch.no_grad()
    def encode_all_layers(self, pixel_values: torch.Tensor, keep_prefix: bool = False, **vision_inputs) -> list:
        pixel_values = pixel_values.to(self.device, self.dtype)
        self.num_images_encoded += pixel_values.shape[0]
        return all_layer_patch_features(
            self.vision_tower, pixel_values, num_prefix_tokens=self.num_prefix_tokens(), keep_prefix=keep_prefix,
            **vision_inputs,
        )  # fmt: skip

    def num_prefix_tokens(self) -> int | None:
        """Leading non-patch tokens of the tower (CLS, registers); None for an unknown family."""
        prefix = getattr(self.model.config, "vision_num_prefix_tokens", None) if self.is_mllm else None
        return _num_prefix_tokens(self.vision_tower.config) if prefix is None else prefix

    def patch_size(self) -> int:
        cfg = self.vision_tower.config
        return int(getattr(cfg, "patch_size", 16))

    def input_size(self) -> tuple[int, int]:
        """(height, width) the encoder expects, from the image processor (else the tower's `image_size`)."""
        p = self.image_processor
        for attr in ("crop_size", "size"):
            s = getattr(p, attr, None)
            s = s if isinstance(s, dict) or s is None else vars(s) if hasattr(s, "__dict__") else s
            if isinstance(s, dict):
                if s.get("height") and s.get("width"):
                    return int(s["height"]), int(s["width"])
                if s.get("shortest_edge") and attr == "size":
                    return int(s["shortest_edge"]), int(s["shortest_edge"])
        size = int(getattr(self.vision_tower.config, "image_size", 224))
        return size, size


# ---------------------------------------------------------------------------------------------------------------------
# Cache
# ---------------------------------------------------------------------------------------------------------------------
class FeatureCache:
    """Folder of `<key>/{<array>.npy, meta.json}` entries. `hits` / `misses` count lookups (also in CACHE_STATS)."""

    def __init__(self, cache_dir: str | None):
        self.cache_dir = cache_dir
        self.hits = 0
        self.misses = 0
        if cache_dir:
            os.makedirs(cache_dir, exist_ok=True)

    @staticmethod
    def make_key(**parts) -> str:
        return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:32]

    def load(self, key: str) -> dict[str, np.ndarray] | None:
        entry = os.path.join(self.cache_dir, key) if self.cache_dir else None
        if entry is None or not os.path.isfile(os.path.join(entry, "meta.json")):
            self.misses += 1
            CACHE_STATS["misses"] += 1
            return None
        with open(os.path.join(entry, "meta.json"), encoding="utf-8") as f:
            meta = json.load(f)
        arrays = {
            n: np.load(os.path.join(entry, f"{n}.npy"), mmap_mode="r", allow_pickle=False) for n in meta["arrays"]
        }
        self.hits += 1
        CACHE_STATS["hits"] += 1
        logger.info("feature cache hit %s", key)
        return arrays

    def writer(self, key: str, meta: dict) -> _CacheWriter:
        return _CacheWriter(self.cache_dir, key, meta)


class _CacheWriter:
    """Streams arrays batch by batch into memory-mapped `.npy` files (ImageNet-sized token features do not fit RAM)."""

    def __init__(self, cache_dir: str | None, key: str, meta: dict):
        self.cache_dir, self.key, self.meta = cache_dir, key, meta
        self.tmp = tempfile.mkdtemp(prefix=f".{key}.", dir=cache_dir) if cache_dir else None
        self.arrays: dict[str, np.ndarray] = {}

    def array(self, name: str, shape: tuple[int, ...], dtype) -> np.ndarray:
        if name not in self.arrays:
            if self.tmp is None:
                self.arrays[name] = np.empty(shape, dtype=dtype)
            else:
                path = os.path.join(self.tmp, f"{name}.npy")
                self.arrays[name] = np.lib.format.open_memmap(path, mode="w+", dtype=dtype, shape=shape)
        return self.arrays[name]

    def commit(self) -> dict[str, np.ndarray]:
        if self.tmp is None:
            return self.arrays
        for a in self.arrays.values():
            if isinstance(a, np.memmap):
                a.flush()
        with open(os.path.join(self.tmp, "meta.json"), "w", encoding="utf-8") as f:
            json.dump({**self.meta, "arrays": sorted(self.arrays)}, f, indent=1, default=str)
        final = os.path.join(self.cache_dir, self.key)
        if os.path.isdir(final):  # a concurrent run won the race; its entry is equivalent
            shutil.rmtree(self.tmp, ignore_errors=True)
        else:
            os.replace(self.tmp, final)
        return {n: np.load(os.path.join(final, f"{n}.npy"), mmap_mode="r", allow_pickle=False) for n in self.arrays}

    def abort(self) -> None:
        if self.tmp:
            shutil.rmtree(self.tmp, ignore_errors=True)


# ---------------------------------------------------------------------------------------------------------------------
# Extraction
# ---------------------------------------------------------------------------------------------------------------------
def pool_tokens(tokens: torch.Tensor | list[torch.Tensor], pooling: str) -> torch.Tensor:
    """(B, N, D) -> (B, D): "mean" over the tokens given (patch tokens; SigLIP has no CLS), "cls" / "first_token" the
    token at index 0 (given a sequence that keeps its prefix: the CLS token); "none" leaves the tokens unchanged.

    A list (one `(N_i, D)` tensor per image: SigLIP2 NaFlex, whose images have different patch counts) is pooled
    image by image."""
    if pooling not in POOLINGS:
        raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}")
    if isinstance(tokens, (list, tuple)):
        if pooling == "mean":
            return torch.stack([t.float().mean(dim=0) for t in tokens])
        if pooling in ("cls", "first_token"):
            return torch.stack([t[0].float() for t in tokens])
        raise ValueError("pooling='none' needs the same number of tokens per image (not SigLIP2 NaFlex inputs)")
    if pooling == "mean":
        return tokens.float().mean(dim=1)
    if pooling in ("cls", "first_token"):
        return tokens[:, 0].float()
    return tokens


class _IndexDataset(torch.utils.data.Dataset):
    def __init__(self, get: Callable[[int], Image.Image], n: int):
        self.get, self.n = get, n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> Image.Image:
        try:
            return self.get(i)
        except (OSError, SyntaxError, ValueError) as e:  # PIL: unreadable, truncated or not an image
            raise ValueError(
                f"image {i} cannot be read ({type(e).__name__}: {e}). Replace or remove that file and rerun; "
                "nothing of this extraction was cached."
            ) from e


def extract_features(
    backbone: VisionBackbone,
    images: Callable[[int], Image.Image] | Sequence[Image.Image],
    num_images: int,
    dataset_fingerprint: str,
    pooling: str = "mean",
    batch_size: int = 64,
    cache: FeatureCache | None = None,
    preprocess: Callable[[list[Image.Image]], dict] | None = None,
    all_layers: bool = False,
    store_dtype: str = "float32",
    extra_key: dict | None = None,
    desc: str = "features",
    num_workers: int = 0,
) -> np.ndarray:
    """Encode `num_images` images (index -> PIL image callable, or a sequence) into an array, through the cache.

    Returns (N, D) for mean / cls pooling, (N, P, D) for "none"; `all_layers` adds a leading layer axis (every
    hidden state, embeddings output first). "cls" / "first_token" need `all_layers` (the single-layer path drops the
    prefix tokens).
    """
    if pooling in ("cls", "first_token") and not all_layers:
        raise ValueError(f"pooling={pooling!r} is available with all_layers=True (the alignment stack) only")
    get = images if callable(images) else images.__getitem__
    cache = cache or FeatureCache(None)
    # The display name is left out of the key: the same weights in another folder (an exported copy) still hit.
    key = FeatureCache.make_key(
        model={k: v for k, v in backbone.identity().items() if k != "name"},
        dataset=dataset_fingerprint,
        num_images=num_images,
        pooling=pooling,
        all_layers=all_layers,
        store_dtype=store_dtype,
        extra=extra_key or {},
    )
    hit = cache.load(key)
    if hit is not None:
        return hit["features"]
    writer = cache.writer(key, {"model": backbone.identity(), "dataset": dataset_fingerprint, "pooling": pooling})
    preprocess = preprocess or backbone.preprocess
    # Decoding and resizing run in DataLoader workers (ImageNet decoding would otherwise bound the encoder); batches
    # come back in order, so row i of the output is image i.
    loader = torch.utils.data.DataLoader(
        _IndexDataset(get, num_images),
        batch_size=batch_size,
        shuffle=False,
        num_workers=num_workers,
        collate_fn=preprocess,
    )
    try:
        for bi, inputs in enumerate(tqdm(loader, desc=desc, unit="batch")):
            inputs = dict(inputs)
            start = bi * batch_size
            idx = range(start, min(start + batch_size, num_images))
            pixel_values = inputs.pop("pixel_values")
            if all_layers:
                layers = backbone.encode_all_layers(
                    pixel_values, keep_prefix=pooling in ("cls", "first_token"), **inputs
                )
                feats = torch.stack([pool_tokens(t, pooling) for t in layers])
                out = writer.array("features", (feats.shape[0], num_images, *feats.shape[2:]), store_dtype)
                out[:, start : start + len(idx)] = feats.float().cpu().numpy()
            else:
                feats = pool_tokens(backbone.encode(pixel_values, **inputs), pooling)
                out = writer.array("features", (num_images, *feats.shape[1:]), store_dtype)
                out[start : start + len(idx)] = feats.float().cpu().numpy()
        return writer.commit()["features"]
    except BaseException:
        writer.abort()
        raise
