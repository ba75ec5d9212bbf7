"""Pivot MLLM: any transformers vision encoder -> 2-layer MLP projector -> any causal LM, LLaVA-style.

The module tree and parameter names are those of transformers' `LlavaForConditionalGeneration`
(`model.vision_tower`, `model.multi_modal_projector`, `model.language_model`, `lm_head`), so that a Pivot checkpoint
converts to and from the LLaVA format by renaming nothing. What differs is how visual features are taken from the
tower, which must work for every encoder family PIVOT is applied to:

- the feature layer is read right after its block, and the blocks after it are not run at all (with the default
  `vision_feature_layer=-2` the last block, the final norm and any pooling head never see data, as in the authors'
  recipe, which deletes them);
- leading CLS / register tokens are dropped per family (SigLIP keeps every patch);
- SigLIP2 NaFlex inputs (`pixel_attention_mask`, `spatial_shapes`) give a variable number of tokens per image;
- ViT-MAE runs unmasked and in patch order.

Only `transformers`, `torch` and sibling files are imported here: this file is copied next to saved checkpoints so
they load with `trust_remote_code=True` where pivot_hf is not installed.
"""

import copy
import dataclasses
import functools
import inspect
import os
import types

import torch
from torch import nn
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaModel,
    LlavaPreTrainedModel,
)
from transformers.modeling_outputs import BaseModelOutputWithPooling
from transformers.models.llava.modeling_llava import LlavaModelOutputWithPast, LlavaMultiModalProjector

from .configuration_pivot import (
    PivotConfig,
    num_vision_prefix_tokens,
    vision_config_from_any,
    warn_if_untested_transformers,
)
from .processing_pivot import DEFAULT_IMAGE_TOKEN, prepare_tokenizer


warn_if_untested_transformers()


# transformers 5.24 renamed the key/value cache argument and output field `past_key_values` -> `cache`, and replaced the
# output field `image_hidden_states` by `image_outputs` (the encoder's BaseModelOutputWithPooling). This file travels
# with checkpoints, so it speaks whichever spelling the installed transformers has, using only its public classes.
_OUTPUT_FIELDS = {field.name for field in dataclasses.fields(LlavaModelOutputWithPast)}
CACHE_ARGUMENT = "cache" if "cache" in _OUTPUT_FIELDS else "past_key_values"


def model_output(last_hidden_state, cache=None, hidden_states=None, attentions=None, image_features=None):
    """A `LlavaModelOutputWithPast` in the installed transformers' spelling.

    `image_features`: the projected visual tokens (one `(num_tokens_i, hidden)` tensor per image, or one tensor).
    """
    fields = {"last_hidden_state": last_hidden_state, "hidden_states": hidden_states, "attentions": attentions}
    fields[CACHE_ARGUMENT] = cache
    if "image_outputs" in _OUTPUT_FIELDS:
        image_outputs = None
        if image_features is not None:
            pooled = list(image_features) if isinstance(image_features, (list, tuple)) else [image_features]
            image_outputs = BaseModelOutputWithPooling(pooler_output=pooled)
        fields["image_outputs"] = image_outputs
    else:
        fields["image_hidden_states"] = image_features
    return LlavaModelOutputWithPast(**fields)


def output_image_features(output):
    """The projected visual tokens carried by a Pivot/LLaVA model output, whatever the transformers version."""
    if "image_outputs" in _OUTPUT_FIELDS:
        image_outputs = getattr(output, "image_outputs", None)
        return None if image_outputs is None else image_outputs.pooler_output
    return getattr(output, "image_hidden_states", None)


def cache_from_output(output):
    """The key/value cache of a model output, whatever the transformers version."""
    return getattr(output, CACHE_ARGUMENT, None)


# Sub-modules that come after the encoder blocks in transformers' vision models: pooling heads, and final norms
# (`post_layernorm`, `layernorm`, `norm`, `rms_norm`, `fc_norm`, ...; a norm applied before the blocks is named
# `pre_*`, as CLIP's `pre_layrnorm`). They are never reached from a feature layer below the top (PIVOT's -2).
_POST_ENCODER_HEADS = ("head", "pooler")


# Weights a family keeps fixed by design (MAE's sin-cos position table is created with requires_grad=False).
_FIXED_BY_DESIGN = {"vit_mae": ("embeddings.position_embeddings",)}


def _is_post_encoder_module(name: str) -> bool:
    return name in _POST_ENCODER_HEADS or ("norm" in name and not name.startswith("pre"))


def find_encoder_layers(vision_tower: nn.Module) -> tuple[nn.Module, str, nn.ModuleList]:
    """Locate the list of transformer blocks of a vision tower: `(parent, attribute, layers)`.

    Every transformers ViT-like encoder keeps its blocks in one `nn.ModuleList` named `layers` or `layer` with
    `num_hidden_layers` entries (SigLIP/CLIP: `vision_model.encoder.layers`, DINOv2/ViT/MAE: `encoder.layer`).
    """
    num_layers = getattr(vision_tower.config, "num_hidden_layers", None)
    for module in vision_tower.modules():
        for attr in ("layers", "layer"):
            layers = getattr(module, attr, None)
            if isinstance(layers, nn.ModuleList) and (num_layers is None or len(layers) == num_layers):
                return module, attr, layers
    raise ValueError(
        f"Cannot find the transformer blocks of {type(vision_tower).__name__}: expected an nn.ModuleList named "
        "`layers` or `layer` with config.num_hidden_layers entries."
    )


def resolve_feature_layer(feature_layer: int, num_layers: int) -> int:
    """Index into `hidden_states` (0 = embeddings, i = output of block i) for a possibly negative feature layer."""
    index = feature_layer if feature_layer >= 0 else num_layers + 1 + feature_layer
    if not 0 <= index <= num_layers:
        raise ValueError(
            f"vision_feature_layer={feature_layer} cannot be reached by a vision tower with {num_layers} layers "
            f"(valid: -{num_layers + 1}..{num_layers}; the paper uses -2)."
        )
    return index


class _PassThrough(nn.Module):
    """Stands in for a final norm or pooling head in a per-call view of the tower: returns its first input."""

    def forward(self, hidden_states, *args, **kwargs):
        return hidden_states


class _CaptureOutput(nn.Module):
    """Runs the (truncated) encoder of a per-call view and keeps its output, the feature layer, in `self.captured`."""

    def __init__(self, encoder: nn.Module):
        super().__init__()
        self.encoder = encoder
        self.captured = None

    def forward(self, *args, **kwargs):
        output = self.encoder(*args, **kwargs)
        self.captured = output[0] if isinstance(output, (tuple, list)) else output.last_hidden_state
        return output


def _shallow_view(module: nn.Module, children: dict[str, nn.Module]) -> nn.Module:
    """A new module object sharing `module`'s parameters, buffers, hooks and children, except `children` replaced.

    Only the new object's own child table differs: `module` itself is not touched, so other calls (other threads,
    `nn.DataParallel` replicas) running the same module at the same time see it unchanged. `object.__new__` rather
    than `copy.copy`, because a class swapped in by FSDP2's `fully_shard` overrides `__new__`.
    """
    view = object.__new__(type(module))
    view.__dict__.update(module.__dict__)
    view.__dict__["_modules"] = {**module._modules, **children}
    # Per-instance callables bound to `module` would run `module` itself (its full block list, its final norm)
    # instead of the view: accelerate's device-map / offload hooks (`forward` = partial(new_forward, module) calling
    # `module._old_forward`, and a bound `forward` left behind by `remove_hook_from_module`) and `module.compile()`.
    # They are rebound to the view; a compiled call runs eager, as the view is a new object on every call.
    for name, value in module.__dict__.items():
        if isinstance(value, types.MethodType) and value.__self__ is module:
            view.__dict__[name] = types.MethodType(value.__func__, view)
        elif isinstance(value, functools.partial) and value.args and value.args[0] is module:
            rebound = functools.partial(value.func, view, *value.args[1:], **value.keywords)
            rebound.__dict__.update(value.__dict__)
            view.__dict__[name] = rebound
    if view.__dict__.get("_compiled_call_impl") is not None:
        view.__dict__["_compiled_call_impl"] = None
    return view


def _post_encoder_pass_throughs(owner: nn.Module, keep: str) -> dict[str, nn.Module]:
    return {
        name: _PassThrough()
        for name, child in owner._modules.items()
        if name != keep and child is not None and _is_post_encoder_module(name)
    }


def _truncated_tower(vision_tower: nn.Module, num_blocks: int) -> tuple[nn.Module, _CaptureOutput]:
    """A per-call view of `vision_tower` that runs its embeddings and first `num_blocks` blocks, and nothing after.

    The view is made of shallow copies of the modules on the path from the tower down to its block list; the blocks,
    embeddings and parameters are the tower's own (with any DeepSpeed / FSDP hooks on them). In the copies the block
    list is cut to `num_blocks` and the final norms and pooling heads beside the path are pass-throughs, so the
    tower's own `forward` computes exactly its hidden state after block `num_blocks` (0 = the embeddings) and skips
    everything no feature depends on. Returns `(view, capture)`: after `view(...)`, `capture.captured` holds the
    `(batch, tokens, hidden)` features. Nothing shared is mutated, so concurrent calls on one model are safe.
    """
    parent, attr, layers = find_encoder_layers(vision_tower)
    parent_name = next(name for name, module in vision_tower.named_modules() if module is parent)
    path = parent_name.split(".") if parent_name else []
    chain = [vision_tower]  # the modules from the tower down to the block list's owner
    for name in path:
        chain.append(chain[-1]._modules[name])
    encoder = _shallow_view(
        parent, {attr: nn.ModuleList(list(layers)[:num_blocks]), **_post_encoder_pass_throughs(parent, attr)}
    )
    capture = _CaptureOutput(encoder)
    view = capture
    for depth in range(len(path) - 1, -1, -1):
        owner = chain[depth]
        view = _shallow_view(owner, {**_post_encoder_pass_throughs(owner, path[depth]), path[depth]: view})
    return view, capture


def active_module(module: nn.Module) -> nn.Module:
    """The module that runs in place of `module`: for PEFT's `ModulesToSaveWrapper` (a part trained in full beside
    LoRA adapters) the trained copy of the active adapter, or the frozen original while adapters are disabled (the
    DPO reference pass); any other module is returned as is."""
    copies = getattr(module, "modules_to_save", None)
    original = getattr(module, "original_module", None)
    if not isinstance(copies, nn.ModuleDict) or not isinstance(original, nn.Module):
        return module
    active = module.active_adapters
    if module.disable_adapters or not active or active[0] not in copies:
        return original
    return copies[active[0]]


def encode_images(
    vision_tower: nn.Module,
    pixel_values: torch.Tensor,
    feature_layer: int | list[int] = -2,
    num_prefix_tokens: int | None = None,
    pixel_attention_mask: torch.Tensor | None = None,
    spatial_shapes: torch.Tensor | None = None,
    **vision_kwargs,
) -> torch.Tensor | list[torch.Tensor]:
    """Patch features of any transformers vision model at `feature_layer`, prefix tokens dropped.

    Works on a standalone encoder (`SiglipVisionModel`, `CLIPVisionModel`, `Dinov2Model`, `ViTModel`, an exported
    PIVOT encoder, ...) exactly as inside the MLLM, which is what makes vision-only probes of an exported encoder
    comparable with the MLLM's own features. Several feature layers are concatenated along channels (LLaVA's
    multi-layer option).

    Returns a `(batch, num_patches, hidden)` tensor, or for SigLIP2 NaFlex inputs a list with one
    `(num_valid_patches_i, hidden)` tensor per image (padding patches removed).
    """
    # A tower trained in full beside LoRA adapters sits in PEFT's wrapper, which holds two towers: the view is cut from
    # the one that runs now (LoRA layers inside the tower are ordinary submodules and need nothing).
    vision_tower = active_module(vision_tower)
    if isinstance(feature_layer, (list, tuple)):
        common = {"num_prefix_tokens": num_prefix_tokens, "pixel_attention_mask": pixel_attention_mask}
        per_layer = [
            encode_images(vision_tower, pixel_values, layer, spatial_shapes=spatial_shapes, **common, **vision_kwargs)
            for layer in feature_layer
        ]
        if isinstance(per_layer[0], list):
            return [torch.cat(feats, dim=-1) for feats in zip(*per_layer)]
        return torch.cat(per_layer, dim=-1)
    config = vision_tower.config
    if num_prefix_tokens is None:
        num_prefix_tokens = num_vision_prefix_tokens(config)
        if num_prefix_tokens is None:
            raise ValueError(
                f"Unknown vision family {config.model_type!r}: pass num_prefix_tokens (leading non-patch tokens)."
            )
    _, _, layers = find_encoder_layers(vision_tower)
    index = resolve_feature_layer(feature_layer, len(layers))

    inputs = dict(vision_kwargs)
    if spatial_shapes is not None:
        inputs["spatial_shapes"] = spatial_shapes
    if pixel_attention_mask is not None:
        inputs["pixel_attention_mask"] = pixel_attention_mask
    if config.model_type == "vit_mae" and "noise" not in inputs:
        # Ascending noise keeps the patch order (argsort is the identity); mask_ratio is 0 so nothing is dropped.
        num_patches = vision_tower.embeddings.patch_embeddings.num_patches
        if tuple(pixel_values.shape[-2:]) != tuple(vision_tower.embeddings.patch_embeddings.image_size):
            num_patches = (pixel_values.shape[-2] // config.patch_size) * (pixel_values.shape[-1] // config.patch_size)
            inputs.setdefault("interpolate_pos_encoding", True)
        inputs["noise"] = torch.arange(num_patches, device=pixel_values.device, dtype=torch.float32).expand(
            pixel_values.shape[0], -1
        )

    # A per-call view of the tower that stops at the feature layer: no block above it, no final norm, no pooling head
    # runs, and nothing on the shared model changes during the call.
    view, capture = _truncated_tower(vision_tower, index)
    view(pixel_values=pixel_values, **inputs)
    if capture.captured is None:
        raise RuntimeError(
            f"{type(vision_tower).__name__}.forward did not run its encoder's block list ({len(layers)} blocks): "
            "something replaced the forward of the tower or of a module between it and the blocks. Fix: remove "
            "that patch, or pass encode_images a tower whose forward reaches `encoder.layers`/`encoder.layer`."
        )
    features = capture.captured[:, num_prefix_tokens:]

    if pixel_attention_mask is not None:
        mask = pixel_attention_mask.to(torch.bool)
        return [feats[m] for feats, m in zip(features, mask)]
    return features


def transformer_block_class_names(vision_tower: nn.Module, language_model: nn.Module) -> list[str]:
    """The classes FSDP wraps one by one and `device_map` never splits: the tower's block and the LLM's decoder layer.

    transformers' `post_init` gathers `_no_split_modules` from the children, which for a tower taken from a dual
    encoder (SigLIP, SigLIP2, CLIP) names text-side classes that are not in a Pivot model; accelerate's FSDP2 wrap
    policy (`TRANSFORMER_BASED_WRAP` without a class list) then stops with "Could not find the transformer layer
    class ...". Every name returned here is the class of a module of the model.
    """
    _, _, blocks = find_encoder_layers(vision_tower)
    names = [type(blocks[0]).__name__] if len(blocks) else []
    present = {type(module).__name__ for module in language_model.modules()}
    names += sorted(n for n in (getattr(language_model, "_no_split_modules", None) or ()) if n in present)
    if len(names) < 2:  # an LLM that names no decoder layer: its block list, found as the tower's is
        _, _, decoder_layers = find_encoder_layers(language_model)
        names.append(type(decoder_layers[0]).__name__)
    return list(dict.fromkeys(names))


def _refuse_data_parallel_replica(module: nn.Module) -> None:
    """`nn.DataParallel` runs replicas whose parameters are not registered as parameters, and transformers'
    `PreTrainedModel.dtype` / `.device` then fail (StopIteration) deep inside the forward: stop with the fix."""
    if getattr(module, "_is_replica", False):
        raise RuntimeError(
            "A Pivot model cannot run under torch.nn.DataParallel (the Trainer uses it when several GPUs are visible "
            "to one process). Fix: start one process per GPU, e.g. `accelerate launch --num_processes N "
            "recipes/dpo.py ...` or `torchrun --nproc_per_node N ...` (DDP, or the ZeRO-3 / FSDP2 configs in "
            "accelerate_configs/), or make one GPU visible with CUDA_VISIBLE_DEVICES=0."
        )


class PivotMultiModalProjector(LlavaMultiModalProjector):
    """`mlp2x_gelu` (LLaVA-1.5's Linear -> GELU -> Linear, same parameter names), or a single `linear` layer."""

    def __init__(self, config: PivotConfig):
        super().__init__(config)
        if getattr(config, "projector_type", "mlp2x_gelu") == "linear":
            del self.act, self.linear_2

    def forward(self, image_features):
        hidden_states = self.linear_1(image_features)
        if hasattr(self, "linear_2"):
            hidden_states = self.linear_2(self.act(hidden_states))
        return hidden_states


class PivotPreTrainedModel(LlavaPreTrainedModel):
    config_class = PivotConfig
    config: PivotConfig


class PivotModel(LlavaModel):
    config_class = PivotConfig

    def __init__(self, config: PivotConfig):
        # LlavaModel.__init__ is skipped on purpose: it would build a LLaVA projector only to throw it away.
        LlavaPreTrainedModel.__init__(self, config)
        self.vision_tower = AutoModel.from_config(config.vision_config)
        self.multi_modal_projector = PivotMultiModalProjector(config)
        self.language_model = AutoModel.from_config(config.text_config)
        self.post_init()
        self._no_split_modules = transformer_block_class_names(self.vision_tower, self.language_model)

    def get_vision_features(
        self,
        pixel_values: torch.Tensor,
        pixel_attention_mask: torch.Tensor | None = None,
        spatial_shapes: torch.Tensor | None = None,
        vision_feature_layer: int | list[int] | None = None,
        **kwargs,
    ) -> torch.Tensor | list[torch.Tensor]:
        """Encoder features at the feature layer(s), before the projector (what PIVOT trains and exports)."""
        _refuse_data_parallel_replica(self)
        layer = self.config.vision_feature_layer if vision_feature_layer is None else vision_feature_layer
        return encode_images(
            self.vision_tower,
            pixel_values.to(self.vision_tower.dtype),
            layer,
            num_prefix_tokens=self.config.vision_num_prefix_tokens,
            pixel_attention_mask=pixel_attention_mask,
            spatial_shapes=spatial_shapes,
        )

    def get_image_features(
        self,
        pixel_values: torch.Tensor,
        pixel_attention_mask: torch.Tensor | None = None,
        spatial_shapes: torch.Tensor | None = None,
        vision_feature_layer: int | list[int] | None = None,
        vision_feature_select_strategy: str | None = None,
        **kwargs,
    ) -> BaseModelOutputWithPooling:
        """Projected visual tokens, one `(num_tokens_i, text_hidden)` tensor per image in `pooler_output`."""
        features = self.get_vision_features(
            pixel_values,
            pixel_attention_mask=pixel_attention_mask,
            spatial_shapes=spatial_shapes,
            vision_feature_layer=vision_feature_layer,
        )
        if isinstance(features, list):
            projected = [self.multi_modal_projector(f) for f in features]
        else:
            projected = list(self.multi_modal_projector(features))
        return BaseModelOutputWithPooling(last_hidden_state=features, pooler_output=projected)

    def get_placeholder_mask(self, input_ids, inputs_embeds, image_features):
        if input_ids is None:
            image_embed = self.get_input_embeddings()(
                torch.tensor(self.config.image_token_id, dtype=torch.long, device=inputs_embeds.device)
            )
            mask = (inputs_embeds == image_embed).all(-1)
        else:
            mask = input_ids == self.config.image_token_id
        num_tokens, num_features = int(mask.sum()), image_features.shape[0]
        if num_tokens != num_features:
            raise ValueError(
                f"The text holds {num_tokens} image tokens but the vision tower produced {num_features} image "
                "features. Build inputs with the model's PivotProcessor (it expands each <image> to the encoder's "
                "token count) and make sure truncation (max_length) does not cut image tokens: drop rows whose image "
                "tokens plus text exceed max_length before training."
            )
        return mask.unsqueeze(-1).expand_as(inputs_embeds).to(inputs_embeds.device)

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        pixel_values: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache=None,
        inputs_embeds: torch.Tensor | None = None,
        vision_feature_layer: int | list[int] | None = None,
        vision_feature_select_strategy: str | None = None,
        image_sizes: torch.Tensor | None = None,
        mm_encoder_outputs: dict | None = None,
        pixel_attention_mask: torch.Tensor | None = None,
        spatial_shapes: torch.Tensor | None = None,
        image_features: list[torch.Tensor] | torch.Tensor | None = None,
        **kwargs,
    ) -> LlavaModelOutputWithPast:
        """LLaVA's forward, plus NaFlex inputs and `image_features`: already projected visual tokens (one tensor per
        image, or `(num_images, tokens, hidden)`), so callers can encode an image once and reuse it for several
        sequences (chosen and rejected answers of a preference pair).

        `cache` is the key/value cache (`past_key_values` before transformers 5.24; both spellings are accepted)."""
        _refuse_data_parallel_replica(self)
        if cache is None:
            cache = kwargs.pop("past_key_values", None)
        kwargs.pop("past_key_values", None)
        if (input_ids is None) ^ (inputs_embeds is not None):
            raise ValueError("You must specify exactly one of input_ids or inputs_embeds")
        pair_forward = getattr(self, "pair_forward", None)
        plain_inputs = cache is None and image_features is None and inputs_embeds is None
        if pair_forward is not None and plain_inputs and mm_encoder_outputs is None:
            # Installed at runtime by pivot_hf's DPO trainer (a plain attribute, so checkpoints never depend on it):
            # chosen and rejected rows of a preference pair share their image and prompt, computed once.
            return pair_forward(
                self,
                input_ids=input_ids,
                pixel_values=pixel_values,
                attention_mask=attention_mask,
                position_ids=position_ids,
                pixel_attention_mask=pixel_attention_mask,
                spatial_shapes=spatial_shapes,
                vision_feature_layer=vision_feature_layer,
                **kwargs,
            )
        if inputs_embeds is None:
            inputs_embeds = self.get_input_embeddings()(input_ids)

        if image_features is None:
            mm_encoder_outputs = mm_encoder_outputs or {}
            if mm_encoder_outputs.get("image") is None and pixel_values is not None:
                mm_encoder_outputs["image"] = self.get_image_features(
                    pixel_values,
                    pixel_attention_mask=pixel_attention_mask,
                    spatial_shapes=spatial_shapes,
                    vision_feature_layer=vision_feature_layer,
                )
            if mm_encoder_outputs.get("image") is not None:
                image_features = mm_encoder_outputs["image"].pooler_output
        if image_features is not None:
            if not isinstance(image_features, torch.Tensor):
                image_features = torch.cat(list(image_features), dim=0)
            image_features = image_features.reshape(-1, image_features.shape[-1])
            image_features = image_features.to(inputs_embeds.device, inputs_embeds.dtype)
            mask = self.get_placeholder_mask(input_ids, inputs_embeds=inputs_embeds, image_features=image_features)
            inputs_embeds = inputs_embeds.masked_scatter(mask, image_features)

        kwargs[CACHE_ARGUMENT] = cache
        outputs = self.language_model(
            attention_mask=attention_mask, position_ids=position_ids, inputs_embeds=inputs_embeds, **kwargs
        )
        return model_output(
            outputs.last_hidden_state,
            cache=cache_from_output(outputs),
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            image_features=image_features,
        )


class PivotForConditionalGeneration(LlavaForConditionalGeneration):
    """The MLLM PIVOT post-trains: `vision_tower` (any family) -> `multi_modal_projector` -> `language_model`."""

    config_class = PivotConfig
    config: PivotConfig

    def __init__(self, config: PivotConfig):
        # LlavaForConditionalGeneration.__init__ is skipped on purpose: it would allocate a whole LlavaModel first.
        LlavaPreTrainedModel.__init__(self, config)
        self.model = PivotModel(config)
        self.lm_head = nn.Linear(config.text_config.hidden_size, config.text_config.vocab_size, bias=False)
        self.post_init()
        self._no_split_modules = list(self.model._no_split_modules)

    # ----------------------------------------------------------------------------------------------------- features
    @property
    def vision_tower(self) -> nn.Module:
        return self.model.vision_tower

    @property
    def multi_modal_projector(self) -> nn.Module:
        return self.model.multi_modal_projector

    @property
    def language_model(self) -> nn.Module:
        return self.model.language_model

    def get_vision_features(self, pixel_values, **kwargs):
        """Encoder features at `config.vision_feature_layer`, prefix tokens dropped, before the projector."""
        return self.model.get_vision_features(pixel_values, **kwargs)

    def get_image_features(self, pixel_values, **kwargs):
        return self.model.get_image_features(pixel_values, **kwargs)

    def forward(
        self,
        input_ids=None,
        pixel_values=None,
        attention_mask=None,
        position_ids=None,
        cache=None,
        inputs_embeds=None,
        vision_feature_layer=None,
        vision_feature_select_strategy=None,
        labels=None,
        logits_to_keep=0,
        image_sizes=None,
        mm_encoder_outputs=None,
        pixel_attention_mask=None,
        spatial_shapes=None,
        image_features=None,
        **kwargs,
    ):
        if cache is None:
            cache = kwargs.pop("past_key_values", None)
        kwargs.pop("past_key_values", None)
        kwargs[CACHE_ARGUMENT] = cache
        return super().forward(
            input_ids=input_ids,
            pixel_values=pixel_values,
            attention_mask=attention_mask,
            position_ids=position_ids,
            inputs_embeds=inputs_embeds,
            vision_feature_layer=vision_feature_layer,
            vision_feature_select_strategy=vision_feature_select_strategy,
            labels=labels,
            logits_to_keep=logits_to_keep,
            image_sizes=image_sizes,
            mm_encoder_outputs=mm_encoder_outputs,
            pixel_attention_mask=pixel_attention_mask,
            spatial_shapes=spatial_shapes,
            image_features=image_features,
            **kwargs,
        )

    def save_pretrained(self, save_directory, *args, **kwargs):
        # `register_for_auto_class` only maps the class being saved; the base model (`AutoModel`) is in the same
        # remote-code file, so map it too: `AutoModel.from_pretrained(ckpt, trust_remote_code=True)` then works.
        auto_map = getattr(self.config, "auto_map", None)
        if isinstance(auto_map, dict) and "AutoModelForImageTextToText" in auto_map:
            auto_map.setdefault("AutoModel", "modeling_pivot.PivotModel")
        return super().save_pretrained(save_directory, *args, **kwargs)

    def unreached_vision_parameter_names(self) -> list[str]:
        """Vision-tower parameters that no gradient can reach from the feature layer (blocks above it, final norms,
        pooling heads), and those a family keeps fixed by design. They are frozen when the tower trains: DDP would otherwise wait forever for their gradients,
        and checks that "every trainable weight changed" would fail on them."""
        tower = self.model.vision_tower
        parent, attr, layers = find_encoder_layers(tower)
        layer_ids = self.config.vision_feature_layer
        layer_ids = layer_ids if isinstance(layer_ids, list) else [layer_ids]
        used_blocks = max(resolve_feature_layer(i, len(layers)) for i in layer_ids)
        layers_prefix = next(name for name, module in tower.named_modules() if module is layers)
        parent_prefix = next(name for name, module in tower.named_modules() if module is parent)
        unreached = []
        fixed = _FIXED_BY_DESIGN.get(tower.config.model_type, ())
        for name, _ in tower.named_parameters():
            if name in fixed:
                unreached.append(name)
                continue
            if name.split(".")[-1] == "mask_token":  # only used for masked-image-modeling inputs, never here
                unreached.append(name)
                continue
            if name.startswith(layers_prefix + "."):
                block = int(name[len(layers_prefix) + 1 :].split(".")[0])
                if block >= used_blocks:
                    unreached.append(name)
                continue
            # A post-encoder module is a sibling of the encoder (or of the block list) with a known name.
            parts = name.split(".")
            outer = parent_prefix.rsplit(".", 1)[0] if "." in parent_prefix else ""
            for depth in range(len(parts) - 1):
                owner = ".".join(parts[:depth])
                if _is_post_encoder_module(parts[depth]) and owner in (outer, parent_prefix, ""):
                    unreached.append(name)
                    break
        return [f"model.vision_tower.{n}" for n in unreached]

    # -------------------------------------------------------------------------------------------------- composition
    @classmethod
    def from_vision_text_pretrained(
        cls,
        vision_model_name_or_path: str,
        text_model_name_or_path: str,
        vision_feature_layer: int | list[int] | None = None,
        projector_type: str = "mlp2x_gelu",
        image_token_index: int | None = None,
        tokenizer=None,
        torch_dtype: torch.dtype | str | None = None,
        attn_implementation: str | None = None,
        vision_kwargs: dict | None = None,
        text_kwargs: dict | None = None,
        image_token: str | None = None,
        **config_kwargs,
    ) -> "PivotForConditionalGeneration":
        """Compose a new Pivot MLLM from a pretrained vision encoder and a pretrained causal LM (Hub ids or folders).

        The vision checkpoint may be a vision model (`SiglipVisionModel`, `Dinov2Model`, ...) or a dual encoder
        (`google/siglip2-so400m-patch16-384`, `openai/clip-vit-large-patch14-336`), whose vision half is taken. The
        projector is freshly initialised. `vision_feature_layer` defaults to the layer an exported PIVOT encoder
        records (`pivot_vision_feature_layer`), else -2 (the penultimate block, as in the paper).

        The image token and the vocabulary follow one rule, shared with `PivotProcessor.from_vision_text_pretrained`
        (`processing_pivot.prepare_tokenizer`): the image token's id is the tokenizer's, and the embeddings get
        `max(vocab_size, len(tokenizer))` rows, so model and processor composed from the same folders agree. Without
        `tokenizer`, the text folder's tokenizer is loaded and prepared here. `tokenizer` may be the processor's
        tokenizer or the `PivotProcessor` itself (its `image_token` is then used). `image_token_index` and
        `image_token`, when given, must agree with that tokenizer (`ValueError` naming both otherwise); only when the
        text folder has no tokenizer is `image_token_index` used as given (default: appended after the vocabulary).
        """
        vision_kwargs = dict(vision_kwargs or {})
        text_kwargs = dict(text_kwargs or {})
        common = {}
        if torch_dtype is not None:
            common["dtype"] = torch_dtype
        if attn_implementation is not None:
            common["attn_implementation"] = attn_implementation

        vision_config = vision_config_from_any(AutoConfig.from_pretrained(vision_model_name_or_path, **vision_kwargs))
        vision_class = AutoModel._model_mapping[type(vision_config)]
        vision_tower = vision_class.from_pretrained(
            vision_model_name_or_path, config=vision_config, **vision_kwargs, **common
        )
        # Recorded for the exported encoder's model card (`base_model`); an encoder that is itself a PIVOT export
        # keeps the id of the encoder it came from.
        if not getattr(vision_tower.config, "pivot_base_vision_model", None) and not os.path.exists(
            str(vision_model_name_or_path)
        ):
            vision_tower.config.pivot_base_vision_model = str(vision_model_name_or_path)
        if tokenizer is None:
            tokenizer = _load_text_tokenizer(text_model_name_or_path, text_kwargs)
        language_model = AutoModelForCausalLM.from_pretrained(text_model_name_or_path, **text_kwargs, **common)
        return cls.from_vision_text_models(
            vision_tower,
            language_model,
            vision_feature_layer=vision_feature_layer,
            projector_type=projector_type,
            image_token_index=image_token_index,
            tokenizer=tokenizer,
            image_token=image_token,
            **config_kwargs,
        )

    @classmethod
    def from_vision_text_models(
        cls,
        vision_tower: nn.Module,
        language_model: nn.Module,
        vision_feature_layer: int | list[int] | None = None,
        projector_type: str = "mlp2x_gelu",
        image_token_index: int | None = None,
        tokenizer=None,
        image_token: str | None = None,
        **config_kwargs,
    ) -> "PivotForConditionalGeneration":
        """Compose from already-instantiated models (weights are moved, not copied).

        Image token and vocabulary as in `from_vision_text_pretrained`; without `tokenizer`, the one saved with the
        language model (`name_or_path`) is used when there is one.
        """
        if vision_feature_layer is None:
            # An exported PIVOT encoder records the layer it was trained at (-1 once truncated to it); else -2.
            vision_feature_layer = getattr(vision_tower.config, "pivot_vision_feature_layer", None)
            vision_feature_layer = -2 if vision_feature_layer is None else vision_feature_layer
        text_config = copy.deepcopy(language_model.config)
        if tokenizer is None:
            tokenizer = _load_text_tokenizer(getattr(language_model, "name_or_path", None) or "", {})
        image_token_index, vocab_size = image_token_and_vocab(
            tokenizer, text_config.vocab_size, image_token=image_token, image_token_index=image_token_index
        )

        config_kwargs.setdefault("vision_num_prefix_tokens", num_vision_prefix_tokens(vision_tower.config))
        if config_kwargs["vision_num_prefix_tokens"] is None:
            config_kwargs["vision_num_prefix_tokens"] = _probe_prefix_tokens(vision_tower)
        backbone = getattr(language_model, language_model.base_model_prefix)
        # The sub-configs are the live configs of the two models, as in a model built from a PivotConfig.
        config = PivotConfig(
            vision_config=vision_tower.config,
            text_config=backbone.config,
            vision_feature_layer=vision_feature_layer,
            projector_type=projector_type,
            image_token_index=image_token_index,
            tie_word_embeddings=bool(getattr(text_config, "tie_word_embeddings", False)),
            **config_kwargs,
        )
        config.vision_config, config.text_config = vision_tower.config, backbone.config
        if config.vision_config.model_type == "vit_mae":
            config.vision_config.mask_ratio = 0.0
        with torch.device("meta"):
            model = cls(config)
        model.model.vision_tower = vision_tower
        model.model.language_model = backbone
        model.lm_head = language_model.get_output_embeddings()
        param = next(backbone.parameters())
        model.model.multi_modal_projector = PivotMultiModalProjector(config).to(device=param.device, dtype=param.dtype)
        model._init_projector()
        if vocab_size != model.get_input_embeddings().weight.shape[0]:
            model.resize_token_embeddings(vocab_size, mean_resizing=False)
        if config.tie_word_embeddings:
            model.tie_weights()
        model.config.text_config.vocab_size = model.get_input_embeddings().weight.shape[0]
        generation_config = getattr(language_model, "generation_config", None)
        if generation_config is not None:
            model.generation_config = copy.deepcopy(generation_config)
        return model

    def _init_projector(self):
        std = getattr(self.config.text_config, "initializer_range", 0.02)
        for module in self.model.multi_modal_projector.modules():
            if isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, std=std)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)

    # ---------------------------------------------------------------------------------------- LLaVA interoperability
    def to_llava(self) -> LlavaForConditionalGeneration:
        """The same weights as transformers' `LlavaForConditionalGeneration` (serving engines, lmms-eval `llava_hf`).

        LLaVA's feature path takes `hidden_states[vision_feature_layer]` and drops one CLS token or none, so this is
        exact for towers with 0 or 1 prefix tokens and a `mlp2x_gelu` projector (SigLIP, SigLIP2 fixed-resolution,
        CLIP, DINOv2 without registers, ViT).
        """
        config = self.config
        if config.projector_type != "mlp2x_gelu" or config.vision_num_prefix_tokens not in (0, 1):
            raise ValueError(
                "LLaVA conversion needs a mlp2x_gelu projector and a tower with 0 or 1 prefix tokens; got "
                f"projector_type={config.projector_type!r}, vision_num_prefix_tokens={config.vision_num_prefix_tokens}."
            )
        if config.vision_config.model_type in ("vit_mae", "siglip2_vision_model"):
            raise ValueError(f"LLaVA cannot run a {config.vision_config.model_type} tower like Pivot does.")
        return _transplant(self, LlavaForConditionalGeneration, LlavaConfig(**_llava_config_kwargs(config)))

    @classmethod
    def from_llava(cls, llava: LlavaForConditionalGeneration, **config_kwargs) -> "PivotForConditionalGeneration":
        """Wrap a transformers LLaVA model (e.g. `llava-hf/llava-1.5-7b-hf`) as a Pivot model, weights shared."""
        kwargs = _llava_config_kwargs(llava.config)
        kwargs["vision_num_prefix_tokens"] = 1 if llava.config.vision_feature_select_strategy == "default" else 0
        kwargs.update(config_kwargs)
        return _transplant(llava, cls, PivotConfig(**kwargs))


def _load_text_tokenizer(text_model_name_or_path, text_kwargs: dict):
    """The tokenizer saved with the LLM, or None when the folder has none (a weights-only checkpoint)."""
    from transformers import AutoTokenizer

    if not text_model_name_or_path:
        return None
    keep = ("revision", "cache_dir", "token", "trust_remote_code", "local_files_only", "subfolder")
    try:
        return AutoTokenizer.from_pretrained(
            text_model_name_or_path, **{k: v for k, v in text_kwargs.items() if k in keep}
        )
    except (OSError, ValueError, TypeError):
        return None


def image_token_and_vocab(
    tokenizer, text_vocab_size: int, image_token: str | None = None, image_token_index: int | None = None
) -> tuple[int, int]:
    """`(image_token_id, embedding_rows)` of a Pivot model composed with `tokenizer` (prepared in place).

    The rule of `processing_pivot.prepare_tokenizer`: the image token is a special token of the tokenizer and its id is
    the model's; embeddings get `max(text_vocab_size, len(tokenizer))` rows, so every added token (image, ChatML
    markers of a base LLM) has one. `tokenizer` may be a `PivotProcessor`. Explicit arguments that disagree with the
    tokenizer raise `ValueError` naming both values. Without a tokenizer: `image_token_index` (default
    `text_vocab_size`, appended after the vocabulary).
    """
    if tokenizer is None:
        image_token_index = text_vocab_size if image_token_index is None else int(image_token_index)
        return image_token_index, max(text_vocab_size, image_token_index + 1)
    if hasattr(tokenizer, "tokenizer") and hasattr(tokenizer, "image_token"):  # a PivotProcessor
        processor_token, tokenizer = tokenizer.image_token, tokenizer.tokenizer
    else:
        processor_token = getattr(tokenizer, "image_token", None)
    if image_token is not None and processor_token is not None and image_token != processor_token:
        raise ValueError(
            f"image_token={image_token!r} conflicts with the tokenizer's image token {processor_token!r}. Fix: pass "
            "the same token to the processor and the model, or leave `image_token` unset to use the tokenizer's."
        )
    image_token = image_token or processor_token or DEFAULT_IMAGE_TOKEN
    prepare_tokenizer(tokenizer, image_token)
    token_id = tokenizer.convert_tokens_to_ids(image_token)
    if image_token_index is not None and int(image_token_index) != token_id:
        raise ValueError(
            f"image_token_index={image_token_index} conflicts with the tokenizer, where {image_token!r} is id "
            f"{token_id}. Fix: leave `image_token_index` unset (the tokenizer's id is used), or pass the tokenizer "
            "whose image token has that id."
        )
    return token_id, max(text_vocab_size, len(tokenizer))


def _transplant(source: nn.Module, target_class, config) -> nn.Module:
    """Build `target_class(config)` around the tensors of `source` (same module tree), without copying weights."""
    with torch.device("meta"):
        target = target_class(config)
    target.load_state_dict(source.state_dict(), assign=True, strict=True)
    # Non-persistent buffers (rotary frequencies, position ids) are not in the state dict: take them over as well.
    for name, buffer in source.named_buffers():
        module_name, _, buffer_name = name.rpartition(".")
        target.get_submodule(module_name).register_buffer(buffer_name, buffer, persistent=False)
    if config.tie_word_embeddings:
        target.tie_weights()
    target.generation_config = copy.deepcopy(source.generation_config)
    return target


def _llava_config_kwargs(config) -> dict:
    names = [
        "image_token_index",
        "image_seq_length",
        "projector_hidden_act",
        "vision_feature_select_strategy",
        "vision_feature_layer",
        "multimodal_projector_bias",
        "tie_word_embeddings",
    ]
    kwargs = {name: getattr(config, name) for name in names if hasattr(config, name)}
    kwargs["vision_config"] = config.vision_config.to_dict()
    kwargs["text_config"] = config.text_config.to_dict()
    return kwargs


@torch.no_grad()
def _probe_prefix_tokens(vision_tower: nn.Module) -> int:
    """For a vision family not in the table: run one blank image and count tokens beyond the patch grid."""
    config = vision_tower.config
    size = config.image_size if isinstance(config.image_size, int) else config.image_size[0]
    patch = config.patch_size if isinstance(config.patch_size, int) else config.patch_size[0]
    channels = getattr(config, "num_channels", 3)
    param = next(vision_tower.parameters())
    pixels = torch.zeros(1, channels, size, size, dtype=param.dtype, device=param.device)
    accepts = inspect.signature(vision_tower.forward).parameters
    kwargs = {"output_hidden_states": True} if "output_hidden_states" in accepts or "kwargs" in accepts else {}
    out = vision_tower(pixel_values=pixels, **kwargs)
    return int(out.last_hidden_state.shape[1] - (size // patch) ** 2)


__all__ = [
    "PivotForConditionalGeneration",
    "PivotModel",
    "PivotPreTrainedModel",
    "PivotMultiModalProjector",
    "encode_images",
    "find_encoder_layers",
    "resolve_feature_layer",
    "transformer_block_class_names",
]
