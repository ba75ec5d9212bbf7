"""Attention computed pair by pair over one packed row: padding-free prefix-shared DPO on plain sdpa.

The pair forward packs the preference pairs of a micro-batch back to back into a single row, each pair laid out as
`[prefix | chosen tail | rejected tail]`. The dense layers of the LLM then see exactly the valid tokens (no padding),
and attention must stay inside each pair: the prefix and the chosen tail attend causally to themselves, the rejected
tail attends to the prefix and causally to itself, never to the chosen tail or to another pair. A dense block mask over
the whole row would make attention quadratic in the batch, so it is computed per pair instead, with two
`scaled_dot_product_attention` calls per pair and layer:

- queries `[prefix | chosen]` over keys `[prefix | chosen]` with `is_causal=True` (no mask: the fused kernels apply);
- queries `[rejected]` over keys `[prefix | rejected]` with the bottom-right-aligned causal mask (`tail_mask`).

This is the varlen ("cu_seqlens") layout of flash-attention-2 with the chosen/rejected fork added, on any device that
runs sdpa. The layout reaches the attention functions through the 4-D `attention_mask` argument, which transformers'
mask builders pass through unchanged: an empty `(1, 1, 0, 0)` tensor carrying a `PairBlocks` (`PairBlocks.marker`).
The function is registered under its own name, `PAIR_ATTENTION`, through transformers' public
`AttentionInterface.register` (and `AttentionMaskInterface.register`, so that masks for other calls are built as for
sdpa); the trainer selects it for the LLM with `set_attn_implementation` while a training or evaluation run lasts
(`forward.pair_attention_selected`) and puts the user's choice back afterwards. It computes pair blocks when it
receives a `PairBlocks.marker` and calls transformers' `sdpa` function, unchanged, for every other mask; transformers'
`sdpa` entry itself is never touched. Any other attention function receiving the marker fails loudly on its empty
shape instead of attending across pairs.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS


# The name the LLM's `attn_implementation` takes while pair-block attention is selected.
PAIR_ATTENTION = "pivot_pair_sdpa"
MARKER_ATTRIBUTE = "pivot_pair_blocks"


def tail_mask(prefix: int, tail: int, window: int | None = None, device=None) -> torch.Tensor:
    """Boolean `(tail, prefix + tail)` mask (True = attend) of `tail` queries over `[prefix | tail]` keys.

    Tail token `j` sits at position `prefix + j` of its sequence, so it attends to key `k` iff `k <= prefix + j`
    (causal attention aligned to the bottom-right corner), and, with a sliding `window`, iff also
    `prefix + j - k < window` (transformers' sliding-window rule: a query sees its `window` most recent keys). The
    rejected tail over `[prefix | rejected]` is `tail_mask(prefix, rejected)`; `[prefix | chosen]` under a window is
    `tail_mask(0, prefix + chosen, window)`.
    """
    q = torch.arange(tail, device=device)[:, None] + prefix
    k = torch.arange(prefix + tail, device=device)[None, :]
    allowed = k <= q
    if window is not None:
        allowed &= q - k < window
    return allowed


@dataclass
class PairBlocks:
    """Where every pair sits in the packed row: `(start, prefix, chosen, rejected)` token counts per pair.

    Python ints, so that no layer has to synchronise with the device to read them. The pairs cover the row exactly:
    pair `i` starts where pair `i - 1` ends, and the last one ends at the row's last token.
    """

    spans: list[tuple[int, int, int, int]]
    device: torch.device | str = "cpu"
    calls: int = 0  # attention layers that computed pair blocks (checked after the forward: see `check_used`)
    _masks: dict = field(default_factory=dict, repr=False)

    def __post_init__(self):
        end = 0
        for start, prefix, chosen, rejected in self.spans:
            if start != end or min(prefix, chosen, rejected) < 0 or prefix + chosen == 0:
                raise ValueError(f"Pair spans must tile the row from token 0 in order, got {self.spans}.")
            end = start + prefix + chosen + rejected

    @property
    def tokens(self) -> int:
        return sum(p + a + r for _, p, a, r in self.spans)

    def marker(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The `attention_mask` to pass to the LLM: an empty 4-D tensor carrying this layout."""
        marker = torch.empty((1, 1, 0, 0), dtype=dtype, device=self.device)
        setattr(marker, MARKER_ATTRIBUTE, self)
        return marker

    def _mask(self, prefix: int, tail: int, window: int | None) -> torch.Tensor:
        # Built once per forward and shared by every layer (and by the backward's recomputation).
        key = (prefix, tail, window)
        if key not in self._masks:
            self._masks[key] = tail_mask(prefix, tail, window, device=self.device)
        return self._masks[key]

    def attend(
        self,
        module: torch.nn.Module,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        dropout: float = 0.0,
        scaling: float | None = None,
        sliding_window: int | None = None,
        **kwargs,
    ) -> tuple[torch.Tensor, None]:
        """Attention of every pair over its own blocks. `query` `(1, heads, tokens, head_dim)`, `key`/`value`
        `(1, kv_heads, tokens, head_dim)`; returns `((1, tokens, heads, head_dim), None)` like transformers' sdpa.

        Raises `ValueError` for what sdpa cannot express either (logit soft-capping, attention sinks) and when the
        tensors do not cover the layout (a marker given to a model it was not built for).
        """
        for unsupported in ("softcap", "s_aux"):
            if kwargs.get(unsupported) is not None:
                raise ValueError(f"Pair-block attention does not support `{unsupported}`; use padding_free=False.")
        if query.shape[0] != 1 or query.shape[2] != self.tokens or key.shape[2] != self.tokens:
            raise ValueError(
                f"Pair-block attention expects one packed row of {self.tokens} tokens, got queries "
                f"{tuple(query.shape)} and keys {tuple(key.shape)} (a cache or another layout is not supported)."
            )
        self.calls += 1
        groups = getattr(module, "num_key_value_groups", 1)

        def widen(t: torch.Tensor) -> torch.Tensor:
            # Masked calls get the kv heads repeated for their query heads (fused kernels take grouped-query heads
            # only without a mask); the unmasked causal calls pass `enable_gqa` instead and copy nothing.
            return t.repeat_interleave(groups, dim=1) if groups > 1 else t

        sdpa = torch.nn.functional.scaled_dot_product_attention
        # One split per tensor into [prefix + chosen, rejected] chunks, pair after pair: views whose backward is one
        # concatenation (slicing the whole row per pair would back-propagate a row-sized zero tensor per slice).
        sizes = [size for _, prefix, chosen, rejected in self.spans for size in (prefix + chosen, rejected)]
        queries, keys, values = (t.split(sizes, dim=2) for t in (query, key, value))
        outputs = []
        for i, (_, prefix, chosen, rejected) in enumerate(self.spans):
            q, k, v = queries[2 * i], keys[2 * i], values[2 * i]
            if sliding_window is not None and prefix + chosen > sliding_window:
                mask = self._mask(0, prefix + chosen, sliding_window)
                outputs.append(sdpa(q, widen(k), widen(v), attn_mask=mask, dropout_p=dropout, scale=scaling))
            else:
                outputs.append(sdpa(q, k, v, is_causal=True, dropout_p=dropout, scale=scaling, enable_gqa=groups > 1))
            if rejected:
                k_rejected = widen(torch.cat([k[:, :, :prefix], keys[2 * i + 1]], dim=2))
                v_rejected = widen(torch.cat([v[:, :, :prefix], values[2 * i + 1]], dim=2))
                mask = self._mask(prefix, rejected, sliding_window)
                outputs.append(
                    sdpa(queries[2 * i + 1], k_rejected, v_rejected, attn_mask=mask, dropout_p=dropout, scale=scaling)
                )
        # `(1, heads, n, head_dim)` chunks -> `(1, tokens, heads, head_dim)` in one copy.
        return torch.cat([out.transpose(1, 2) for out in outputs], dim=1), None

    def check_used(self, model_name: str) -> None:
        """Raise if no attention layer computed pair blocks during the forward: the LLM's attention does not go
        through the registered pair-block function (custom remote code, say) and may have ignored the mask, attending
        across pairs."""
        if self.calls == 0:
            raise RuntimeError(
                f"padding_free: the attention layers of {model_name} did not go through the registered attention "
                f"function `{PAIR_ATTENTION}`, so the pairs packed into one row may have attended to each other. Set "
                "`padding_free: false` (or attn_implementation: eager) for this model."
            )


def pair_blocks_of(attention_mask) -> PairBlocks | None:
    return getattr(attention_mask, MARKER_ATTRIBUTE, None) if attention_mask is not None else None


def pair_block_sdpa(module, query, key, value, attention_mask, *args, **kwargs):
    """The attention function registered as `PAIR_ATTENTION`: pair blocks for a `PairBlocks.marker` mask,
    transformers' own `sdpa` function for any other mask."""
    blocks = pair_blocks_of(attention_mask)
    if blocks is None:
        return ALL_ATTENTION_FUNCTIONS["sdpa"](module, query, key, value, attention_mask, *args, **kwargs)
    return blocks.attend(module, query, key, value, *args, **kwargs)


def register_pair_attention() -> None:
    """Register `pair_block_sdpa` under `PAIR_ATTENTION` (idempotent). Done on import of this module; nothing else
    in transformers' registries changes."""
    AttentionInterface.register(PAIR_ATTENTION, pair_block_sdpa)
    AttentionMaskInterface.register(PAIR_ATTENTION, sdpa_mask)


register_pair_attention()


__all__ = ["PAIR_ATTENTION", "PairBlocks", "pair_block_sdpa", "pair_blocks_of", "register_pair_attention", "tail_mask"]
