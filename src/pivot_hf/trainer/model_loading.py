"""Build the Pivot MLLM, its processor and the DPO reference model from recipe arguments.

Every configuration error that can be detected from configs alone (feature layer out of reach, reference model of
another architecture, max_length that cannot hold the image tokens) is raised here, before weights are loaded or any
compute is spent.
"""

from __future__ import annotations

import copy
import logging

import torch
from transformers import MODEL_MAPPING, AutoConfig

from ..configs import PivotModelConfig, RecipeConfigError, check_model_source
from ..configuration_pivot import vision_config_from_any
from ..modeling_pivot import PivotForConditionalGeneration, resolve_feature_layer
from ..processing_pivot import PivotProcessor
from .compat import trl_reference_loads_like


logger = logging.getLogger(__name__)


def _dtype(model_args: PivotModelConfig):
    dtype = getattr(model_args, "dtype", None)
    if dtype in (None, "auto"):
        return dtype
    return getattr(torch, dtype) if isinstance(dtype, str) else dtype


def check_feature_layer(vision_config, feature_layer, source: str) -> None:
    """A feature layer the tower cannot produce is a configuration error, named with its fix."""
    num_layers = vision_config.num_hidden_layers
    for layer in feature_layer if isinstance(feature_layer, list) else [feature_layer]:
        try:
            resolve_feature_layer(int(layer), num_layers)
        except ValueError as err:
            raise RecipeConfigError(
                f"vision_feature_layer={layer} cannot be reached by the vision tower of {source}, which has "
                f"{num_layers} layers. Fix: set `vision_feature_layer` between -{num_layers + 1} and {num_layers} "
                "(the paper uses -2, the penultimate layer)."
            ) from err


def check_max_length(max_length: int | None, num_image_tokens: int, what: str = "max_length") -> None:
    if max_length is not None and max_length <= num_image_tokens:
        raise RecipeConfigError(
            f"{what}={max_length} is not larger than the {num_image_tokens} image tokens each image becomes, so no "
            f"row can fit. Fix: set `{what}` to at least {num_image_tokens} + the text length (the paper uses 2048 "
            "with 576 image tokens), or use a smaller image resolution."
        )


def load_processor(model_args: PivotModelConfig) -> PivotProcessor:
    check_model_source(model_args)
    if model_args.model_name_or_path:
        return PivotProcessor.from_pretrained(model_args.model_name_or_path, revision=model_args.model_revision)
    return PivotProcessor.from_vision_text_pretrained(
        model_args.vision_model_name_or_path, model_args.text_model_name_or_path
    )


def preflight_model(model_args: PivotModelConfig):
    """Config-only checks (no weights): returns the effective `vision_feature_layer`."""
    check_model_source(model_args)
    if model_args.model_name_or_path:
        config = AutoConfig.from_pretrained(model_args.model_name_or_path, revision=model_args.model_revision)
        if getattr(config, "model_type", None) != "pivot":
            raise RecipeConfigError(
                f"`model_name_or_path: {model_args.model_name_or_path}` is a {config.model_type!r} checkpoint, not a "
                "Pivot MLLM. Fix: to start from an encoder and an LLM, set `vision_model_name_or_path` and "
                "`text_model_name_or_path` instead."
            )
        layer = (
            config.vision_feature_layer if model_args.vision_feature_layer is None else model_args.vision_feature_layer
        )
        check_feature_layer(config.vision_config, layer, model_args.model_name_or_path)
        return layer
    vision_config = vision_config_from_any(AutoConfig.from_pretrained(model_args.vision_model_name_or_path))
    layer = model_args.vision_feature_layer
    if layer is None:
        # An exported PIVOT encoder records the layer it was trained at (-1 once truncated to it); else the paper's -2.
        layer = getattr(vision_config, "pivot_vision_feature_layer", None)
        layer = -2 if layer is None else layer
    check_feature_layer(vision_config, layer, model_args.vision_model_name_or_path)
    return layer


def quantization_kwargs(model_args: PivotModelConfig) -> dict:
    """`from_pretrained` kwargs of `load_in_4bit` / `load_in_8bit` (QLoRA; `check_quantization` has already refused
    them off CUDA or without `use_peft`): TRL's bitsandbytes config on this process's GPU, with the vision tower, the
    projector and the LM head kept in full precision, since the tunable parts without adapters train in full."""
    if not (model_args.load_in_4bit or model_args.load_in_8bit):
        return {}
    from accelerate import PartialState
    from trl import get_quantization_config

    config = get_quantization_config(model_args)
    config.llm_int8_skip_modules = ["vision_tower", "multi_modal_projector", "lm_head"]
    # bitsandbytes weights cannot move after loading: each process loads its copy onto its own GPU.
    return {"quantization_config": config, "device_map": {"": PartialState().local_process_index}}


def import_model_classes(*configs) -> None:
    """Import the modeling modules of these configs (and their sub-configs) now, outside any `deepspeed.zero.Init`.

    Under ZeRO-3, transformers builds the model inside `zero.Init`, which wraps `__init__` of every module class and,
    for classes *defined* inside the context, records the `__init__` it saw at definition. On exit it puts that one
    back, undoing any class decorator applied after definition: `kernels.use_kernelized_func` (Qwen2Attention in
    transformers 5.x) installs an `__init__` that creates `_kernel_funcs`, which its `forward` reads. A modeling module
    first imported inside one `zero.Init` (the policy) thus yields modules without `_kernel_funcs` in the next (the
    reference model): AttributeError in the first forward. Imported before, the classes are never redefined there.
    """

    pending = list(configs)
    while pending:
        config = pending.pop()
        if config is None:
            continue
        try:
            MODEL_MAPPING[type(config)]  # the lazy mapping imports the modeling module
        except KeyError:
            pass  # a composite config (Pivot) without a base-model entry: its sub-configs are what is built
        pending.extend(getattr(config, key) for key in getattr(config, "sub_configs", {}) if hasattr(config, key))


def load_model(model_args: PivotModelConfig, processor: PivotProcessor | None = None, path: str | None = None):
    """The policy (or, with `path`, another Pivot checkpoint such as the reference model)."""
    layer = preflight_model(model_args)
    kwargs = {"use_kernels": model_args.use_kernels}  # an explicit choice: transformers 5.25+ defaults to True
    if _dtype(model_args) is not None:
        kwargs["dtype"] = _dtype(model_args)
    if model_args.attn_implementation:
        kwargs["attn_implementation"] = model_args.attn_implementation
    kwargs.update(quantization_kwargs(model_args))
    if path is not None or model_args.model_name_or_path:
        source = path or model_args.model_name_or_path
        import_model_classes(
            PivotForConditionalGeneration.config_class.from_pretrained(source, revision=model_args.model_revision)
        )
        model = PivotForConditionalGeneration.from_pretrained(
            path or model_args.model_name_or_path, revision=model_args.model_revision, **kwargs
        )
        if model_args.vision_feature_layer is not None:
            model.config.vision_feature_layer = model_args.vision_feature_layer
    else:
        processor = processor or load_processor(model_args)
        model = PivotForConditionalGeneration.from_vision_text_pretrained(
            model_args.vision_model_name_or_path,
            model_args.text_model_name_or_path,
            vision_feature_layer=layer,
            projector_type=model_args.projector_type,
            tokenizer=processor.tokenizer,
            torch_dtype=kwargs.get("dtype"),
            attn_implementation=kwargs.get("attn_implementation"),
            use_kernels=model_args.use_kernels,
        )
    return model


def apply_projector_init(model, model_args: PivotModelConfig) -> None:
    """Stage 3: reuse projector layers of a PIVOT checkpoint. Called after the tunable parts are applied, so that
    `freeze_reused_projector` has the last word on those layers."""
    if not model_args.projector_init_from:
        return
    from ..export import apply_projector_reuse  # export track; imported lazily so training never depends on it

    apply_projector_reuse(
        model,
        model_args.projector_init_from,
        model_args.projector_reuse_layers,
        model_args.freeze_reused_projector,
    )


def _architecture(model) -> dict:
    config = model.config
    # A text-only LLM (which TRL's trainers also take) has no vision half: those entries are None.
    vision, text = getattr(config, "vision_config", None), config.get_text_config()
    summary = {
        "model_type": config.model_type,
        "vision.model_type": getattr(vision, "model_type", None),
        "vision.hidden_size": getattr(vision, "hidden_size", None),
        "vision.num_hidden_layers": getattr(vision, "num_hidden_layers", None),
        "vision_feature_layer": getattr(config, "vision_feature_layer", None),
        "projector_type": getattr(config, "projector_type", None),
        "image_token_id": getattr(config, "image_token_id", None),
        "text.model_type": text.model_type,
        "text.hidden_size": text.hidden_size,
        "text.num_hidden_layers": text.num_hidden_layers,
        "text.vocab_size": text.vocab_size,
    }
    for name, p in model.named_parameters():
        summary[f"param:{name}"] = tuple(getattr(p, "ds_shape", p.shape))
    return summary


def check_reference_model(policy, ref_model, ref_source: str) -> None:
    """The reference must be the same network as the policy (only its weights may differ)."""
    a, b = _architecture(policy), _architecture(ref_model)
    keys = sorted(set(a) | set(b), key=lambda k: (k.startswith("param:"), k))  # config differences first
    diffs = [f"{k}: policy {a.get(k)!r} vs reference {b.get(k)!r}" for k in keys if a.get(k) != b.get(k)]
    if diffs:
        shown = "\n  ".join(diffs[:8]) + (f"\n  ... and {len(diffs) - 8} more" if len(diffs) > 8 else "")
        raise RecipeConfigError(
            f"The reference model ({ref_source}) has a different architecture from the policy:\n  {shown}\n"
            "Fix: set `ref_model_name_or_path` to a checkpoint of the same MLLM (PIVOT uses the Stage-1b checkpoint "
            "the policy starts from), or leave it unset to use a frozen copy of the starting checkpoint."
        )


def refuse_copy_under_zero3(model, what: str) -> None:
    """`copy.deepcopy` of a ZeRO-3 partitioned model copies empty placeholders (each parameter lives in shards on
    the ranks, marked by DeepSpeed's `ds_id`), not the network: stop with the fix instead of training against it."""
    if any(hasattr(p, "ds_id") for p in model.parameters()):
        raise RecipeConfigError(
            f"Under DeepSpeed ZeRO-3 {what} cannot be copied in memory (its parameters are partitioned across ranks). "
            "Fix: save the composed (Stage-1) model and set `model_name_or_path` to it, or pass an explicit "
            "`ref_model=load_reference_model(model_args, model)` loaded from a checkpoint."
        )


def load_reference_model(model_args: PivotModelConfig, policy) -> PivotForConditionalGeneration:
    """An explicit frozen copy of the starting checkpoint, vision tower included (loaded separately, not PEFT).

    Built before the policy trains. From a checkpoint it is loaded again from disk (this also works under ZeRO-3, where
    parameters are partitioned at load); a freshly composed MLLM (random projector) is deep-copied instead.
    """
    source = model_args.ref_model_name_or_path or model_args.model_name_or_path
    if source:
        ref_model = load_model(model_args, path=source)
        if model_args.ref_model_name_or_path is None:
            apply_projector_init(ref_model, model_args)
    else:
        refuse_copy_under_zero3(policy, "the reference of a freshly composed MLLM")
        source = "a copy of the composed policy"
        ref_model = copy.deepcopy(policy)
        # The policy's projector reuse is applied later (after its tunable parts); the copy needs it now, so that
        # policy and reference start from the same network.
        apply_projector_init(ref_model, model_args)
    check_reference_model(policy, ref_model, source)
    ref_model.requires_grad_(False)
    ref_model.eval()
    return ref_model


def uses_hub_kernels(model) -> bool:
    """Whether transformers' Hub kernels are on anywhere in `model`: a Pivot model composed with
    `from_vision_text_pretrained(..., use_kernels=True)` carries them in its sub-models, not on itself."""
    return any(getattr(module, "use_kernels", False) is True for module in model.modules())


__all__ = [
    "quantization_kwargs",
    "apply_projector_init",
    "check_feature_layer",
    "check_max_length",
    "check_reference_model",
    "refuse_copy_under_zero3",
    "load_model",
    "trl_reference_loads_like",
    "uses_hub_kernels",
    "load_processor",
    "load_reference_model",
    "preflight_model",
]
