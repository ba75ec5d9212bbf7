"""The paired forward: `PivotModel.forward` for a `[chosen..., rejected...]` batch of preference pairs.

It encodes the images of the first half only, runs each pair's shared prefix once (`packing.pack_pairs`, with
pair-block attention or a dense block mask) or packs the rows padding-free (`packing.pack_rows`), and scatters the
hidden states back into the collator's layout. Rows that are not pairs take the plain path.

`paired_forward(model, ...)` is the only way it runs: a context manager that, while it is active, routes the forwards of
the `PivotModel` inside `model` (through any DDP / DeepSpeed / FSDP / PEFT wrapper, which still run their own forward)
to `pair_forward`, and leaves the model exactly as it was on exit, exception or not. `pair_attention_selected` selects
pair-block attention (`attention.PAIR_ATTENTION`) for the LLM while a run lasts and restores the user's choice.
"""

from __future__ import annotations

import contextlib
import logging

import torch

from ...modeling_pivot import model_output, output_image_features
from .attention import PAIR_ATTENTION
from .packing import _additive_mask, _features_in_order, _row_spans, pack_pairs, pack_rows, plan_pairs


logger = logging.getLogger(__name__)


def _split_images(pixel_values, pixel_attention_mask, spatial_shapes):
    """The first half of the image inputs when the second half repeats it (TRL repeats images for rejected)."""
    if pixel_values is None or pixel_values.shape[0] % 2:
        return None
    half = pixel_values.shape[0] // 2
    out = []
    for tensor in (pixel_values, pixel_attention_mask, spatial_shapes):
        if tensor is None:
            out.append(None)
            continue
        if tensor.shape[0] != 2 * half or not torch.equal(tensor[:half], tensor[half:]):
            return None
        out.append(tensor[:half])
    return tuple(out)


def _image_token_counts_match(input_ids, image_token_id, half_rows) -> bool:
    # Images are ordered row by row, so the first half of the images belongs to the first half of the rows only if the
    # rows carry the same image-token counts in both halves.
    counts = (input_ids == image_token_id).sum(1)
    return torch.equal(counts[:half_rows], counts[half_rows:])


def _layer_kinds(text_config) -> set[str]:
    """The kinds of sequence mixing in the LLM's layers (`layer_types` where the config lists them, else full or
    sliding attention from `sliding_window`, as Mistral and Phi-3 decide)."""
    layer_types = getattr(text_config, "layer_types", None)
    if layer_types:
        return set(layer_types)
    return {"sliding_attention" if getattr(text_config, "sliding_window", None) is not None else "full_attention"}


# Pair-block attention takes each layer's window from the attention call; transformers builds the packed rows' masks
# per layer kind. The dense block mask is one 4-D tensor for every layer, so it can express full attention only.
_PAIR_BLOCK_KINDS = {"full_attention", "sliding_attention"}
_DENSE_MASK_KINDS = {"full_attention"}
# Attention implementations that honour a 4-D additive mask (the dense block mask); flash attention reads positions.
_BLOCK_MASK_ATTENTION = ("eager", "sdpa", PAIR_ATTENTION)
_fallback_logged: set[tuple] = set()


def _log_fallback_once(kinds: set[str], layout: str) -> None:
    key = (tuple(sorted(kinds)), layout)
    if key not in _fallback_logged:
        _fallback_logged.add(key)
        logger.warning(
            "Fast DPO: the LLM has %s layers, which the %s cannot express; those batches take a path whose masks "
            "transformers builds per layer (exact, without that speed-up).",
            ", ".join(sorted(kinds)),
            layout,
        )


def pair_forward(
    model,
    input_ids=None,
    pixel_values=None,
    attention_mask=None,
    position_ids=None,
    pixel_attention_mask=None,
    spatial_shapes=None,
    vision_feature_layer=None,
    share_prefix: bool = True,
    padding_free: bool = False,
    max_row_tokens: int | None = None,
    **kwargs,
):
    """`PivotModel.forward` for preference pairs (see the module docstring). `model` is the PivotModel.

    `padding_free` packs the pairs of the batch back to back (`pack_pairs`): with sdpa into one row with pair-block
    attention, with eager into rows of at most `max_row_tokens` tokens (default the longest pair) under a dense block
    mask; with a flash-attention backend, or without `share_prefix`, the rows are packed as varlen sequences instead
    (`pack_rows`), as the block structure of a shared prefix needs eager or sdpa attention."""
    image_token_id = getattr(model.config, "image_token_id", None)
    if image_token_id is None:
        image_token_id = getattr(model.config, "image_token_index", None)
    plain = {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "position_ids": position_ids,
        "vision_feature_layer": vision_feature_layer,
        **kwargs,
    }
    shared = None
    if pixel_values is not None and input_ids is not None and input_ids.shape[0] % 2 == 0:
        split = _split_images(pixel_values, pixel_attention_mask, spatial_shapes)
        if split is not None and _image_token_counts_match(input_ids, image_token_id, input_ids.shape[0] // 2):
            shared = split
    if pixel_values is not None and shared is None:
        # Not pairs: the unshared forward. The features are computed here and passed in, which also keeps the call
        # from re-entering this hook (the hook only fires when `image_features` is None).
        features = model.get_image_features(
            pixel_values,
            pixel_attention_mask=pixel_attention_mask,
            spatial_shapes=spatial_shapes,
            vision_feature_layer=vision_feature_layer,
        ).pooler_output
        return model(image_features=features, **plain)

    features = None
    if shared is not None:
        pv, pam, ss = shared
        half = model.get_image_features(
            pv, pixel_attention_mask=pam, spatial_shapes=ss, vision_feature_layer=vision_feature_layer
        ).pooler_output
        features = list(half)

    plan = None
    text_config = model.config.get_text_config()
    attn_impl = getattr(text_config, "_attn_implementation", None) or "sdpa"
    # Pair-block attention needs the LLM to run the function registered as PAIR_ATTENTION (selected by
    # `pair_attention_selected`); with plain sdpa the pairs get rows of their own under a dense block mask instead.
    pair_blocks = padding_free and attn_impl == PAIR_ATTENTION
    # A sliding window (per layer, e.g. Qwen2's `max_window_layers`) or a layer that is not attention (linear
    # attention, Mamba, ...) would see a layout that ignores it and mix tokens across the pair's blocks.
    kinds = _layer_kinds(text_config)
    layout_ok = kinds <= (_PAIR_BLOCK_KINDS if pair_blocks else _DENSE_MASK_KINDS)
    if share_prefix and position_ids is None and attn_impl in _BLOCK_MASK_ATTENTION:
        if layout_ok:
            plan = plan_pairs(input_ids, attention_mask, image_token_id)
        else:
            _log_fallback_once(kinds, "pair-block attention" if pair_blocks else "dense block mask of a shared prefix")
    if plan is None:
        spans = None
        varlen_ok = kinds <= _PAIR_BLOCK_KINDS  # transformers' packed-sequence masks cover full and sliding layers
        if padding_free and not varlen_ok:
            _log_fallback_once(kinds, "padding-free packing")
        if padding_free and varlen_ok and position_ids is None and input_ids is not None and input_ids.dim() == 2:
            spans = _row_spans(attention_mask, input_ids.shape[0], input_ids.shape[1], input_ids.device)
        if spans is not None:
            varlen_rows = None if attn_impl not in _BLOCK_MASK_ATTENTION else (max_row_tokens or int(spans[1].max()))
            packed = pack_rows(*spans, input_ids, max_row_tokens=varlen_rows)
            call = {**kwargs, "attention_mask": None, "position_ids": packed["position_ids"]}
            image_rows = (input_ids == image_token_id).sum(1) if image_token_id is not None else None
            out = _packed_call(model, packed, features + features if features else None, image_rows, call)
            return _unpack(out, packed, input_ids.shape)
        # Image sharing only: the same features serve the chosen and the rejected rows.
        if features is not None:
            return model(image_features=features + features, **plain)
        return model(inputs_embeds=model.get_input_embeddings()(input_ids), **{**plain, "input_ids": None})

    dtype = model.get_input_embeddings().weight.dtype
    if pair_blocks:
        # One row without padding, attention computed pair by pair (attention.PairBlocks).
        packed = pack_pairs(plan, input_ids, single_row=True)
        mask = packed["blocks"].marker(dtype)
    else:
        packed = pack_pairs(plan, input_ids, padding_free=padding_free, max_row_tokens=max_row_tokens)
        mask = _additive_mask(packed["allowed"], dtype)
    call = {**kwargs, "attention_mask": mask, "position_ids": packed["position_ids"]}
    image_rows = (input_ids[: plan["pairs"]] == image_token_id).sum(1) if image_token_id is not None else None
    out = _packed_call(model, packed, features, image_rows, call, vision_feature_layer=vision_feature_layer)
    if packed["blocks"] is not None:
        packed["blocks"].check_used(type(model.language_model).__name__)
    return _unpack(out, packed, input_ids.shape)


def _packed_call(model, packed, features, image_rows, call, **extra):
    """The PivotModel on packed rows; image tokens are consumed in the packed rows' order."""
    if features is not None:
        ordered = _features_in_order(features, image_rows, packed["unit_order"])
        return model(input_ids=packed["input_ids"], image_features=ordered, **extra, **call)
    return model(inputs_embeds=model.get_input_embeddings()(packed["input_ids"]), **call)


def _unpack(out, packed, shape):
    """Hidden states of packed rows scattered back into the collator's `(rows, length)` layout (zeros at padding)."""
    hidden = out.last_hidden_state
    flat = hidden.reshape(-1, hidden.shape[-1])
    rows, length = shape
    unpacked = flat.index_select(0, packed["flat_index"].reshape(-1)).view(rows, length, -1)
    unpacked = unpacked * packed["valid"][..., None].to(unpacked.dtype)
    return model_output(unpacked, image_features=output_image_features(out))


def find_pivot_model(model) -> torch.nn.Module | None:
    """The `PivotModel` inside a (possibly wrapped / remote-code) Pivot MLLM."""
    if model is None:
        return None
    for module in model.modules():
        if type(module).__name__ == "PivotModel":
            return module
    return None


# Inputs that already carry what the pair path computes (a cache, image features, embeddings) go to the plain forward.
_PLAIN_ONLY = ("cache", "past_key_values", "image_features", "inputs_embeds", "mm_encoder_outputs")


def _wants_per_row_outputs(inner, kwargs) -> bool:
    """Hidden states and attention maps are per collator row; the packed path has neither, so they take the plain
    forward (the only outputs the pair path returns are the last hidden states, scattered back)."""
    for name in ("output_hidden_states", "output_attentions"):
        value = kwargs.get(name)
        if value is None:
            value = getattr(inner.config, name, False)
        if value:
            return True
    return False


@contextlib.contextmanager
def paired_forward(
    model,
    share_image: bool = True,
    share_prefix: bool = True,
    padding_free: bool = False,
    max_row_tokens: int | None = None,
):
    """While active, the `PivotModel` inside `model` runs `pair_forward` on `[chosen..., rejected...]` batches.

    Calls through `model` (or any wrapper around it) reach the `PivotModel`'s own `__call__`, so module hooks (DDP,
    DeepSpeed, FSDP, accelerate's device map) run as always; only its `forward` is routed, for this scope. Calls with
    positional arguments, a cache, precomputed features/embeddings or `output_hidden_states`/`output_attentions` take
    the plain forward. With `padding_free`, pair-block attention is selected for the scope too
    (`pair_attention_selected`; enter that around the backward as well when layers are recomputed, as the trainer
    does). On exit, exception or not, the model is as it was. Yields whether a Pivot model was found (and the flags
    ask for anything).
    """
    inner = find_pivot_model(model)
    if inner is None or not (share_image or share_prefix or padding_free):
        yield False
        return
    own = inner.__dict__.get("forward")  # an instance forward installed by someone else (accelerate's hooks)
    plain = inner.forward

    def forward(*args, **kwargs):
        if args or any(kwargs.get(name) is not None for name in _PLAIN_ONLY) or _wants_per_row_outputs(inner, kwargs):
            return plain(*args, **kwargs)
        inputs = {name: value for name, value in kwargs.items() if name not in _PLAIN_ONLY}  # all None here
        return pair_forward(
            inner, share_prefix=share_prefix, padding_free=padding_free, max_row_tokens=max_row_tokens, **inputs
        )

    inner.forward = forward
    try:
        with pair_attention_selected(inner) if padding_free else contextlib.nullcontext():
            yield True
    finally:
        if own is not None:
            inner.forward = own
        else:
            del inner.forward


@contextlib.contextmanager
def pair_attention_selected(*models):
    """Select pair-block attention (`attention.PAIR_ATTENTION`) for the LLM of each Pivot model whose LLM runs
    transformers' `sdpa`, through the public `set_attn_implementation`; put `sdpa` back on exit, exception or not.

    Models with another implementation (eager, flash attention) are left alone: the pair forward uses its other
    layouts for them. Nested scopes are no-ops."""
    selected = []
    try:
        for model in models:
            inner = find_pivot_model(model)
            if inner is None or any(inner is done for done in selected):
                continue
            if getattr(inner.config.get_text_config(), "_attn_implementation", None) == "sdpa":
                inner.set_attn_implementation({"text_config": PAIR_ATTENTION})
                selected.append(inner)
        yield
    finally:
        for inner in selected:
            inner.set_attn_implementation({"text_config": "sdpa"})
