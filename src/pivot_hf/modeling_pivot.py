"""Pivot MLLM: any transformers vision encoder -> 2-layer MLP projector -> any causal LM, LLaVA-style.

The module tree and parameter names are those of transformers' `LlavaForConditionalGeneration`
(`model.vision_tower`, `model.multi_modal_projector`, `model.language_model`, `lm_head`), so that a Pivot checkpoint
converts to and from the LLaVA format by renaming nothing, and the classes follow `modeling_llava.py`'s conventions
(output classes, `return_dict=False` tuples, per-image `image_outputs`, `GenerationMixin`). What differs is how visual
features are taken from the tower, which must work for every encoder family PIVOT is applied to:

- the tower is cut at the feature layer once, when the model is built (`cut_at_feature_layer`): the blocks after it
  never run (with the default `vision_feature_layer=-2` the last block, the final norm and any pooling head never see
  data, as in the authors' recipe, which deletes them), while their weights stay in the checkpoint under their names;
- leading CLS / register tokens are dropped per family (SigLIP keeps every patch);
- SigLIP2 NaFlex inputs (`pixel_attention_mask`, `spatial_shapes`) give a variable number of tokens per image;
- ViT-MAE runs unmasked and in patch order.

Only `transformers`, `torch` and sibling files are imported here: this file is copied next to saved checkpoints so
they load with `trust_remote_code=True` where pivot_hf is not installed. What differs between transformers versions
lives in `pivot_compat.py`.
"""

import copy
import functools
import inspect
import itertools
import os

import torch
from torch import nn
from transformers import (
    MODEL_MAPPING,
    AutoConfig,
    AutoModelForCausalLM,
    GenerationMixin,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaModel,
    LlavaPreTrainedModel,
)
from transformers.modeling_outputs import BaseModelOutputWithPooling
from transformers.models.llava.modeling_llava import LlavaMultiModalProjector
from transformers.processing_utils import Unpack
from transformers.utils import TransformersKwargs, torch_compilable_check
from transformers.utils.generic import can_return_tuple

from .configuration_pivot import (
    PivotConfig,
    num_vision_prefix_tokens,
    vision_config_from_any,
    warn_if_untested_transformers,
)
from .pivot_compat import (
    CACHE_ARGUMENT,
    accepts_old_cache_name,
    cache_from_output,
    causal_lm_output,
    image_outputs_from_features,
    model_output,
    output_image_features,
)
from .processing_pivot import DEFAULT_IMAGE_TOKEN, prepare_tokenizer


warn_if_untested_transformers()


# Sub-modules that come after the encoder blocks in transformers' vision models: pooling heads, and final norms
# (`post_layernorm`, `layernorm`, `norm`, `rms_norm`, `fc_norm`, ...; a norm applied before the blocks is named
# `pre_*`, as CLIP's `pre_layrnorm`). They are never reached from a feature layer below the top (PIVOT's -2).
_POST_ENCODER_HEADS = ("head", "pooler")


# Weights a family keeps fixed by design (MAE's sin-cos position table is created with requires_grad=False).
_FIXED_BY_DESIGN = {"vit_mae": ("embeddings.position_embeddings",)}

# What a caller may ask of the tower through the model's forward / `get_image_features` (LLaVA forwards its kwargs).
_VISION_OUTPUT_FLAGS = ("output_hidden_states", "output_attentions")


def _is_post_encoder_module(name: str) -> bool:
    return name in _POST_ENCODER_HEADS or ("norm" in name and not name.startswith("pre"))


def find_encoder_layers(vision_tower: nn.Module) -> tuple[nn.Module, str, nn.ModuleList]:
    """Locate the list of transformer blocks of a vision tower: `(parent, attribute, layers)`.

    Every transformers ViT-like encoder keeps its blocks in one `nn.ModuleList` named `layers` or `layer` with
    `num_hidden_layers` entries (SigLIP/CLIP: `encoder.layers`, DINOv2/ViT/MAE: `encoder.layer`).
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


def _feature_indices(feature_layer: int | list[int], num_layers: int) -> list[int]:
    layers = feature_layer if isinstance(feature_layer, (list, tuple)) else [feature_layer]
    return [resolve_feature_layer(int(layer), num_layers) for layer in layers]


# ------------------------------------------------------------------------------------------ the feature-layer cut
class FeatureLayerBlocks(nn.ModuleList):
    """The block list of a vision tower cut at its feature layer.

    Iterating it, which is how every transformers encoder runs its blocks (`for layer in self.layers`), yields the first
    `num_used` blocks only. Indexing, `len()`, `named_parameters()` and the state dict still see every block, so the
    weights above the feature layer keep their names (checkpoints, encoder export, LLaVA conversion) but never run.
    """

    def __init__(self, modules=None, num_used: int | None = None):
        super().__init__(modules)
        self.num_used = len(self) if num_used is None else int(num_used)

    def __iter__(self):
        return itertools.islice(super().__iter__(), self.num_used)

    def extra_repr(self) -> str:
        return f"runs {self.num_used} of {len(self)} blocks"


class _Unapplied:
    """Mixed into the class of a final norm or pooling head of a cut tower: the module returns its input."""

    _unapplied_base: type

    def forward(self, hidden_states, *args, **kwargs):
        return hidden_states

    def __reduce_ex__(self, protocol):
        # The class is made at runtime, so pickle (`torch.save(model)`, multiprocessing) cannot find it by name:
        # rebuild it from the original class, then restore the state as usual.
        return (_rebuild_unapplied, (self._unapplied_base,), *super().__reduce_ex__(protocol)[2:])


@functools.cache
def _unapplied_class(cls: type) -> type:
    # A subclass, as FSDP2's `fully_shard` makes one: `isinstance` checks (weight init, wrap policies) still hold.
    return type(f"Unapplied{cls.__name__}", (_Unapplied, cls), {"__module__": __name__, "_unapplied_base": cls})


def _rebuild_unapplied(cls: type) -> nn.Module:
    unapplied = _unapplied_class(cls)
    return unapplied.__new__(unapplied)


def _post_encoder_modules(vision_tower: nn.Module, parent: nn.Module, attr: str) -> list[tuple[nn.Module, str]]:
    """`(owner, name)` of the final norms and pooling heads beside the path from the tower down to its block list."""
    parent_name = next(name for name, module in vision_tower.named_modules() if module is parent)
    path = parent_name.split(".") if parent_name else []
    owners, keep = [vision_tower], path + [attr]
    for name in path:
        owners.append(owners[-1]._modules[name])
    return [
        (owner, name)
        for owner, kept in zip(owners, keep)
        for name, child in owner._modules.items()
        if name != kept and child is not None and _is_post_encoder_module(name)
    ]


def cut_at_feature_layer(vision_tower: nn.Module, feature_layer: int | list[int]) -> nn.Module:
    """Cut `vision_tower` in place so that its forward stops at `feature_layer` (the deepest one, for a list).

    The block list becomes a `FeatureLayerBlocks` that runs the blocks up to the feature layer, and the final norms and
    pooling heads become pass-throughs (same class, plus `_Unapplied`): the tower's own forward then returns the hidden
    state after block `index` (0 = the embeddings) as `last_hidden_state`, and its `hidden_states` hold the embeddings
    and the blocks that ran. Parameter names and values are untouched, so a cut tower saves, exports and converts to
    LLaVA exactly as the whole one. Done once when a Pivot model is built; calling it again moves the cut.
    """
    parent, attr, layers = find_encoder_layers(vision_tower)
    index = max(_feature_indices(feature_layer, len(layers)))
    if isinstance(layers, FeatureLayerBlocks):
        layers.num_used = index
    else:
        setattr(parent, attr, FeatureLayerBlocks(list(layers), num_used=index))
    for owner, name in _post_encoder_modules(vision_tower, parent, attr):
        module = getattr(owner, name)
        if not isinstance(module, _Unapplied):
            module.__class__ = _unapplied_class(type(module))
    return vision_tower


def _tower_inputs(config, pixel_values, pixel_attention_mask=None, spatial_shapes=None, **vision_kwargs) -> dict:
    inputs = dict(vision_kwargs)
    if spatial_shapes is not None:
        inputs["spatial_shapes"] = spatial_shapes
    if pixel_attention_mask is not None:
        inputs["pixel_attention_mask"] = pixel_attention_mask
    if config.model_type == "vit_mae" and "noise" not in inputs:
        # Ascending noise keeps the patch order (argsort is the identity); mask_ratio is 0 so nothing is dropped.
        size = config.image_size if isinstance(config.image_size, (list, tuple)) else (config.image_size,) * 2
        height, width = pixel_values.shape[-2:]
        if (height, width) != tuple(size):
            inputs.setdefault("interpolate_pos_encoding", True)
        num_patches = (height // config.patch_size) * (width // config.patch_size)
        inputs["noise"] = torch.arange(num_patches, device=pixel_values.device, dtype=torch.float32).expand(
            pixel_values.shape[0], -1
        )
    return inputs


def _run_tower(
    vision_tower: nn.Module,
    config,
    pixel_values: torch.Tensor,
    indices: list[int],
    cut: int | None,
    num_prefix_tokens: int,
    pixel_attention_mask: torch.Tensor | None = None,
    spatial_shapes: torch.Tensor | None = None,
    **vision_kwargs,
) -> tuple[BaseModelOutputWithPooling, torch.Tensor | list[torch.Tensor]]:
    """One call of the tower: `(its output, patch features at hidden_states indices)`, see `encode_images`.

    `cut`: the block the tower stops at (`cut_at_feature_layer`), whose output is `last_hidden_state`; other indices are
    read from `hidden_states`. A layer deeper than the cut (an evaluation reading another layer) runs the tower that far
    for this call only. The tower's `hidden_states` are returned only when `output_hidden_states` asks for them.
    """
    if cut is not None and max(indices) > cut:
        _, _, layers = find_encoder_layers(vision_tower)
        layers.num_used = max(indices)
        try:
            return _run_tower(
                vision_tower,
                config,
                pixel_values,
                indices,
                max(indices),
                num_prefix_tokens,
                pixel_attention_mask,
                spatial_shapes,
                **vision_kwargs,
            )
        finally:
            layers.num_used = cut
    inputs = _tower_inputs(config, pixel_values, pixel_attention_mask, spatial_shapes, **vision_kwargs)
    wanted = inputs.pop("output_hidden_states", None)
    needed = any(index != cut for index in indices)
    outputs = vision_tower(
        pixel_values=pixel_values, output_hidden_states=bool(wanted or needed), return_dict=True, **inputs
    )
    selected = [outputs.last_hidden_state if index == cut else outputs.hidden_states[index] for index in indices]
    if needed and not wanted:
        outputs.hidden_states = None
    features = selected[0] if len(selected) == 1 else torch.cat(selected, dim=-1)
    features = features[:, num_prefix_tokens:]
    if pixel_attention_mask is not None:
        mask = pixel_attention_mask.to(torch.bool)
        features = [feats[valid] for feats, valid in zip(features, mask)]
    return outputs, features


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
    comparable with the MLLM's own features: the feature is `hidden_states[index]` (the output of block `index`, before
    any final norm), read from one run of the tower. A tower cut by `cut_at_feature_layer` runs up to its cut, or for a
    deeper `feature_layer` that far for this call only. Several feature layers are concatenated along channels (LLaVA's
    multi-layer option).

    Returns a `(batch, num_patches, hidden)` tensor, or for SigLIP2 NaFlex inputs a list with one
    `(num_valid_patches_i, hidden)` tensor per image (padding patches removed).
    """
    config = vision_tower.config
    if num_prefix_tokens is None:
        num_prefix_tokens = num_vision_prefix_tokens(config)
        if num_prefix_tokens is None:
            raise ValueError(
                f"Unknown vision family {config.model_type!r}: pass num_prefix_tokens (leading non-patch tokens)."
            )
    _, _, layers = find_encoder_layers(vision_tower)
    cut = layers.num_used if isinstance(layers, FeatureLayerBlocks) else None
    _, features = _run_tower(
        vision_tower,
        config,
        pixel_values,
        _feature_indices(feature_layer, len(layers)),
        cut,
        num_prefix_tokens,
        pixel_attention_mask=pixel_attention_mask,
        spatial_shapes=spatial_shapes,
        **vision_kwargs,
    )
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

    @classmethod
    def is_custom_code(cls) -> bool:
        # transformers guards the weight init of custom-code models (their `_init_weights` may write tensors directly):
        # a module whose own tensors are all loaded counts as initialised. The sub-models' init then skips modules
        # that own no tensor themselves, such as SigLIP's attention and MLP blocks (their parent module initialises
        # them), and a partial checkpoint's missing tower weights would not get SigLIP's init. Pivot's weights are
        # initialised by the sub-models' own `_init_weights` and transformers' default one, which honour the flags.
        return False


class PivotModel(PivotPreTrainedModel, LlavaModel):
    config_class = PivotConfig

    def __init__(self, config: PivotConfig):
        super().__init__(config)
        self.multi_modal_projector = PivotMultiModalProjector(config)
        cut_at_feature_layer(self.vision_tower, config.vision_feature_layer)
        self.post_init()  # initialises the projector (LlavaModel's was replaced)
        self._no_split_modules = transformer_block_class_names(self.vision_tower, self.language_model)

    @property
    def feature_cut(self) -> int:
        """The block the vision tower stops at: the deepest `config.vision_feature_layer`, as a hidden_states index."""
        return max(_feature_indices(self.config.vision_feature_layer, self.config.vision_config.num_hidden_layers))

    def _encode(
        self,
        pixel_values: torch.Tensor,
        pixel_attention_mask: torch.Tensor | None = None,
        spatial_shapes: torch.Tensor | None = None,
        vision_feature_layer: int | list[int] | None = None,
        **vision_kwargs,
    ):
        _refuse_data_parallel_replica(self)
        _, _, layers = find_encoder_layers(self.vision_tower)
        if getattr(layers, "num_used", None) != self.feature_cut:
            # `config.vision_feature_layer` was changed after the model was built: the cut follows it (else the tower's
            # last block would silently be read as the configured layer).
            cut_at_feature_layer(self.vision_tower, self.config.vision_feature_layer)
        layer = self.config.vision_feature_layer if vision_feature_layer is None else vision_feature_layer
        return _run_tower(
            self.vision_tower,
            self.config.vision_config,
            pixel_values.to(self.vision_tower.dtype),
            _feature_indices(layer, self.config.vision_config.num_hidden_layers),
            self.feature_cut,
            self.config.vision_num_prefix_tokens,
            pixel_attention_mask=pixel_attention_mask,
            spatial_shapes=spatial_shapes,
            **vision_kwargs,
        )

    def get_vision_features(
        self,
        pixel_values: torch.Tensor,
        pixel_attention_mask: torch.Tensor | None = None,
        spatial_shapes: torch.Tensor | None = None,
        vision_feature_layer: int | list[int] | None = None,
        **kwargs,
    ) -> torch.Tensor | list[torch.Tensor]:
        """Encoder features at the feature layer(s), before the projector (what PIVOT trains and exports):
        `(images, patches, vision_hidden)`, or one `(valid_patches_i, vision_hidden)` tensor per image for NaFlex."""
        return self._encode(pixel_values, pixel_attention_mask, spatial_shapes, vision_feature_layer)[1]

    @can_return_tuple
    def get_image_features(
        self,
        pixel_values: torch.Tensor,
        pixel_attention_mask: torch.Tensor | None = None,
        spatial_shapes: torch.Tensor | None = None,
        vision_feature_layer: int | list[int] | None = None,
        vision_feature_select_strategy: str | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> tuple | BaseModelOutputWithPooling:
        """The vision tower's output with the projected visual tokens in `pooler_output`: a list with one
        `(num_tokens_i, text_hidden)` tensor per image, as LLaVA's. `last_hidden_state` is the tower's output at the
        (deepest) feature layer, `(images, tokens, vision_hidden)` with prefix and padding tokens; `hidden_states` /
        `attentions` are the tower's when `output_hidden_states` / `output_attentions` ask for them. Prefix tokens are
        dropped per family (`config.vision_num_prefix_tokens`), not by `vision_feature_select_strategy`."""
        flags = {name: kwargs[name] for name in _VISION_OUTPUT_FLAGS if kwargs.get(name) is not None}
        image_outputs, features = self._encode(
            pixel_values, pixel_attention_mask, spatial_shapes, vision_feature_layer, **flags
        )
        if isinstance(features, list):
            image_outputs.pooler_output = [self.multi_modal_projector(f) for f in features]
        else:
            image_outputs.pooler_output = list(self.multi_modal_projector(features))
        return image_outputs

    def get_placeholder_mask(self, input_ids, inputs_embeds, image_features):
        if input_ids is None:
            image_embed = self.get_input_embeddings()(
                torch.tensor(self.config.image_token_id, dtype=torch.long, device=inputs_embeds.device)
            )
            mask = (inputs_embeds == image_embed).all(-1)
        else:
            mask = input_ids == self.config.image_token_id
        num_tokens, num_features = mask.sum(), image_features.shape[0]
        # A check that torch.compile / torch.export keep as an assertion (the count is data-dependent).
        torch_compilable_check(
            num_tokens == num_features,
            lambda: (
                f"The text holds {int(num_tokens)} image tokens but the vision tower produced {num_features} image "
                "features. Build inputs with the model's PivotProcessor (it expands each <image> to the encoder's "
                "token count) and make sure truncation (max_length) does not cut image tokens: drop rows whose image "
                "tokens plus text exceed max_length before training."
            ),
        )
        return mask.unsqueeze(-1).expand_as(inputs_embeds).to(inputs_embeds.device)

    @accepts_old_cache_name
    @can_return_tuple
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
        **kwargs: Unpack[TransformersKwargs],
    ):
        """LLaVA's forward, plus NaFlex inputs and `image_features`: already projected visual tokens (one tensor per
        image, or `(num_images, tokens, hidden)`), so callers can encode an image once and reuse it for several
        sequences (chosen and rejected answers of a preference pair).

        `cache` is the key/value cache (`past_key_values` before transformers 5.24; the old name is accepted, with
        transformers' deprecation warning where it is deprecated). Returns a `LlavaModelOutputWithPast` whose
        `image_outputs` is what `get_image_features` returned (`pooler_output`: one tensor per image), or a tuple
        with `return_dict=False`."""
        _refuse_data_parallel_replica(self)
        if (input_ids is None) ^ (inputs_embeds is not None):
            raise ValueError("You must specify exactly one of input_ids or inputs_embeds")
        if pixel_values is not None and mm_encoder_outputs is not None:
            raise ValueError("You cannot specify both pixel_values and mm_encoder_outputs at the same time")
        if inputs_embeds is None:
            inputs_embeds = self.get_input_embeddings()(input_ids)

        if image_features is not None:
            image_outputs = image_outputs_from_features(image_features)
        else:
            image_outputs = (mm_encoder_outputs or {}).get("image")
            if image_outputs is None and pixel_values is not None:
                flags = {name: kwargs[name] for name in _VISION_OUTPUT_FLAGS if kwargs.get(name) is not None}
                image_outputs = self.get_image_features(
                    pixel_values,
                    pixel_attention_mask=pixel_attention_mask,
                    spatial_shapes=spatial_shapes,
                    vision_feature_layer=vision_feature_layer,
                    return_dict=True,
                    **flags,
                )
        if image_outputs is not None:
            features = torch.cat([f.reshape(-1, f.shape[-1]) for f in image_outputs.pooler_output], dim=0)
            features = features.to(inputs_embeds.device, inputs_embeds.dtype)
            mask = self.get_placeholder_mask(input_ids, inputs_embeds=inputs_embeds, image_features=features)
            inputs_embeds = inputs_embeds.masked_scatter(mask, features)

        kwargs[CACHE_ARGUMENT] = cache
        outputs = self.language_model(
            attention_mask=attention_mask,
            position_ids=position_ids,
            inputs_embeds=inputs_embeds,
            return_dict=True,
            **kwargs,
        )
        return model_output(
            outputs.last_hidden_state,
            cache=cache_from_output(outputs),
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            image_outputs=image_outputs,
        )


class PivotForConditionalGeneration(PivotPreTrainedModel, GenerationMixin):
    """The MLLM PIVOT post-trains: `vision_tower` (any family) -> `multi_modal_projector` -> `language_model`."""

    _tied_weights_keys = LlavaForConditionalGeneration._tied_weights_keys
    _tp_plan = getattr(LlavaForConditionalGeneration, "_tp_plan", None)

    def __init__(self, config: PivotConfig):
        super().__init__(config)
        self.model = PivotModel(config)
        self.lm_head = nn.Linear(config.text_config.hidden_size, config.text_config.vocab_size, bias=False)
        self.post_init()
        self._no_split_modules = list(self.model._no_split_modules)

    def get_output_embeddings(self) -> nn.Module:
        return self.lm_head

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
        """`PivotModel.get_image_features`: per-image projected tokens in `pooler_output`."""
        return self.model.get_image_features(pixel_values, **kwargs)

    @accepts_old_cache_name
    @can_return_tuple
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
        labels: torch.LongTensor | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        image_sizes: torch.Tensor | None = None,
        mm_encoder_outputs: dict | None = None,
        pixel_attention_mask: torch.Tensor | None = None,
        spatial_shapes: torch.Tensor | None = None,
        image_features: list[torch.Tensor] | torch.Tensor | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ):
        """LLaVA's forward with `PivotModel.forward`'s extra inputs; a `LlavaCausalLMOutputWithPast`, or a tuple with
        `return_dict=False`."""
        outputs = self.model(
            input_ids=input_ids,
            pixel_values=pixel_values,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            inputs_embeds=inputs_embeds,
            vision_feature_layer=vision_feature_layer,
            vision_feature_select_strategy=vision_feature_select_strategy,
            image_sizes=image_sizes,
            mm_encoder_outputs=mm_encoder_outputs,
            pixel_attention_mask=pixel_attention_mask,
            spatial_shapes=spatial_shapes,
            image_features=image_features,
            return_dict=True,
            **kwargs,
        )
        hidden_states = outputs.last_hidden_state
        keep = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        logits = self.lm_head(hidden_states[:, keep, :])
        loss = None
        if labels is not None:
            loss = self.loss_function(
                logits=logits, labels=labels, vocab_size=self.config.text_config.vocab_size, **kwargs
            )
        return causal_lm_output(loss, logits, outputs)

    def save_pretrained(self, save_directory, *args, **kwargs):
        # `register_for_auto_class` only maps the class being saved; the base model (`AutoModel`) is in the same
        # remote-code file, so map it too: `AutoModel.from_pretrained(ckpt, trust_remote_code=True)` then works.
        auto_map = getattr(self.config, "auto_map", None)
        if getattr(self, "_auto_class", None) == "AutoModelForImageTextToText" and not isinstance(auto_map, dict):
            # The first save of a composed model: transformers writes the auto_map during the save.
            self.config.auto_map = auto_map = {}
        if isinstance(auto_map, dict) and (self._auto_class or "AutoModelForImageTextToText" in auto_map):
            auto_map.setdefault("AutoModel", f"{type(self.model).__module__.rsplit('.', 1)[-1]}.PivotModel")
        return super().save_pretrained(save_directory, *args, **kwargs)

    def unreached_vision_parameter_names(self) -> list[str]:
        """Vision-tower parameters that no gradient can reach from the feature layer (the blocks above the cut, final
        norms, pooling heads), and those a family keeps fixed by design. They are frozen when the tower trains: DDP
        would otherwise wait forever for their gradients, and checks that "every trainable weight changed" would fail
        on them."""
        tower = self.model.vision_tower
        fixed = _FIXED_BY_DESIGN.get(self.config.vision_config.model_type, ())
        unreached = set()
        for prefix, module in tower.named_modules():
            if isinstance(module, _Unapplied):
                unreached.update(f"{prefix}.{name}" for name, _ in module.named_parameters())
            elif isinstance(module, FeatureLayerBlocks):
                for index, block in enumerate(module._modules.values()):
                    if index >= module.num_used:
                        unreached.update(f"{prefix}.{index}.{name}" for name, _ in block.named_parameters())
        names = []
        for name, _ in tower.named_parameters():
            # `mask_token`: only used for masked-image-modeling inputs, never here.
            if name in unreached or name in fixed or name.split(".")[-1] == "mask_token":
                names.append(f"model.vision_tower.{name}")
        return names

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
        use_kernels: bool = False,
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

        `use_kernels` (transformers' Hub kernels) defaults to False here, whatever transformers' own default (True
        from 5.25): Hub kernels change the numbers and need the Hub; pass True to opt in. The parts load without them
        and the composed model is kernelized as a whole, as `from_pretrained(checkpoint, use_kernels=True)` does (the
        LLM's own kernelized wrapper is not kept, so it could not re-kernelize on `train()`/`eval()`).
        """
        vision_kwargs = dict(vision_kwargs or {})
        text_kwargs = dict(text_kwargs or {})
        common = {"use_kernels": False}
        if torch_dtype is not None:
            common["dtype"] = torch_dtype
        if attn_implementation is not None:
            common["attn_implementation"] = attn_implementation

        vision_config = vision_config_from_any(AutoConfig.from_pretrained(vision_model_name_or_path, **vision_kwargs))
        vision_class = MODEL_MAPPING[type(vision_config)]
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
            use_kernels=use_kernels,
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
        use_kernels: bool | None = None,
        **config_kwargs,
    ) -> "PivotForConditionalGeneration":
        """Compose from already-instantiated models (weights are moved, not copied).

        Image token and vocabulary as in `from_vision_text_pretrained`; without `tokenizer`, the one saved with the
        language model (`name_or_path`) is used when there is one. `use_kernels` (Hub kernels): True kernelizes the
        composed model as a whole, False removes them from every part that came with them, None leaves the parts as
        they were loaded.
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
        model.model.vision_tower = cut_at_feature_layer(vision_tower, config.vision_feature_layer)
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
        if use_kernels is not None:
            for module in list(model.modules())[1:]:
                if getattr(module, "use_kernels", False) is True:
                    module.use_kernels = False  # transformers' reset: the torch implementations again
            if use_kernels:
                model.use_kernels = True  # kernelizes every layer, and re-kernelizes on train()/eval()
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
        kwargs = _llava_config_kwargs(config)
        if kwargs.get("vision_feature_layer") == 0:
            # LLaVA asks its tower for `output_hidden_states=vision_feature_layer`, and 0 reads as "no": the same layer
            # (the embeddings) counted from the end.
            kwargs["vision_feature_layer"] = -(config.vision_config.num_hidden_layers + 1)
        return _transplant(self, LlavaForConditionalGeneration, LlavaConfig(**kwargs))

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
    "FeatureLayerBlocks",
    "PivotForConditionalGeneration",
    "PivotModel",
    "PivotPreTrainedModel",
    "PivotMultiModalProjector",
    "cut_at_feature_layer",
    "encode_images",
    "find_encoder_layers",
    "resolve_feature_layer",
    "transformer_block_class_names",
    # Re-exported from pivot_compat for callers that build or read model outputs.
    "model_output",
    "output_image_features",
]
