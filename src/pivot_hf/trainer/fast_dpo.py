"""Fast PIVOT DPO: one image encoding and one prompt prefix per preference pair, cached reference log-probs.

TRL's vision DPO collator repeats every prompt (and image) for the chosen and the rejected answer, so a stock step
encodes each image four times (chosen/rejected x policy/reference) and runs the shared prefix (hundreds of image
tokens + the question) four times through the LLM. Everything here works *below* TRL's loss code, which is untouched:

- `pair_forward` is installed on the `PivotModel` of the policy and of the reference (the runtime hook of
  `PivotModel.forward`). For a batch laid out `[chosen_0..chosen_{B-1}, rejected_0..rejected_{B-1}]` it encodes the
  images of the first half only, and packs each pair into one sequence `[common prefix | chosen tail | rejected tail]`
  with a block mask (both tails attend to the prefix, not to each other) and position ids restarting after the prefix.
  The hidden states are scattered back into the collator's layout, so the fused LM head and the loss see exactly what
  the unshared forward gives (causal attention makes prefix states identical in both rows). Rows that are not pairs
  (odd batch, different prompts, custom position ids, ...) take the plain path.
- With `padding_free` (the default) the pairs of a batch are packed back to back, each attending to its own blocks
  only, so no compute goes to padding. With sdpa all pairs share one row and attention is computed pair by pair
  (`pair_attention.PairBlocks`: cost linear in the batch); with eager the rows are as wide as the longest pair under a
  dense block mask (`pack_pairs`); with flash attention the rows become varlen sequences delimited by position ids
  (`pack_rows`).
- `FastDPOMixin` (mixed into `PivotDPOTrainer` ahead of `trl.DPOTrainer`) installs the hook, scores only completion
  positions in the LM head on every device (TRL does that on CUDA only), and makes `precompute_ref_log_probs=True`
  work for vision datasets: one pass with a progress bar, stored with the run as safetensors + JSON keyed by the
  dataset fingerprint and the reference weights' hash, reused on resume; the reference model is freed afterwards.
"""

from __future__ import annotations

import contextlib
import copy
import gc
import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any

import torch
from datasets import IterableDataset

from ..configs import FastDPOArguments  # the fields live with the other recipe arguments
from ..data.images import dataset_images_digest
from ..modeling_pivot import model_output, output_image_features
from .pair_attention import PairBlocks, install_pair_attention


logger = logging.getLogger(__name__)

REF_COLUMNS = ("ref_chosen_logps", "ref_rejected_logps")
# Bumped whenever the cached values could change meaning (keeps stale caches from being reused).
REF_CACHE_VERSION = 2


# ------------------------------------------------------------------------------------------------- pair planning
def _row_spans(attention_mask: torch.Tensor | None, batch: int, length: int, device) -> tuple | None:
    """Start and length of the valid tokens of each row, or None if some row's valid tokens are not contiguous."""
    if attention_mask is None:
        starts = torch.zeros(batch, dtype=torch.long, device=device)
        return starts, torch.full((batch,), length, dtype=torch.long, device=device)
    mask = attention_mask.to(torch.bool)
    lengths = mask.sum(1)
    starts = mask.to(torch.long).argmax(1)
    columns = torch.arange(length, device=device)
    contiguous = (columns >= starts[:, None]) & (columns < (starts + lengths)[:, None])
    if not torch.equal(contiguous, mask):
        return None
    return starts, lengths


def plan_pairs(input_ids: torch.Tensor, attention_mask: torch.Tensor | None, image_token_id: int | None):
    """How a `[chosen..., rejected...]` batch shares prefixes, or None when its rows are not preference pairs.

    Returns a dict with per-row `starts`/`lengths` of the valid tokens and per-pair `prefix` lengths (longest common
    prefix of the two rows, which always contains every image token when it is returned).
    """
    if input_ids is None or input_ids.dim() != 2 or input_ids.shape[0] % 2 or input_ids.shape[0] == 0:
        return None
    rows, length = input_ids.shape
    pairs = rows // 2
    device = input_ids.device
    spans = _row_spans(attention_mask, rows, length, device)
    if spans is None:
        return None
    starts, lengths = spans
    # Align every row to start at its first valid token (covers left padding, right padding and flush_left).
    offsets = torch.arange(length, device=device)
    gather = (starts[:, None] + offsets).clamp(max=length - 1)
    aligned = torch.gather(input_ids, 1, gather)
    valid = offsets[None, :] < lengths[:, None]
    aligned = aligned.masked_fill(~valid, -1)
    same = (aligned[:pairs] == aligned[pairs:]) & valid[:pairs] & valid[pairs:]
    prefix = same.to(torch.long).cumprod(1).sum(1)
    if bool((prefix == 0).any()):
        return None
    if image_token_id is not None:
        is_image = aligned == image_token_id
        in_prefix = is_image & (offsets[None, :] < prefix.repeat(2)[:, None])
        # Every image token must sit in the shared prefix, or the two rows do not share their images.
        if not torch.equal(in_prefix.sum(1), is_image.sum(1)):
            return None
    return {"starts": starts, "lengths": lengths, "prefix": prefix, "pairs": pairs, "length": length}


def _first_fit(lengths: list[int], capacity: int) -> tuple[list[int], list[int], list[int]]:
    """Row and offset of each unit (first-fit decreasing, ties by index, so deterministic), and each row's fill."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    fill: list[int] = []
    rows, offsets = [0] * len(lengths), [0] * len(lengths)
    for i in order:
        row = next((r for r, used in enumerate(fill) if used + lengths[i] <= capacity), len(fill))
        if row == len(fill):
            fill.append(0)
        rows[i], offsets[i] = row, fill[row]
        fill[row] += lengths[i]
    return rows, offsets, fill


def _place_units(unit_len: torch.Tensor, padding_free: bool, max_row_tokens: int | None):
    """Row / offset of each unit (a packed pair or a sequence) in the packed layout, and the row width.

    Without `padding_free` every unit has a row of its own (padded to the longest unit). With it units are packed
    back to back into rows of `max(max_row_tokens, longest unit)` tokens (default: the longest unit), so the attention
    of a row (quadratic in its width) stays bounded by the longest unit whatever the batch size.
    """
    units = unit_len.numel()
    device = unit_len.device
    if not padding_free:
        rows = torch.arange(units, device=device)
        return rows, torch.zeros_like(rows), int(unit_len.max()), units
    lengths = unit_len.tolist()
    capacity = max(max(lengths), int(max_row_tokens or 0))
    rows, offsets, fill = _first_fit(lengths, capacity)
    as_tensor = lambda values: torch.tensor(values, dtype=torch.long, device=device)  # noqa: E731
    return as_tensor(rows), as_tensor(offsets), max(fill), len(fill)


def pack_pairs(
    plan: dict,
    input_ids: torch.Tensor,
    pad_id: int = 0,
    padding_free: bool = False,
    max_row_tokens: int | None = None,
    single_row: bool = False,
):
    """Pack each pair as `[prefix | chosen tail | rejected tail]`: position ids, block mask and the index that maps
    every original (row, column) back to its packed position.

    Without `padding_free` each pair has a row (`(pairs, width)`, padded to the longest pair). With it the pairs are
    packed back to back into `(n_rows, width)` rows (see `_place_units`); a token attends causally to the prefix of its
    own pair and to its own tail only, and positions restart at 0 for every pair (and after the prefix for the
    rejected tail). Returns `input_ids`, `position_ids`, `allowed` (bool `(n_rows, width, width)`), `flat_index` and
    `valid` (`(rows, length)`: where each original token sits in the flattened packed rows) and `unit_order` (pairs in
    the packed rows' reading order, which is the order their images are consumed in).

    `single_row` puts all pairs, in batch order, into one row without any padding (`(1, tokens)`) for pair-block
    attention (`pair_attention.PairBlocks`): no dense mask is built (`allowed` is None) and `blocks` holds the
    layout.
    """
    starts, lengths, prefix, pairs = plan["starts"], plan["lengths"], plan["prefix"], plan["pairs"]
    device = input_ids.device
    tail_a = lengths[:pairs] - prefix
    tail_b = lengths[pairs:] - prefix
    packed_len = prefix + tail_a + tail_b
    block_start = torch.cumsum(packed_len, 0) - packed_len  # where each pair starts when packed back to back
    if single_row:
        offset_of, row_of, width, n_rows = block_start, torch.zeros_like(block_start), int(packed_len.sum()), 1
    else:
        row_of, offset_of, width, n_rows = _place_units(packed_len, padding_free, max_row_tokens)

    # Every packed token: its pair, its offset inside the pair's block, its segment (0 prefix, 1 chosen, 2 rejected).
    unit = torch.repeat_interleave(torch.arange(pairs, device=device), packed_len)
    local = torch.arange(unit.numel(), device=device) - block_start[unit]
    p, ta = prefix[unit], tail_a[unit]
    seg = torch.where(local < p, 0, torch.where(local < p + ta, 1, 2))
    dest = row_of[unit] * width + offset_of[unit] + local
    # Source of each packed token: the chosen row for prefix + chosen tail, the rejected row for the rejected tail.
    src_row = torch.where(seg == 2, unit + pairs, unit)
    src_offset = torch.where(seg == 2, local - ta, local)
    src_col = (starts[src_row] + src_offset).clamp(0, input_ids.shape[1] - 1)

    size = n_rows * width
    packed_ids = torch.full((size,), pad_id, dtype=input_ids.dtype, device=device)
    packed_ids[dest] = input_ids[src_row, src_col]
    # Positions restart after the prefix for the rejected tail: it continues the prompt, not the chosen answer.
    position_ids = torch.zeros(size, dtype=torch.long, device=device)
    position_ids[dest] = src_offset
    allowed, blocks = None, None
    if single_row:
        spans = zip(offset_of.tolist(), prefix.tolist(), tail_a.tolist(), tail_b.tolist())
        blocks = PairBlocks([tuple(span) for span in spans], device=device)
    else:
        segment = torch.full((size,), -1, dtype=torch.long, device=device)
        segment[dest] = seg
        owner = torch.full((size,), -1, dtype=torch.long, device=device)
        owner[dest] = unit
        segment, owner = segment.view(n_rows, width), owner.view(n_rows, width)
        q = torch.arange(width, device=device)
        seg_q, seg_k = segment[:, :, None], segment[:, None, :]
        causal = (q[None, :] <= q[:, None])[None]
        same_pair = owner[:, None, :] == owner[:, :, None]
        allowed = causal & (seg_k >= 0) & same_pair & ((seg_k == 0) | (seg_k == seg_q))
        # Padding queries attend to themselves only, so no softmax row is empty (an empty row gives NaN gradients).
        allowed |= torch.eye(width, dtype=torch.bool, device=device)[None]

    # Back-mapping: original row r, aligned offset t -> packed index (row * width + offset of its pair + position).
    rows, length = input_ids.shape
    offsets = torch.arange(length, device=device)[None, :]
    pair_of_row = torch.arange(rows, device=device) % pairs
    row_prefix = prefix.repeat(2)[:, None]
    is_rejected = (torch.arange(rows, device=device) >= pairs)[:, None]
    t = offsets - starts[:, None]  # aligned offset of each original column
    valid = (t >= 0) & (t < lengths[:, None])
    packed_pos = torch.where(is_rejected & (t >= row_prefix), t + tail_a.repeat(2)[:, None], t)
    base = (row_of * width + offset_of)[pair_of_row][:, None]
    flat_index = (base + packed_pos).masked_fill(~valid, 0)
    return {
        "input_ids": packed_ids.view(n_rows, width),
        "position_ids": position_ids.view(n_rows, width),
        "allowed": allowed,
        "blocks": blocks,
        "flat_index": flat_index,
        "valid": valid,
        "unit_order": torch.argsort(row_of * width + offset_of),
    }


def pack_rows(
    starts: torch.Tensor, lengths: torch.Tensor, input_ids: torch.Tensor, pad_id: int = 0, max_row_tokens=None
):
    """Padding-free layout without prefix sharing: the valid tokens of every row back to back, positions restarting
    at 0 for each sequence, no attention mask. This is the layout flash-attention-2 reads as varlen sequences
    (transformers derives `cu_seqlens` from the position ids) and that sdpa/eager turn into a block-causal mask.

    `max_row_tokens=None` puts everything in one row (varlen kernels cost nothing for that); an int bounds the rows
    (at least the longest sequence) for dense-mask attention. Trailing padding of a row is a sequence of its own.
    Returns `input_ids`/`position_ids` `(n_rows, width)`, `flat_index`/`valid` `(rows, length)`, `unit_order`.
    """
    device = input_ids.device
    rows, length = input_ids.shape
    capacity = int(lengths.sum()) if max_row_tokens is None else max_row_tokens
    row_of, offset_of, width, n_rows = _place_units(lengths, True, capacity)
    unit = torch.repeat_interleave(torch.arange(rows, device=device), lengths)
    local = torch.arange(unit.numel(), device=device) - (torch.cumsum(lengths, 0) - lengths)[unit]
    dest = row_of[unit] * width + offset_of[unit] + local
    size = n_rows * width
    packed_ids = torch.full((size,), pad_id, dtype=input_ids.dtype, device=device)
    packed_ids[dest] = input_ids[unit, starts[unit] + local]
    taken = torch.zeros(size, dtype=torch.bool, device=device)
    taken[dest] = True
    # Padding positions count 0, 1, 2, ... from each run of padding, so they never extend the sequence before them.
    column = torch.arange(size, device=device)
    run_start = torch.cummax(torch.where(taken, column + 1, 0), 0).values
    position_ids = torch.where(taken, 0, column - run_start)
    position_ids[dest] = local
    t = torch.arange(length, device=device)[None, :] - starts[:, None]
    valid = (t >= 0) & (t < lengths[:, None])
    flat_index = ((row_of * width + offset_of)[:, None] + t).masked_fill(~valid, 0)
    return {
        "input_ids": packed_ids.view(n_rows, width),
        "position_ids": position_ids.view(n_rows, width),
        "flat_index": flat_index,
        "valid": valid,
        "unit_order": torch.argsort(row_of * width + offset_of),
    }


def _features_in_order(features: list[torch.Tensor], image_rows: torch.Tensor, unit_order: torch.Tensor):
    """The projected image tokens (one tensor per image, images ordered by row) re-ordered to follow `unit_order`.

    `image_rows[u]` is the number of image tokens unit `u` consumes (its images' tokens, in order)."""
    flat = torch.cat([f.reshape(-1, f.shape[-1]) for f in features])
    if torch.equal(unit_order, torch.arange(unit_order.numel(), device=unit_order.device)):
        return flat
    first = torch.cumsum(image_rows, 0) - image_rows
    counts = image_rows[unit_order]
    index = torch.repeat_interleave(first[unit_order], counts)
    index = (
        index
        + torch.arange(index.numel(), device=index.device)
        - torch.repeat_interleave(torch.cumsum(counts, 0) - counts, counts)
    )
    return flat.index_select(0, index.to(flat.device))


def _additive_mask(allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    # A float mask works with eager and sdpa attention alike (a bool mask means opposite things to the two).
    mask = torch.zeros(allowed.shape, dtype=dtype, device=allowed.device)
    return mask.masked_fill(~allowed, torch.finfo(dtype).min)[:, None]


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
    pair_blocks = padding_free and attn_impl == "sdpa"
    # A sliding window (per layer, e.g. Qwen2's `max_window_layers`) or a layer that is not attention (linear
    # attention, Mamba, ...) would see a layout that ignores it and mix tokens across the pair's blocks.
    kinds = _layer_kinds(text_config)
    layout_ok = kinds <= (_PAIR_BLOCK_KINDS if pair_blocks else _DENSE_MASK_KINDS)
    if share_prefix and position_ids is None and attn_impl in ("eager", "sdpa"):
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
            varlen_rows = None if attn_impl not in ("eager", "sdpa") else (max_row_tokens or int(spans[1].max()))
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
        # One row without padding, attention computed pair by pair (pair_attention.PairBlocks).
        install_pair_attention()
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


def install_pair_forward(
    model,
    share_image: bool = True,
    share_prefix: bool = True,
    padding_free: bool = False,
    max_row_tokens: int | None = None,
) -> bool:
    """Install (or remove, when all flags are off) the pair path on a Pivot model. Returns whether it applied."""
    inner = find_pivot_model(model)
    if inner is None:
        return False
    if not (share_image or share_prefix or padding_free):
        inner.pair_forward = None
        return True

    def _hook(module, **kwargs):
        return pair_forward(
            module, share_prefix=share_prefix, padding_free=padding_free, max_row_tokens=max_row_tokens, **kwargs
        )

    inner.pair_forward = _hook
    return True


@contextlib.contextmanager
def compact_lm_head_scoring(enabled: bool = True):
    """Make TRL's fused LM head score only positions with a label (what it does on CUDA) on every device.

    TRL scores every position off CUDA so that Neuron graphs keep static shapes; on CPU that projects hundreds of image
    and prompt tokens through the vocabulary for nothing. The math is TRL's own, only the gather of positions changes.
    """
    import trl.trainer.utils as trl_utils

    original = getattr(trl_utils, "_use_triton", None)
    if not enabled or original is None:
        yield
        return
    trl_utils._use_triton = lambda device: True
    try:
        yield
    finally:
        trl_utils._use_triton = original


# ------------------------------------------------------------------------------------------ reference log-probs
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
    attention implementation and dtype, the image processor (size, mean, std, resampling, ...), the tokenizer and chat
    template, and the versions of the libraries that do the math.
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


@contextlib.contextmanager
def _pair_forward_disabled(model):
    inner = find_pivot_model(model)
    hook = getattr(inner, "pair_forward", None) if inner is not None else None
    if hook is None:
        yield
        return
    inner.pair_forward = None
    try:
        yield
    finally:
        inner.pair_forward = hook


class _RefLogpsCollator:
    """Wraps the vision collator so cached reference log-probs ride along with their rows."""

    def __init__(self, inner):
        self.inner = inner

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        cached = {name: [example.pop(name) for example in examples if name in example] for name in REF_COLUMNS}
        batch = self.inner(examples)
        for name, values in cached.items():
            if values and len(values) == len(examples):
                batch[name] = torch.tensor(values, dtype=torch.float32)
        return batch

    def __getattr__(self, name):
        return getattr(self.inner, name)


class FastDPOMixin:
    """Mixed into `PivotDPOTrainer` ahead of `trl.DPOTrainer`: shared images, shared prefixes, cached references."""

    def __init__(self, *args, **kwargs):
        dpo_args = kwargs.get("args") if "args" in kwargs else (args[2] if len(args) > 2 else None)
        train_dataset = kwargs.get("train_dataset", args[4] if len(args) > 4 else None)
        want_cache = bool(getattr(dpo_args, "precompute_ref_log_probs", False))
        is_vision = False
        if want_cache and train_dataset is not None:
            sample = next(iter(train_dataset))
            is_vision = "image" in sample or "images" in sample
        self._vision_precompute = want_cache and is_vision
        self._ref_logps_cached = False
        self._reference_is_policy = False
        # TRL refuses `precompute_ref_log_probs` for vision data. The flag is hidden from that one check only:
        # `create_accelerator_and_postprocess` (the first thing `Trainer.__init__` does, after TRL's vision check) puts
        # it back, so every other validation of TRL's (sync_ref_model, IterableDataset, ...) still sees it.
        if want_cache and is_vision:
            dpo_args.precompute_ref_log_probs = False
            self._hidden_precompute_args = dpo_args
            args = list(args)
            ref_model = (
                kwargs.pop("ref_model", None) if "ref_model" in kwargs else (args[1] if len(args) > 1 else None)
            )
            model = kwargs.get("model", args[0] if args else None)
            if ref_model is None and isinstance(model, torch.nn.Module):
                # No reference given: the policy before its first step is the reference. A private copy (instead of
                # TRL reloading `name_or_path`, which a freshly composed model may not have) lives only until the
                # cache is written.
                from .model_loading import refuse_copy_under_zero3

                refuse_copy_under_zero3(model, "the policy, as the reference for `precompute_ref_log_probs`,")
                ref_model = copy.deepcopy(model).requires_grad_(False).eval()
            self._reference_is_policy = (
                isinstance(model, torch.nn.Module)
                and isinstance(ref_model, torch.nn.Module)
                and _same_weights(model, ref_model)
            )
            if len(args) > 1:
                args[1] = ref_model
            else:
                kwargs["ref_model"] = ref_model
            # The reference's identity is taken now, before DeepSpeed / FSDP prepare (shard) it.
            processor = kwargs.get("processing_class", args[6] if len(args) > 6 else None)
            self._ref_identity = reference_identity(ref_model if ref_model is not None else model, processor)
        # TRL's DPOTrainer switches its own (currently disabled) `padding_free` off with a warning; the pair forward
        # implements it, so TRL's constructor does not see the flag either.
        padding_free = bool(getattr(dpo_args, "padding_free", False))
        if padding_free:
            dpo_args.padding_free = False
        try:
            super().__init__(*args, **kwargs)
        finally:
            if want_cache and is_vision:
                dpo_args.precompute_ref_log_probs = True
                self._hidden_precompute_args = None
            if padding_free:
                dpo_args.padding_free = True
        share_image = bool(getattr(self.args, "share_image_features", True))
        share_prefix = bool(getattr(self.args, "share_prompt_prefix", True))
        row_tokens = getattr(self.args, "padding_free_row_tokens", None)
        self._fast_pairs = install_pair_forward(self.model, share_image, share_prefix, padding_free, row_tokens)
        install_pair_forward(self.ref_model, share_image, share_prefix, padding_free, row_tokens)
        if want_cache and is_vision:
            self._cache_reference_log_probs()

    # ------------------------------------------------------------------------------------------ loss / head
    def _compact_head(self):
        return compact_lm_head_scoring(bool(getattr(self.args, "compact_lm_head", True)))

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        # With `return_outputs` (logits for `compute_metrics`), TRL runs an extra plain forward whose logits include
        # padding positions; the pair path leaves those at 0, so it stands aside for that call.
        plain = _pair_forward_disabled(self.model) if return_outputs else contextlib.nullcontext()
        with self._compact_head(), plain:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)

    # ------------------------------------------------------------------------------------------ parent validation
    def create_accelerator_and_postprocess(self):
        # Called by `Trainer.__init__` right after TRL's vision check: from here on TRL sees the real flag, so its own
        # guards (sync_ref_model, IterableDataset, FSDP, ...) apply to vision precompute exactly as to text data.
        hidden = getattr(self, "_hidden_precompute_args", None)
        if hidden is not None:
            hidden.precompute_ref_log_probs = True
            self._hidden_precompute_args = None
        return super().create_accelerator_and_postprocess()

    def _precompute_ref_logps(self, dataset, name: str, batch_size: int):
        if not getattr(self, "_vision_precompute", False):
            return super()._precompute_ref_logps(dataset, name, batch_size)
        if isinstance(dataset, IterableDataset):
            return super()._precompute_ref_logps(dataset, name, batch_size)  # TRL's own refusal, before any compute
        # Vision rows: computed by `_cache_reference_log_probs` once the pair forward is installed.
        return dataset

    # ------------------------------------------------------------------------------------------ evaluate / predict
    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval"):
        eval_dataset = self._with_reference_columns(eval_dataset, "eval")
        return super().evaluate(
            eval_dataset=eval_dataset, ignore_keys=ignore_keys, metric_key_prefix=metric_key_prefix
        )

    def predict(self, test_dataset, ignore_keys=None, metric_key_prefix: str = "test"):
        test_dataset = self._with_reference_columns(test_dataset, "test")
        return super().predict(test_dataset, ignore_keys=ignore_keys, metric_key_prefix=metric_key_prefix)

    def _with_reference_columns(self, dataset, name: str):
        """A dataset handed to `evaluate`/`predict` after vision precompute, with its reference log-probs.

        The reference was freed after the cache pass; before any training step the policy still is the reference
        (when it was built from it, or has the same weights), after one it is not: then the dataset must come with
        the trainer (`eval_dataset=`) or the run must keep a live reference, as TRL says for text data.
        """
        if not getattr(self, "_ref_logps_cached", False) or dataset is None or isinstance(dataset, str):
            return dataset
        if isinstance(dataset, dict):
            return {key: self._with_reference_columns(ds, key) for key, ds in dataset.items()}
        if isinstance(dataset, IterableDataset):
            return super()._precompute_ref_logps(dataset, name, 1)  # TRL's own refusal
        if all(column in (dataset.column_names or []) for column in REF_COLUMNS):
            return dataset
        step = self.state.global_step
        if self.ref_model is None and not (self._reference_is_policy and step == 0):
            why = f"training has started (step {step})" if step else "the reference has other weights than the policy"
            raise ValueError(
                "Cannot compute reference log-probs for a dataset passed to `evaluate()`/`predict()`: with "
                "`precompute_ref_log_probs=True` on vision data the reference model is freed once its log-probs are "
                f"cached, and the policy cannot stand in for it ({why}). Provide this dataset as `eval_dataset` at "
                "initialization, or set `precompute_ref_log_probs=False` to keep a live reference."
            )
        batch_size = self.args.precompute_ref_batch_size or self.args.per_device_eval_batch_size
        return self._cached_ref_logps(dataset, name, batch_size, self._ref_identity)

    def _set_signature_columns_if_needed(self):
        super()._set_signature_columns_if_needed()
        if getattr(self, "_ref_logps_cached", False) and self._signature_columns is not None:
            self._signature_columns = list(dict.fromkeys([*self._signature_columns, *REF_COLUMNS]))

    # ------------------------------------------------------------------------------------------ reference cache
    def ref_logps_cache_dir(self) -> Path:
        folder = getattr(self.args, "ref_logps_cache_dir", None)
        return Path(folder) if folder else Path(self.args.output_dir) / "ref_logps"

    def _reference_identity(self) -> dict:
        identity = getattr(self, "_ref_identity", None)
        if identity is None:
            model = self.ref_model if self.ref_model is not None else self.model
            identity = reference_identity(self.accelerator.unwrap_model(model), self.processing_class)
        return identity

    def _cache_reference_log_probs(self):
        identity = self._reference_identity()
        self._ref_identity = identity  # `evaluate`/`predict` datasets are keyed the same way
        batch_size = self.args.precompute_ref_batch_size or self.args.per_device_train_batch_size
        self.train_dataset = self._cached_ref_logps(self.train_dataset, "train", batch_size, identity)
        if self.eval_dataset is not None:
            eval_bs = self.args.precompute_ref_batch_size or self.args.per_device_eval_batch_size
            if isinstance(self.eval_dataset, dict):
                self.eval_dataset = {
                    name: self._cached_ref_logps(ds, name, eval_bs, identity) for name, ds in self.eval_dataset.items()
                }
            else:
                self.eval_dataset = self._cached_ref_logps(self.eval_dataset, "eval", eval_bs, identity)
        self._ref_logps_cached = True
        self.precompute_ref_logps = True
        if not isinstance(self.data_collator, _RefLogpsCollator):
            self.data_collator = _RefLogpsCollator(self.data_collator)
        # The reference is never needed again: free it before the optimizer and activations take the memory.
        self.ref_model = None
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    def _cache_key(self, dataset, name: str, identity: dict) -> tuple[str, dict]:
        args = self.args
        payload = {
            "version": REF_CACHE_VERSION,
            "dataset": dataset_fingerprint(dataset),
            "rows": len(dataset),
            # The pixels, not only the paths: images replaced in place must not reuse reference log-probs.
            "images": dataset_images_digest(dataset),
            "reference": identity,
            "max_length": args.max_length,
            "truncation": {
                field_name: getattr(args, field_name, None)
                for field_name in ("max_prompt_length", "max_completion_length", "truncation_mode", "padding_free")
            },
            "ld_alpha": getattr(args, "ld_alpha", None),
            "use_logits_to_keep": getattr(args, "use_logits_to_keep", None),
            "split": name,
        }
        payload = json.loads(json.dumps(payload, sort_keys=True, default=str))
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:24], payload

    def _cached_ref_logps(self, dataset, name: str, batch_size: int, identity: dict):
        from accelerate.utils import broadcast_object_list
        from safetensors.torch import load_file, save_file

        key, payload = self._cache_key(dataset, name, identity)
        folder = self.ref_logps_cache_dir()
        # Rank 0 decides (key and whether the file exists) and every rank follows: ranks that saw the file system at
        # different moments, or hashed differently, must not split into "reuse" and "recompute".
        decision = [key, (folder / f"{name}-{key}.safetensors").exists()]
        if self.accelerator.num_processes > 1:
            broadcast_object_list(decision, from_process=0)
        key, exists = decision
        path = folder / f"{name}-{key}.safetensors"
        if exists:
            if self.accelerator.is_main_process:
                logger.info(
                    "Reference log-probs (%s): reusing the cache %s (key %s, nothing changed).", name, path, key
                )
        else:
            if self.accelerator.is_main_process:
                logger.info(
                    "Reference log-probs (%s): no cache for key %s in %s; computing them. %s",
                    name,
                    key,
                    folder,
                    _describe_stale_caches(folder, name, payload),
                )
            chosen, rejected = self._run_reference_pass(dataset, name, batch_size)
            if self.accelerator.is_main_process:
                folder.mkdir(parents=True, exist_ok=True)
                tmp = path.with_suffix(".tmp")
                save_file(
                    {"ref_chosen_logps": chosen, "ref_rejected_logps": rejected}, str(tmp), metadata={"key": key}
                )
                os.replace(tmp, path)  # atomic: a run killed mid-write never leaves a half cache behind
                meta = {**payload, "key": key, "file": path.name, "num_rows": int(chosen.numel())}
                path.with_suffix(".json").write_text(json.dumps(meta, indent=2, sort_keys=True))
            self.accelerator.wait_for_everyone()
        tensors = load_file(str(path))
        chosen, rejected = tensors["ref_chosen_logps"], tensors["ref_rejected_logps"]
        if chosen.numel() != len(dataset):
            raise ValueError(
                f"Cached reference log-probs {path} hold {chosen.numel()} rows, dataset has {len(dataset)}."
            )
        for column in REF_COLUMNS:
            if column in dataset.column_names:
                dataset = dataset.remove_columns(column)
        dataset = dataset.add_column("ref_chosen_logps", chosen.tolist())
        return dataset.add_column("ref_rejected_logps", rejected.tolist())

    @torch.no_grad()
    def _run_reference_pass(self, dataset, name: str, batch_size: int):
        from accelerate.utils import tqdm
        from torch.utils.data import DataLoader

        collator = (
            self.data_collator.inner if isinstance(self.data_collator, _RefLogpsCollator) else self.data_collator
        )
        loader = DataLoader(
            dataset,
            batch_size=batch_size,
            collate_fn=collator,
            shuffle=False,
            num_workers=self.args.dataloader_num_workers,
        )
        loader = self.accelerator.prepare(loader)
        model = self.ref_model if self.ref_model is not None else self.model
        was_training = model.training
        model.eval()
        chosen, rejected = [], []
        try:
            for batch in tqdm(
                loader, desc=f"Reference log-probs ({name})", disable=bool(os.environ.get("TQDM_DISABLE", ""))
            ):
                with self._compact_head():
                    c, r = self.compute_ref_log_probs(model, batch)
                c, r = self.accelerator.gather_for_metrics((c, r))
                chosen.append(c.float().cpu())
                rejected.append(r.float().cpu())
        finally:
            model.train(was_training)
        return torch.cat(chosen), torch.cat(rejected)


__all__ = [
    "FastDPOArguments",
    "FastDPOMixin",
    "compact_lm_head_scoring",
    "install_pair_forward",
    "pack_pairs",
    "pack_rows",
    "pair_forward",
    "plan_pairs",
]
