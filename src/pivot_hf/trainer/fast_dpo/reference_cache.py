"""Cached reference log-probs: what identifies them (reference weights, config, processor, dataset, versions) and
why an earlier cache is stale."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch


REF_COLUMNS = ("ref_chosen_logps", "ref_rejected_logps")
# Bumped whenever the cached values could change meaning (keeps stale caches from being reused).
REF_CACHE_VERSION = 2


def _hash_state(module: torch.nn.Module) -> str:
    """sha256 of the weights (names, dtypes, shapes, bytes) as this rank holds them.

    Taken before DeepSpeed / FSDP prepare the model. Parameters already partitioned at load (ZeRO-3 `zero.Init`,
    FSDP2 DTensors) hash their local shard, and the ranks' digests are combined, so the result is the same on every
    rank and never the hash of empty placeholders.
    """
    h = hashlib.sha256()
    sharded = False
    tensors = dict(module.named_buffers())
    tensors.update(dict(module.named_parameters()))
    for name, tensor in sorted(tensors.items()):
        if hasattr(tensor, "ds_tensor"):
            tensor, sharded = tensor.ds_tensor, True
        elif hasattr(tensor, "to_local"):
            tensor, sharded = tensor.to_local(), True
        tensor = tensor.detach().cpu().contiguous()
        h.update(name.encode())
        h.update(str(tensor.dtype).encode())
        h.update(str(tuple(tensor.shape)).encode())
        h.update(tensor.view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    digest = h.hexdigest()
    if sharded and torch.distributed.is_available() and torch.distributed.is_initialized():
        digests = [None] * torch.distributed.get_world_size()
        torch.distributed.all_gather_object(digests, digest)
        digest = hashlib.sha256("".join(digests).encode()).hexdigest()
    return digest


def _config_dict(config) -> dict:
    """A model config as JSON-able data, with the attention implementation of each (sub-)config."""
    data = json.loads(config.to_json_string(use_diff=False))
    data["_attn_implementation"] = getattr(config, "_attn_implementation", None)
    for sub in ("vision_config", "text_config"):
        sub_config = getattr(config, sub, None)
        if sub_config is not None and isinstance(data.get(sub), dict):
            data[sub]["_attn_implementation"] = getattr(sub_config, "_attn_implementation", None)
    return data


def reference_identity(model: torch.nn.Module | None, processor=None) -> dict:
    """Everything about the reference model and processor that changes cached reference log-probs.

    The weights' hash (`_hash_state`), the full model config (feature layer, projector, prefix tokens, ...), the
    attention implementation and dtype, whether Hub kernels are on (`use_kernels`), the image processor (size, mean,
    std, resampling, ...), the tokenizer and chat template, and the versions of the libraries that do the math.
    """
    import importlib.metadata as metadata

    identity: dict[str, Any] = {}
    if model is not None:
        identity["weights"] = _hash_state(model)
        config = getattr(model, "config", None)
        if config is not None:
            identity["config"] = _config_dict(config)
        param = next(model.parameters(), None)
        identity["dtype"] = str(param.dtype) if param is not None else None
        from ..model_loading import uses_hub_kernels

        if uses_hub_kernels(model):
            # Hub kernels replace layers (RMSNorm, rotary, activations) with other numerics. Recorded only when on, so
            # caches written without them keep their keys.
            try:
                identity["hub_kernels"] = {"kernels": metadata.version("kernels")}
            except metadata.PackageNotFoundError:
                identity["hub_kernels"] = {"kernels": None}
    if processor is not None:
        image_processor = getattr(processor, "image_processor", None)
        if image_processor is not None:
            identity["image_processor"] = json.loads(image_processor.to_json_string())
        tokenizer = getattr(processor, "tokenizer", processor)
        template = getattr(processor, "chat_template", None) or getattr(tokenizer, "chat_template", None)
        identity["chat_template"] = template
        identity["tokenizer"] = {
            "class": type(tokenizer).__name__,
            "size": len(tokenizer) if hasattr(tokenizer, "__len__") else None,
            "added": sorted(getattr(tokenizer, "get_added_vocab", dict)().items()),
            "padding_side": getattr(tokenizer, "padding_side", None),
            "truncation_side": getattr(tokenizer, "truncation_side", None),
            "image_token": getattr(processor, "image_token", None),
        }
    versions = {}
    for package in ("torch", "transformers", "trl", "pivot_hf"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = None
    identity["versions"] = versions
    return identity


def dataset_fingerprint(dataset) -> str:
    fingerprint = getattr(dataset, "_fingerprint", None)
    if fingerprint:
        return str(fingerprint)
    # Not a `datasets.Dataset`: hash what a row looks like and how many there are (best effort).
    return hashlib.sha256(f"{type(dataset).__name__}:{len(dataset)}".encode()).hexdigest()


def _flatten(data, prefix: str = "") -> dict:
    if isinstance(data, dict):
        out = {}
        for k, v in data.items():
            out.update(_flatten(v, f"{prefix}{k}."))
        return out
    return {prefix.rstrip("."): data}


def _describe_stale_caches(folder: Path, name: str, payload: dict) -> str:
    """Which settings differ from the caches already in `folder` (why they are not reused)."""
    if not folder.is_dir():
        return "No earlier cache."
    new = _flatten(payload)
    notes = []
    for meta_path in sorted(folder.glob(f"{name}-*.json")):
        try:
            old = _flatten({k: v for k, v in json.loads(meta_path.read_text()).items() if k in payload})
        except (OSError, ValueError):
            continue
        changed = sorted(k for k in set(new) | set(old) if new.get(k) != old.get(k))
        shown = ", ".join(changed[:6]) + (f" and {len(changed) - 6} more" if len(changed) > 6 else "")
        notes.append(f"{meta_path.name} is stale: {shown} changed")
    return "; ".join(notes) if notes else "No earlier cache."


def _same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    """Whether two models hold equal tensors under the same names (then the policy can stand in for the reference)."""
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(
        sa[k].shape == sb[k].shape and torch.equal(sa[k].detach().cpu(), sb[k].detach().cpu()) for k in sa
    )
