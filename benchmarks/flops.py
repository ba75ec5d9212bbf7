"""FLOP count of one DPO step (stock TRL path vs pivot_hf's fast path), for MFU.

Counted as 2 FLOPs per multiply-accumulate of every matmul (layer norms, activations, softmax and the optimizer are
left out, as in the usual MFU convention). Per forward pass:

- vision tower, per image of `T` patches, over the `k` blocks that run (feature layer -2: all but the last):
  `k * (2T(4 d_v^2 + 2 d_v m_v) + 4 T^2 d_v) + 2T(3 p^2) d_v` (q/k/v/o + MLP, attention scores + values, patch embed)
- projector (mlp2x_gelu), per image: `2T(d_v d + d^2)`
- LLM, per token and layer: `2(2 d d_q + 2 d d_kv) + 6 d m` (q/o, k/v, gated MLP), plus attention `4 d_q c`
  where `c` is the number of keys the token attends to (causal: position + 1; a packed tail: prefix + position + 1)
- LM head: `2 d V` per scored position (TRL on CUDA: completion positions; TRL off CUDA: every position)

A training pass costs 3x its forward (backward = 2x forward), a reference pass 1x. The stock path runs the reference
every step; ours runs it once per cached schedule, so its per-step share is `1 / epochs` of one reference pass.
MFU = executed FLOPs per second / the accelerator's dense peak.

`dpo_step_flops` counts the useful work (valid tokens only). `padded_step_flops` counts what the kernels execute once
the batch is laid out in rows: every slot of a row, padding included, runs the dense layers (and the LM head where it
scores every position), and attention runs over the causal triangle of each row, `W(W+1)/2` keys for a row of width
`W` (what a causal or dense-masked kernel computes; the block structure of a packed row is not skipped). Padding share =
1 - valid tokens / row slots. Stock pads 2B rows to the longest row of the batch; ours without padding-free pads B
packed pairs to the longest pair; ours padding-free with sdpa packs all pairs into one row without padding and computes
attention per pair (`[prefix | chosen]` causal, the rejected tail's whole `r x (p + r)` rectangle under its mask), with
eager into rows as wide as the longest pair under a dense block mask.
"""

from __future__ import annotations


# Dense bf16 tensor-core peaks (no sparsity), FLOP/s.
PEAK_FLOPS = {"H100": 989.4e12, "H200": 989.4e12, "A100": 312e12}


def peak_flops(device_name: str | None) -> float | None:
    if not device_name:
        return None
    for key, value in PEAK_FLOPS.items():
        if key in device_name:
            return value
    return None


def _vision_flops(config, tokens: int, blocks: int | None = None) -> float:
    """Vision tower + projector forward FLOPs per image of `tokens` patches; `blocks`: the tower blocks that run
    (default: those up to the feature layer, as the fast path runs them)."""
    v = config.vision_config
    d, m = v.hidden_size, v.intermediate_size
    if blocks is None:
        layer = config.vision_feature_layer if isinstance(config.vision_feature_layer, int) else -1
        blocks = layer if layer >= 0 else v.num_hidden_layers + 1 + layer
    patch = v.patch_size if isinstance(v.patch_size, int) else v.patch_size[0]
    per_block = 2 * tokens * (4 * d * d + 2 * d * m) + 4 * tokens * tokens * d
    embed = 2 * tokens * 3 * patch * patch * d
    projector = 2 * tokens * (d * config.text_config.hidden_size + config.text_config.hidden_size**2)
    return blocks * per_block + embed + projector


def _llm_token_flops(config) -> tuple[float, float]:
    """(dense FLOPs per token over all layers, attention FLOPs per attended key over all layers)."""
    t = config.text_config
    d, m, layers = t.hidden_size, t.intermediate_size, t.num_hidden_layers
    head_dim = getattr(t, "head_dim", None) or d // t.num_attention_heads
    dq, dkv = t.num_attention_heads * head_dim, t.num_key_value_heads * head_dim
    dense = layers * (2 * (2 * d * dq + 2 * d * dkv) + 6 * d * m)
    return dense, layers * 4 * dq


def _causal_keys(n: int, offset: int = 0) -> int:
    # sum over positions i < n of (offset + i + 1)
    return n * offset + n * (n + 1) // 2


def pair_forward_flops(
    config,
    prefix: int,
    chosen: int,
    rejected: int,
    images: int,
    image_tokens: int,
    path: str,
    head_positions: int,
    vision_blocks: int | None = None,
) -> float:
    """Forward FLOPs of one preference pair: `prefix` shared tokens (images + prompt), answer tails, LM-head rows."""
    dense, per_key = _llm_token_flops(config)
    vision = images * _vision_flops(config, image_tokens, vision_blocks) if images else 0.0
    if path == "stock":  # two full rows, each with its own image encoding
        tokens = 2 * prefix + chosen + rejected
        keys = _causal_keys(prefix + chosen) + _causal_keys(prefix + rejected)
        vision *= 2
    else:  # one packed row: prefix once, each tail attends to the prefix and itself
        tokens = prefix + chosen + rejected
        keys = _causal_keys(prefix) + _causal_keys(chosen, prefix) + _causal_keys(rejected, prefix)
    head = 2 * config.text_config.hidden_size * config.text_config.vocab_size * head_positions
    return vision + tokens * dense + keys * per_key + head


def dpo_step_flops(
    config, pairs: list[dict], path: str, compact_head: bool, epochs: int = 3, vision_blocks: int | None = None
) -> dict:
    """Useful FLOPs of one optimizer step over `pairs` (dicts of prefix/chosen/rejected/images/image_tokens/width).

    `width` is the padded row length of the collated batch: what TRL's LM head scores off CUDA. `vision_blocks`: the
    tower blocks the path's forward runs (default: up to the feature layer).
    """
    train = reference = 0.0
    for pair in pairs:
        answers = pair["chosen"] + pair["rejected"]
        head = answers if compact_head else 2 * (pair["width"] - 1)
        fwd = pair_forward_flops(
            config,
            pair["prefix"],
            pair["chosen"],
            pair["rejected"],
            pair["images"],
            pair["image_tokens"],
            path,
            head,
            vision_blocks,
        )
        train += 3 * fwd
        reference += fwd
    if path != "stock":
        reference /= epochs  # cached once for the whole schedule
    return {"train": train, "reference": reference, "total": train + reference}


def rows_forward_flops(config, widths: list[int], keys: int | None = None) -> float:
    """LLM forward FLOPs of rows of the given widths (tokens), padding slots included (see the module docstring).

    `keys`: the attended keys summed over all queries when attention does not cover each row's causal triangle
    (pair-block attention over one packed row); default: the causal triangle of every row."""
    dense, per_key = _llm_token_flops(config)
    if keys is None:
        keys = sum(_causal_keys(w) for w in widths)
    return sum(widths) * dense + keys * per_key


def padded_step_flops(
    config,
    batch: dict,
    path: str,
    image_tokens: int,
    compact_head: bool,
    epochs: int = 3,
    vision_blocks: int | None = None,
) -> dict:
    """Executed FLOPs of one optimizer step laid out as `path` runs it, padding included.

    `batch`: `pairs`, `answer_tokens` (chosen + rejected tokens of all pairs) and `rows` (path -> widths of the LLM rows
    that path processes). Stock encodes each image twice per model, ours once; the LM head scores the answer tokens
    (compact) or every slot of the stock rows (TRL off CUDA).
    """
    widths = batch["rows"][path]
    images = batch["pairs"] * (2 if path == "stock" else 1)
    head_rows = batch["answer_tokens"] if compact_head else sum(batch["rows"]["stock"])
    head = 2 * config.text_config.hidden_size * config.text_config.vocab_size * head_rows
    keys = batch.get("keys", {}).get(path)
    fwd = images * _vision_flops(config, image_tokens, vision_blocks) + rows_forward_flops(config, widths, keys) + head
    reference = fwd if path == "stock" else fwd / epochs
    return {"train": 3 * fwd, "reference": reference, "total": 3 * fwd + reference}


def padding_share(batches: list[dict], path: str) -> float:
    """Share of the processed row slots that are padding, over `batches` (see `padded_step_flops`)."""
    valid = sum(b["tokens"] if path == "stock" else b["packed_tokens"] for b in batches)
    slots = sum(sum(b["rows"][path]) for b in batches)
    return 1.0 - valid / slots
