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


def pair_block_keys(prefix, chosen, rejected):
    """Keys attended over one pair under pair-block attention (sdpa): `[prefix | chosen]` causal, the rejected tail
    over the whole `r x (p + r)` rectangle its mask covers. Ints or integer tensors (elementwise, one per pair)."""
    head = prefix + chosen
    return head * (head + 1) // 2 + rejected * (prefix + rejected)


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


# ------------------------------------------------------------------------------------ the paper's shape, by sampling
def sampled_batches(batch_pairs: int, batches: int, seed: int, image_tokens: int, template_tokens: int = 30) -> list:
    """`batches` batches of `batch_pairs` MMPR-like pairs (lengths from `dpo_throughput.MMPR_MIX`, one token per word),
    laid out as each path runs them: stock 2B rows padded to the longest row, ours (pair blocks on sdpa) one row of the
    valid tokens with per-pair attention. Prefix = image tokens + question + `template_tokens` (the chat template's
    system prompt and turn markers); each answer carries 2 more (end of turn and newline)."""
    import random
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from dpo_throughput import _answer_lengths

    rng = random.Random(seed)
    out = []
    for _ in range(batches):
        pairs = [_answer_lengths(rng, "mmpr") for _ in range(batch_pairs)]
        prefixes = [image_tokens + question + template_tokens for question, _, _ in pairs]
        chosen = [c + 2 for _, c, _ in pairs]
        rejected = [r + 2 for _, _, r in pairs]
        width = max(max(p + c, p + r) for p, c, r in zip(prefixes, chosen, rejected))
        packed = [p + c + r for p, c, r in zip(prefixes, chosen, rejected)]
        keys = sum(pair_block_keys(p, c, r) for p, c, r in zip(prefixes, chosen, rejected))
        out.append(
            {
                "pairs": batch_pairs,
                "tokens": sum(2 * p + c + r for p, c, r in zip(prefixes, chosen, rejected)),
                "packed_tokens": sum(packed),
                "answer_tokens": sum(chosen) + sum(rejected),
                "rows": {"stock": [width] * (2 * batch_pairs), "ours": [sum(packed)]},
                "keys": {"ours": keys},
            }
        )
    return out


def paper_shape_table(batches: int = 500, seed: int = 0) -> list[dict]:
    """FLOP-model ratios stock/ours per pair at the paper's shape (SigLIP2-So400m/16 at 384 px, 576 image tokens;
    Qwen2.5-0.5B / 1.5B), MMPR-like lengths, batch 2 and 8, the stock LM head on every position (TRL off CUDA) or on
    the completion positions (TRL on CUDA), the reference amortised over 1 and 3 epochs."""
    from pivot_hf.testing import real_shape_pivot_config

    rows = []
    for text in ("Qwen2.5-0.5B-Instruct", "Qwen2.5-1.5B-Instruct"):
        config = real_shape_pivot_config(text=text)
        image_tokens = (config.vision_config.image_size // config.vision_config.patch_size) ** 2
        for batch_pairs in (2, 8):
            sample = sampled_batches(batch_pairs, batches, seed, image_tokens)
            for compact in (False, True):
                row = {"llm": text, "batch_pairs": batch_pairs, "stock_head": "completion" if compact else "every"}
                stock = sum(padded_step_flops(config, b, "stock", image_tokens, compact)["total"] for b in sample)
                for epochs in (1, 3):
                    ours = sum(
                        padded_step_flops(config, b, "ours", image_tokens, True, epochs=epochs)["total"]
                        for b in sample
                    )
                    row[f"ratio_{epochs}_epoch"] = stock / ours
                row["stock_tflop_per_pair"] = stock / (batches * batch_pairs) / 1e12
                rows.append(row)
    return rows


if __name__ == "__main__":
    import argparse
    import json

    parser = argparse.ArgumentParser(description="The FLOP model's ratios at the paper's shape (no model is built).")
    parser.add_argument("--batches", type=int, default=500, help="sampled batches per row of the table")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default=None, help="also write the rows here")
    cli = parser.parse_args()
    HEADS = {"every": "every position (TRL off CUDA)", "completion": "completion positions (TRL on CUDA)"}
    table = paper_shape_table(cli.batches, cli.seed)
    print("| LLM | batch (pairs) | stock LM head | 1 epoch | 3 epochs | stock TFLOP/pair |")
    print("|---|---|---|---|---|---|")
    for r in table:
        print(
            f"| {r['llm'].removesuffix('-Instruct')} | {r['batch_pairs']} | {HEADS[r['stock_head']]} | "
            f"{r['ratio_1_epoch']:.2f} | {r['ratio_3_epoch']:.2f} | {r['stock_tflop_per_pair']:.1f} |"
        )
    if cli.json:
        with open(cli.json, "w", encoding="utf-8") as f:
            json.dump(table, f, indent=2)
