"""Export the PIVOT-trained vision encoder of a Pivot checkpoint as a plain transformers model, and reuse it (Stage 3).

The deliverable of PIVOT is the encoder. `export_encoder` writes it as the transformers vision class of its family
(`SiglipVisionModel`, `Siglip2VisionModel`, `CLIPVisionModel`, `Dinov2Model`, `ViTModel`, ...) plus its image
processor, so that anyone loads it with `AutoModel` / `AutoImageProcessor` without pivot_hf and without remote code:

- default: a drop-in replacement of the original encoder (same depth, same config, same parameter names); the
  trained feature layer is recorded in the config (`pivot_vision_feature_layer`) and in the model card;
- `truncate_to_feature_layer`: the blocks above the feature layer are cut (and the pooling head where the family's
  config can drop it), as the authors' extraction script does; the feature is then the output of the last block,
  `hidden_states[-1]` (for CLIP also `last_hidden_state`; SigLIP, DINOv2 and ViT always apply their final norm to
  `last_hidden_state`, a module their transformers class cannot omit);
- `export_projector`: the projector (or only its first linear layer, the paper's best Stage-3 reuse "1+1") in a
  `projector/` subfolder, as safetensors + a small JSON config, read back by `apply_projector_reuse`.

Everything is written into a hidden temporary folder beside `output_dir`, checked (weights bit for bit, features at
the recorded layer against the MLLM's), and only then renamed into place: an interrupted export never leaves a folder
at `output_dir` that loads. Only safetensors are written.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from huggingface_hub import HfApi, ModelCard, get_token
from huggingface_hub.utils import validate_repo_id
from safetensors.torch import load_file, save_file
from torch import nn

from .model_card import (
    BASE_MODEL_KEY,
    FEATURE_LAYER_KEY,
    PREFIX_TOKENS_KEY,
    PROJECTOR_SUBFOLDER,
    TRUNCATED_KEY,
    build_model_card,
    check_model_card,
    find_eval_results,
    is_hub_id,
    read_json,
    read_run_metadata,
)


logger = logging.getLogger(__name__)

PROJECTOR_CONFIG_NAME = "projector_config.json"
PROJECTOR_WEIGHTS_NAME = "model.safetensors"
PROJECTOR_FORMAT = "pivot-projector"


# ----------------------------------------------------------------------------------------------------------------------
# Arguments of recipes/export_encoder.py
# ----------------------------------------------------------------------------------------------------------------------
@dataclass
class ExportEncoderArguments:
    """Flags of `recipes/export_encoder.py` (YAML keys of `--config` are the same names)."""

    model_name_or_path: str = field(
        metadata={"help": "Pivot checkpoint (folder or Hub id) whose encoder is exported."}
    )
    output_dir: str = field(metadata={"help": "Folder that receives the encoder (written atomically)."})
    truncate_to_feature_layer: bool = field(
        default=False,
        metadata={
            "help": "Cut the blocks above the trained feature layer (and the pooling head where the config allows), "
            "as the authors' extraction does; the feature is then hidden_states[-1]. Default: a drop-in replacement "
            "of the original encoder with the same depth."
        },
    )
    export_projector: bool = field(
        default=False, metadata={"help": "Also write the projector to `projector/` (safetensors + JSON config)."}
    )
    projector_layers: int = field(
        default=1,
        metadata={
            "help": "Projector linear layers to export with --export_projector: 1 = the first layer (the paper's "
            "best Stage-3 reuse, Table I '1+1'), 2 = the whole 2-layer MLP."
        },
    )
    base_model: str | None = field(
        default=None,
        metadata={
            "help": "Hub id of the original encoder, for the card's `base_model`. Default: what the checkpoint "
            "recorded at composition (`pivot_base_vision_model`, else the vision config's `_name_or_path`)."
        },
    )
    run_dir: str | None = field(
        default=None,
        metadata={
            "help": "Training run folder with trainer_state.json / training_args.json and evaluation results.json "
            "files, for the card. Default: model_name_or_path when it is a local folder."
        },
    )
    eval_dirs: list[str] = field(
        default_factory=list,
        metadata={"help": "More folders searched for vision-evaluation results.json files (shown in the card)."},
    )
    datasets: list[str] = field(
        default_factory=list,
        metadata={"help": "Hub ids of the training datasets for the card metadata (added to the run's dataset)."},
    )
    tags: list[str] = field(default_factory=list, metadata={"help": "Extra card tags."})
    license: str | None = field(default=None, metadata={"help": "License id for the card (e.g. apache-2.0)."})
    model_name: str | None = field(
        default=None, metadata={"help": "Title of the card. Default: the repo/folder name."}
    )
    overwrite_output_dir: bool = field(
        default=False, metadata={"help": "Replace an existing output_dir (swapped in atomically after success)."}
    )
    verify: bool = field(
        default=True,
        metadata={
            "help": "Before publishing the folder, reload it with AutoModel and check weights bit for bit and "
            "features at the recorded layer against the MLLM's."
        },
    )
    push_to_hub: bool = field(default=False, metadata={"help": "Upload the exported folder to the Hub."})
    hub_model_id: str | None = field(
        default=None, metadata={"help": "Hub repo id (`user/name`). Default: the output_dir folder name."}
    )
    hub_private_repo: bool | None = field(
        default=None, metadata={"help": "Create the repo private (None: the Hub's default for the namespace)."}
    )
    hub_revision: str | None = field(
        default=None, metadata={"help": "Branch to upload to (created if missing). Default: main."}
    )
    hub_commit_message: str = field(
        default="Upload PIVOT-trained vision encoder", metadata={"help": "Commit message of the upload."}
    )


# ----------------------------------------------------------------------------------------------------------------------
# Encoder extraction
# ----------------------------------------------------------------------------------------------------------------------
def _pivot_parts(model: nn.Module) -> tuple[nn.Module, nn.Module, Any]:
    inner = getattr(model, "model", model)
    return inner.vision_tower, inner.multi_modal_projector, model.config


def _feature_indices(feature_layer: int | list[int], num_layers: int) -> list[int]:
    from ..modeling_pivot import resolve_feature_layer

    layers = feature_layer if isinstance(feature_layer, list) else [feature_layer]
    return [resolve_feature_layer(int(i), num_layers) for i in layers]


def recorded_base_model(config) -> str | None:
    """The original encoder's Hub id as recorded at composition, or None.

    Looked up in order: `pivot_base_vision_model` on the Pivot config or its vision config, then the vision config's
    `_name_or_path` (transformers stores the id the tower was loaded from, and it survives re-saving). Local paths
    are not Hub ids and give None.
    """
    vision_config = getattr(config, "vision_config", config)
    for candidate in (
        getattr(config, BASE_MODEL_KEY, None),
        getattr(vision_config, BASE_MODEL_KEY, None),
        getattr(vision_config, "_name_or_path", None),
    ):
        if is_hub_id(candidate):
            return candidate
    return None


def extract_encoder(model: nn.Module, truncate_to_feature_layer: bool = False, base_model: str | None = None):
    """A standalone transformers vision model holding the tower of a Pivot MLLM (weights shared, not copied).

    Returns the model of the tower's own class (`type(vision_tower)`), whose config is a copy of the tower's plus the
    `pivot_*` keys: the feature layer to read from *this* model, the number of leading non-patch tokens to drop, the
    base model and whether it was truncated.
    """
    from ..modeling_pivot import find_encoder_layers

    tower, _, config = _pivot_parts(model)
    _, _, layers = find_encoder_layers(tower)
    num_layers = len(layers)
    feature_layer = config.vision_feature_layer
    indices = _feature_indices(feature_layer, num_layers)

    config_dict = tower.config.to_dict()
    if truncate_to_feature_layer:
        config_dict["num_hidden_layers"] = max(indices)
        # Backbone configs (DINOv2, ViT) derive their stage names from the depth; re-derive the default outputs.
        for key in ("out_features", "out_indices", "stage_names"):
            config_dict.pop(key, None)
    new_config = type(tower.config).from_dict(config_dict)
    new_config.architectures = [type(tower).__name__]
    new_config.dtype = next(tower.parameters()).dtype
    setattr(new_config, PREFIX_TOKENS_KEY, int(config.vision_num_prefix_tokens))
    setattr(new_config, BASE_MODEL_KEY, base_model or recorded_base_model(config))
    setattr(new_config, TRUNCATED_KEY, bool(truncate_to_feature_layer))
    if truncate_to_feature_layer:
        depth = max(indices)
        if depth == 0:
            raise ValueError(
                "The feature layer is the embedding output: there is no block to keep; export untruncated."
            )
        if getattr(new_config, "vision_use_head", False):
            # The pooling head reads the final norm of the last block, which the MLLM never used (SigLIP/SigLIP2).
            new_config.vision_use_head = False
        # In the cut model the deepest feature layer is its last block: -1 reads exactly what the MLLM read.
        recorded = [i if i < depth else -1 for i in indices]
        setattr(new_config, FEATURE_LAYER_KEY, recorded if isinstance(feature_layer, list) else recorded[0])
    else:
        setattr(new_config, FEATURE_LAYER_KEY, copy.deepcopy(feature_layer))

    with torch.device("meta"):
        encoder = type(tower)(new_config)
    source = tower.state_dict()
    expected = encoder.state_dict()
    missing = [k for k in expected if k not in source]
    if missing:
        raise RuntimeError(f"The {type(tower).__name__} tower lacks weights the export needs: {missing[:5]}")
    encoder.load_state_dict({k: source[k] for k in expected}, strict=True, assign=True)
    # Non-persistent buffers (position ids) are not in the state dict and would stay on the meta device.
    tower_buffers = dict(tower.named_buffers())
    for name, buffer in list(encoder.named_buffers()):
        if buffer.is_meta and name in tower_buffers:
            module_name, _, buffer_name = name.rpartition(".")
            encoder.get_submodule(module_name).register_buffer(buffer_name, tower_buffers[name], persistent=False)
    still_meta = [n for n, t in list(encoder.named_parameters()) + list(encoder.named_buffers()) if t.is_meta]
    if still_meta:
        raise RuntimeError(f"Export left tensors without data: {still_meta[:5]}")
    return encoder.eval()


def feature_layer_of(vision_model_name_or_path: str, default: int | list[int] = -2) -> int | list[int]:
    """The feature layer an encoder folder / Hub id was trained at (`pivot_vision_feature_layer`), else `default`.

    Model builders composing a Stage-3 MLLM from an exported encoder should use this when the recipe sets no
    `vision_feature_layer`: it is -1 for a truncated export, where the usual -2 would read a block too low.
    """
    from transformers import AutoConfig

    from ..configuration_pivot import vision_config_from_any

    config = vision_config_from_any(AutoConfig.from_pretrained(vision_model_name_or_path))
    value = getattr(config, FEATURE_LAYER_KEY, None)
    return default if value is None else value


# ----------------------------------------------------------------------------------------------------------------------
# Projector
# ----------------------------------------------------------------------------------------------------------------------
def projector_state(model: nn.Module, num_layers: int = 1) -> tuple[dict[str, torch.Tensor], dict]:
    """The first `num_layers` linear layers of a Pivot projector as (`linear_i.*` tensors, JSON config)."""
    tower, projector, config = _pivot_parts(model)
    if num_layers not in (1, 2):
        raise ValueError(f"projector_layers must be 1 or 2, got {num_layers}")
    if num_layers == 2 and not hasattr(projector, "linear_2"):
        raise ValueError("This projector is a single linear layer (projector_type='linear'): export 1 layer.")
    from ..modeling_pivot import find_encoder_layers

    names = ["linear_1", "linear_2"][:num_layers]
    tensors = {}
    for name in names:
        for key, tensor in getattr(projector, name).state_dict().items():
            tensors[f"{name}.{key}"] = tensor.detach().to("cpu").contiguous()
    linear_1 = projector.linear_1
    _, _, layers = find_encoder_layers(tower)
    feature_layer = config.vision_feature_layer
    meta = {
        "format": PROJECTOR_FORMAT,
        "format_version": 1,
        "num_layers": num_layers,
        "projector_type": getattr(config, "projector_type", "mlp2x_gelu"),
        "hidden_act": getattr(config, "projector_hidden_act", "gelu"),
        "bias": linear_1.bias is not None,
        "in_features": linear_1.in_features,
        "hidden_size": linear_1.out_features,
        "out_features": getattr(projector, "linear_2", linear_1).out_features,
        "vision_feature_layer": feature_layer,
        # Absolute hidden_states index (0 = embeddings): unchanged when the encoder is truncated above it.
        "vision_feature_index": _feature_indices(feature_layer, len(layers)),
        "vision_num_prefix_tokens": int(config.vision_num_prefix_tokens),
        "vision_model_type": tower.config.model_type,
        "text_model_type": config.text_config.model_type,
        "text_hidden_size": config.text_config.hidden_size,
        "dtype": str(linear_1.weight.dtype).replace("torch.", ""),
    }
    return tensors, meta


def save_projector(model: nn.Module, directory: str | os.PathLike, num_layers: int = 1) -> str:
    """Write `projector_config.json` + `model.safetensors` (keys `linear_1.weight`, ...) into `directory`."""
    tensors, meta = projector_state(model, num_layers)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(directory / PROJECTOR_WEIGHTS_NAME), metadata={"format": "pt"})
    (directory / PROJECTOR_CONFIG_NAME).write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    return str(directory)


def _resolve_projector_source(path: str) -> Path:
    """A local folder holding `projector_config.json` (given directly, as `<export>/projector/`, or from the Hub)."""
    local = Path(os.path.expanduser(path))
    if local.is_file():  # the projector's safetensors or JSON file itself
        local = local.parent
    if local.exists():
        for candidate in (local, local / PROJECTOR_SUBFOLDER):
            if (candidate / PROJECTOR_CONFIG_NAME).is_file():
                return candidate
        config = read_json(local / "config.json")
        if isinstance(config, dict) and config.get("model_type") == "pivot":
            return local  # a full Pivot checkpoint: read from its weights
        raise FileNotFoundError(
            f"{path}: no {PROJECTOR_CONFIG_NAME} here or in {PROJECTOR_SUBFOLDER}/; export the encoder with "
            "--export_projector, or pass a Pivot checkpoint."
        )
    from huggingface_hub import snapshot_download

    # An exported encoder repo: fetch only its projector/ (not the encoder weights).
    snapshot = snapshot_download(path, allow_patterns=[f"{PROJECTOR_SUBFOLDER}/*"])
    if not (Path(snapshot) / PROJECTOR_SUBFOLDER / PROJECTOR_CONFIG_NAME).is_file():
        # A Pivot checkpoint repo: the projector is inside its weights.
        snapshot = snapshot_download(path, allow_patterns=["*.json", "*.safetensors", "*.py", "*.jinja"])
    return _resolve_projector_source(snapshot)


def load_projector(path: str) -> tuple[dict[str, torch.Tensor], dict]:
    """Projector tensors (`linear_1.*`, maybe `linear_2.*`) and their config from an export or a Pivot checkpoint."""
    folder = _resolve_projector_source(path)
    config_file = folder / PROJECTOR_CONFIG_NAME
    if config_file.is_file():
        meta = json.loads(config_file.read_text(encoding="utf-8"))
        if meta.get("format") != PROJECTOR_FORMAT:
            raise ValueError(f"{config_file} is not a pivot projector config (format={meta.get('format')!r}).")
        return load_file(str(folder / PROJECTOR_WEIGHTS_NAME)), meta
    # A full Pivot checkpoint: load the model (key names are whatever transformers maps them to) and take the MLP.
    from ..modeling_pivot import PivotForConditionalGeneration

    pivot = PivotForConditionalGeneration.from_pretrained(str(folder), dtype="auto", use_kernels=False)
    has_two = hasattr(pivot.model.multi_modal_projector, "linear_2")
    return projector_state(pivot, 2 if has_two else 1)


def apply_projector_reuse(model: nn.Module, path: str | None, num_layers: int, freeze: bool = True) -> list[str]:
    """Copy the first `num_layers` projector layers of a PIVOT run into `model`'s fresh projector (Stage 3).

    `path`: an exported encoder (its `projector/` subfolder), a projector folder, a Hub id of either, or a Pivot
    checkpoint. `num_layers`: 0 (nothing, a fresh projector), 1 (Table I "1+1": the first linear layer reused, a new
    second layer) or 2 (the whole MLP). `freeze`: reused layers get `requires_grad=False`, so they stay bit-identical
    whatever the trainer's `tunable_parts` (call this after those are applied).

    The reused layers were trained on one feature layer of one encoder; a model reading another layer (e.g. -2 on a
    truncated export, where the trained layer is -1) or with another hidden size is refused rather than silently wrong.
    Returns the names of the parameters that were copied.
    """
    if not num_layers:
        return []
    if num_layers not in (1, 2):
        raise ValueError(f"projector_reuse_layers must be 0, 1 or 2, got {num_layers}")
    if not path:
        raise ValueError("projector_reuse_layers > 0 needs projector_init_from (an exported encoder or checkpoint).")
    tensors, meta = load_projector(path)
    if meta["num_layers"] < num_layers:
        raise ValueError(
            f"{path} holds {meta['num_layers']} projector layer(s), {num_layers} requested: re-export with "
            "--projector_layers 2, or reuse 1 layer."
        )
    tower, projector, config = _pivot_parts(model)
    from ..modeling_pivot import find_encoder_layers

    _, _, layers = find_encoder_layers(tower)
    indices = _feature_indices(config.vision_feature_layer, len(layers))
    if meta.get("vision_feature_index") is not None and list(meta["vision_feature_index"]) != indices:
        raise ValueError(
            f"The projector in {path} was trained on encoder hidden_states index {meta['vision_feature_index']} but "
            f"this model reads index {indices} (vision_feature_layer={config.vision_feature_layer}). Set "
            "vision_feature_layer to the encoder's `pivot_vision_feature_layer` (-1 for a truncated export)."
        )
    if meta.get("vision_num_prefix_tokens") not in (None, config.vision_num_prefix_tokens):
        raise ValueError(
            f"The projector in {path} saw features with {meta['vision_num_prefix_tokens']} prefix tokens dropped; "
            f"this model drops {config.vision_num_prefix_tokens}: it is not the same encoder family."
        )
    copied = []
    with torch.no_grad():
        for name in ["linear_1", "linear_2"][:num_layers]:
            if not hasattr(projector, name):
                raise ValueError(f"This model's projector has no {name} (projector_type={config.projector_type!r}).")
            layer = getattr(projector, name)
            for key, param in layer.named_parameters():
                source = tensors.get(f"{name}.{key}")
                if source is None:
                    raise ValueError(f"{path}: projector weights lack {name}.{key}")
                if tuple(source.shape) != tuple(param.shape):
                    raise ValueError(
                        f"Projector {name}.{key}: saved shape {tuple(source.shape)} != this model's "
                        f"{tuple(param.shape)}. Reusing layers needs the same encoder width and, for the hidden "
                        f"layer, an LLM of the same hidden size ({meta.get('text_hidden_size')}); use "
                        "projector_reuse_layers=0 otherwise."
                    )
                param.copy_(source.to(device=param.device, dtype=param.dtype))
                if freeze:
                    param.requires_grad_(False)
                copied.append(f"model.multi_modal_projector.{name}.{key}")
    logger.info("Projector reuse: %d layer(s) from %s (%s)", num_layers, path, "frozen" if freeze else "trainable")
    return copied


# ----------------------------------------------------------------------------------------------------------------------
# Export
# ----------------------------------------------------------------------------------------------------------------------
def _sample_inputs(image_processor) -> dict:
    """Processed inputs for one synthetic non-square image (exercises NaFlex's variable grid too)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, size=(40, 56, 3), dtype=np.uint8))
    return dict(image_processor(images=[image], return_tensors="pt"))


def _verify_export(folder: str, model: nn.Module, encoder: nn.Module) -> None:
    """Reload the written folder like a user would and compare it with the MLLM it came from."""
    from transformers import AutoImageProcessor, AutoModel

    from ..modeling_pivot import encode_images

    loaded = AutoModel.from_pretrained(folder, dtype="auto", use_kernels=False).eval()
    if type(loaded) is not type(encoder):
        raise RuntimeError(f"Exported folder loads as {type(loaded).__name__}, expected {type(encoder).__name__}")
    expected = encoder.state_dict()
    got = loaded.state_dict()
    if set(got) != set(expected):
        raise RuntimeError(f"Exported weights differ in names: {sorted(set(got) ^ set(expected))[:5]}")
    for name, tensor in expected.items():
        if got[name].dtype != tensor.dtype or not torch.equal(got[name], tensor):
            raise RuntimeError(f"Exported weight {name} is not bit-identical to the trained tower's")
    processor = AutoImageProcessor.from_pretrained(folder)
    inputs = _sample_inputs(processor)
    tower, _, config = _pivot_parts(model)
    device, dtype = next(tower.parameters()).device, next(tower.parameters()).dtype
    pixels = inputs["pixel_values"].to(device, dtype)
    extra = {k: inputs[k].to(device) for k in ("pixel_attention_mask", "spatial_shapes") if k in inputs}
    with torch.no_grad():
        reference = model.get_vision_features(pixels, **extra)
        layer = getattr(loaded.config, FEATURE_LAYER_KEY)
        prefix = getattr(loaded.config, PREFIX_TOKENS_KEY)
        if isinstance(layer, list):
            parts = [encode_images(loaded.to(device), pixels, i, prefix, **extra) for i in layer]
            features = [torch.cat(f, -1) for f in zip(*parts)] if isinstance(parts[0], list) else torch.cat(parts, -1)
        else:
            features = encode_images(loaded.to(device), pixels, layer, prefix, **extra)
    pairs = zip(reference, features) if isinstance(reference, list) else [(reference, features)]
    for ref, feat in pairs:
        torch.testing.assert_close(feat, ref, rtol=0, atol=0, msg="Exported features differ from the MLLM's")


def _strip_pivot_references(folder: Path) -> None:
    """The image processor came from a Pivot processor: drop its `auto_map` / `processor_class` pointing at
    PivotProcessor, which would make `AutoProcessor` ask for remote code on a plain encoder repo."""
    path = folder / "preprocessor_config.json"
    if not path.is_file():
        return
    data = json.loads(path.read_text(encoding="utf-8"))
    data.pop("auto_map", None)
    if "pivot" in str(data.get("processor_class", "")).lower():
        data.pop("processor_class")
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def _load_image_processor(model_name_or_path: str):
    # A Pivot checkpoint keeps its image processor inside processor_config.json, which AutoImageProcessor reads.
    from transformers import AutoImageProcessor

    return AutoImageProcessor.from_pretrained(model_name_or_path)


def _publish(tmp: Path, output_dir: Path, overwrite: bool) -> None:
    """Rename the finished temporary folder into place; an existing folder is swapped out only after success."""
    # mkdtemp and safetensors create private (0700/0600) entries; a published model gets the usual umask modes.
    umask = os.umask(0)
    os.umask(umask)
    for entry in [tmp, *tmp.rglob("*")]:
        os.chmod(entry, (0o777 if entry.is_dir() else 0o666) & ~umask)
    if output_dir.exists():
        if not overwrite:
            raise FileExistsError(f"{output_dir} exists; pass overwrite_output_dir to replace it.")
        old = Path(tempfile.mkdtemp(dir=output_dir.parent, prefix=f".{output_dir.name}.old-"))
        os.replace(output_dir, old / "previous")
        try:
            os.replace(tmp, output_dir)
        except BaseException:
            os.replace(old / "previous", output_dir)
            raise
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, output_dir)


def export_encoder(
    model_or_path: str | nn.Module,
    output_dir: str | os.PathLike,
    *,
    truncate_to_feature_layer: bool = False,
    export_projector: bool = False,
    projector_layers: int = 1,
    image_processor=None,
    base_model: str | None = None,
    run_dir: str | None = None,
    eval_dirs: list[str] | tuple[str, ...] = (),
    datasets: list[str] | tuple[str, ...] = (),
    tags: list[str] | tuple[str, ...] = (),
    license: str | None = None,
    model_name: str | None = None,
    repo_id: str | None = None,
    overwrite_output_dir: bool = False,
    verify: bool = True,
) -> str:
    """Write the PIVOT encoder of a Pivot checkpoint (folder, Hub id or loaded model) to `output_dir`, atomically.

    A folder written by a `use_peft` run (PEFT adapter for a base Pivot checkpoint) is merged first
    (`pivot_hf.export.merge.merge_adapter`): the exported tower is the merged model's tower.

    The folder holds `config.json` + `model.safetensors` of the tower's transformers class, the image processor's
    `preprocessor_config.json`, `README.md` (model card) and, with `export_projector`, `projector/`. Returns the path.
    """
    output_dir = Path(output_dir).absolute()
    if output_dir.exists() and not overwrite_output_dir:
        raise FileExistsError(f"{output_dir} exists; pass overwrite_output_dir to replace it.")
    if isinstance(model_or_path, str):
        from ..modeling_pivot import PivotForConditionalGeneration
        from .merge import is_adapter_dir, merge_adapter

        source_path = model_or_path
        if is_adapter_dir(model_or_path):
            # A `use_peft` run: the base checkpoint with the adapter merged (LoRA on the tower folded into its layers,
            # a tower trained in full taken as trained).
            model = merge_adapter(model_or_path)
        else:
            model = PivotForConditionalGeneration.from_pretrained(model_or_path, dtype="auto", use_kernels=False)
        if image_processor is None:
            image_processor = _load_image_processor(model_or_path)
        if run_dir is None and os.path.isdir(model_or_path):
            run_dir = model_or_path
    else:
        source_path, model = None, model_or_path
        if image_processor is None:
            raise ValueError("Pass the image_processor when exporting an in-memory model.")
    model.eval()

    base = base_model or recorded_base_model(model.config)
    if base is None:
        logger.warning(
            "The original encoder's Hub id is unknown (the checkpoint records a local path): the card has no "
            "base_model. Pass --base_model <hub id>."
        )
    encoder = extract_encoder(model, truncate_to_feature_layer, base_model=base)

    output_dir.parent.mkdir(parents=True, exist_ok=True)
    for stale in output_dir.parent.glob(f".{output_dir.name}.tmp-*"):
        # Left by an export that was killed; never a valid model, since it was not renamed into place.
        shutil.rmtree(stale, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(dir=output_dir.parent, prefix=f".{output_dir.name}.tmp-"))
    try:
        encoder.save_pretrained(tmp)
        image_processor.save_pretrained(tmp)
        _strip_pivot_references(tmp)
        projector_meta = None
        if export_projector:
            save_projector(model, tmp / PROJECTOR_SUBFOLDER, projector_layers)
            projector_meta = json.loads((tmp / PROJECTOR_SUBFOLDER / PROJECTOR_CONFIG_NAME).read_text())
        card = build_model_card(
            encoder.config,
            repo_id=repo_id or output_dir.name,
            model_name=model_name,
            base_model=base,
            datasets=list(datasets),
            tags=list(tags),
            license=license,
            run_metadata=read_run_metadata(run_dir),
            eval_results=find_eval_results(run_dir, *eval_dirs),
            projector_meta=projector_meta,
        )
        check_model_card(card)
        card.save(str(tmp / "README.md"))
        unsafe = [p.name for p in tmp.rglob("*") if p.suffix in (".bin", ".pt", ".pth", ".pkl", ".ckpt")]
        if unsafe:
            raise RuntimeError(f"Refusing to publish pickled files: {unsafe}")
        token = get_token()
        if token and any(token.encode() in p.read_bytes() for p in tmp.rglob("*") if p.is_file()):
            # Last guard: whatever a run file held, the user's Hub token never leaves in an export.
            raise RuntimeError("The export would contain the Hugging Face token; refusing to write it.")
        if verify:
            _verify_export(str(tmp), model, encoder)
        _publish(tmp, output_dir, overwrite_output_dir)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    logger.info(
        "Exported the %s encoder of %s to %s (feature layer %s)",
        type(encoder).__name__,
        source_path or "an in-memory model",
        output_dir,
        getattr(encoder.config, FEATURE_LAYER_KEY),
    )
    return str(output_dir)


# ----------------------------------------------------------------------------------------------------------------------
# Hub
# ----------------------------------------------------------------------------------------------------------------------
def push_encoder_to_hub(
    folder: str | os.PathLike,
    repo_id: str,
    *,
    private: bool | None = None,
    revision: str | None = None,
    commit_message: str = "Upload PIVOT-trained vision encoder",
    api: HfApi | None = None,
    token: str | None = None,
    validate_card: bool = True,
) -> str:
    """Upload an exported folder with the standard `HfApi` calls: create_repo, create_branch, upload_folder.

    The token comes from `token`, else the usual places (`HF_TOKEN`, the `hf auth login` cache) through
    `huggingface_hub.get_token()`; it is passed to the API calls only, never logged or written. `api` is injectable
    for tests. Returns the commit URL.
    """
    folder = Path(folder)
    validate_repo_id(repo_id)
    token = token or get_token()
    if not token:
        raise OSError("No Hugging Face token found: run `hf auth login` or set HF_TOKEN, then push again.")
    api = api if api is not None else HfApi()
    if validate_card and (folder / "README.md").is_file():
        card = ModelCard.load(folder / "README.md")
        check_model_card(card)
        try:
            card.validate()  # the Hub's own metadata validation; needs the network
        except ValueError:
            raise  # the Hub rejected the metadata: do not upload a card it would flag
        except Exception as err:  # offline, or the endpoint is unreachable: the local check has passed
            logger.warning("Hub card validation unavailable (%s); the local check passed.", type(err).__name__)
    repo = api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model", token=token)
    repo_id = getattr(repo, "repo_id", None) or repo_id
    if revision and revision != "main":
        api.create_branch(repo_id, branch=revision, exist_ok=True, repo_type="model", token=token)
    commit = api.upload_folder(
        repo_id=repo_id,
        folder_path=str(folder),
        commit_message=commit_message,
        revision=revision,
        repo_type="model",
        token=token,
    )
    url = getattr(commit, "commit_url", None) or str(commit)
    logger.info("Pushed %s to %s%s", folder, repo_id, f" (branch {revision})" if revision else "")
    return url


def run_export(args: ExportEncoderArguments, api: HfApi | None = None) -> dict:
    """What `recipes/export_encoder.py` does: export, then push when asked. Returns `{"output_dir", "url"?}`."""
    repo_id = args.hub_model_id or (Path(args.output_dir).name if args.push_to_hub else None)
    folder = export_encoder(
        args.model_name_or_path,
        args.output_dir,
        truncate_to_feature_layer=args.truncate_to_feature_layer,
        export_projector=args.export_projector,
        projector_layers=args.projector_layers,
        base_model=args.base_model,
        run_dir=args.run_dir,
        eval_dirs=args.eval_dirs,
        datasets=args.datasets,
        tags=args.tags,
        license=args.license,
        model_name=args.model_name,
        repo_id=repo_id,
        overwrite_output_dir=args.overwrite_output_dir,
        verify=args.verify,
    )
    result = {"output_dir": folder}
    if args.push_to_hub:
        result["url"] = push_encoder_to_hub(
            folder,
            repo_id,
            private=args.hub_private_repo,
            revision=args.hub_revision,
            commit_message=args.hub_commit_message,
            api=api,
        )
    return result


__all__ = [
    "ExportEncoderArguments",
    "apply_projector_reuse",
    "build_model_card",
    "check_model_card",
    "export_encoder",
    "extract_encoder",
    "feature_layer_of",
    "find_eval_results",
    "load_projector",
    "push_encoder_to_hub",
    "read_run_metadata",
    "recorded_base_model",
    "run_export",
    "save_projector",
]
