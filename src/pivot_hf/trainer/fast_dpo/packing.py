"""Packing of preference pairs and of plain rows: where every token of a `[chosen..., rejected...]` batch goes.

`plan_pairs` finds the shared prefix of each pair, `pack_pairs` lays each pair out as `[prefix | chosen tail | rejected
tail]` (one row per pair, rows of a bounded width, or one row for pair-block attention), `pack_rows` packs plain rows
back to back (the varlen layout). Each returns the index that maps every original token to its packed position.
"""

from __future__ import annotations

import torch

from .attention import PairBlocks


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
    attention (`attention.PairBlocks`): no dense mask is built (`allowed` is None) and `blocks` holds the
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
