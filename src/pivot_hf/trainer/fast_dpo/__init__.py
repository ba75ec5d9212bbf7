"""Fast PIVOT DPO: one image encoding and one prompt prefix per preference pair, cached reference log-probs.

TRL's vision DPO collator repeats every prompt (and image) for the chosen and the rejected answer, so a stock step
encodes each image four times (chosen/rejected x policy/reference) and runs the shared prefix (hundreds of image
tokens + the question) four times through the LLM. Everything here works *below* TRL's loss code, which is untouched:

- `forward.pair_forward` runs in place of the `PivotModel`'s forward, for the policy and the reference, inside
  `forward.paired_forward`: a context manager the trainer enters around its own forwards, which leaves nothing on
  the model when it exits. For a batch laid out `[chosen_0..chosen_{B-1}, rejected_0..rejected_{B-1}]` it encodes the
  images of the first half only, and packs each pair into one sequence `[common prefix | chosen tail | rejected tail]`
  with a block mask (both tails attend to the prefix, not to each other) and position ids restarting after the prefix.
  The hidden states are scattered back into the collator's layout, so the fused LM head and the loss see exactly what
  the unshared forward gives (causal attention makes prefix states identical in both rows). Rows that are not pairs
  (odd batch, different prompts, custom position ids, ...) take the plain path.
- With `padding_free` (the default) the pairs of a batch are packed back to back, each attending to its own blocks
  only, so no compute goes to padding. With sdpa all pairs share one row and attention is computed pair by pair
  (`attention.PairBlocks`: cost linear in the batch; the trainer selects that function, registered under its own
  name, for the LLM while a run lasts); with eager the rows are as wide as the longest pair under a
  dense block mask (`packing.pack_pairs`); with flash attention the rows become varlen sequences delimited by position
  ids (`packing.pack_rows`).
- `mixin.FastDPOMixin` (mixed into `PivotDPOTrainer` ahead of `trl.DPOTrainer`) enters it, scores only
  completion positions in the LM head on every device (TRL does that on CUDA only), and makes
  `precompute_ref_log_probs=True` work for vision datasets: one pass with a progress bar, stored with the run as
  safetensors + JSON keyed by the dataset fingerprint and the reference weights' hash (`reference_cache`), reused on
  resume; the reference model is freed afterwards.

One job per module: `packing` (where tokens go), `attention` (pair-block attention), `forward` (the paired forward),
`reference_cache` (cache identity), `collator` (cached columns ride along), `mixin` (the trainer side).
"""

from ...configs import FastDPOArguments  # the fields live with the other recipe arguments
from ..compat import compact_lm_head_scoring
from .attention import PAIR_ATTENTION
from .forward import pair_attention_selected, pair_forward, paired_forward
from .mixin import FastDPOMixin
from .packing import pack_pairs, pack_rows, plan_pairs
from .reference_cache import reference_identity


__all__ = [
    "FastDPOArguments",
    "FastDPOMixin",
    "PAIR_ATTENTION",
    "compact_lm_head_scoring",
    "pair_attention_selected",
    "paired_forward",
    "pack_pairs",
    "pack_rows",
    "pair_forward",
    "plan_pairs",
    "reference_identity",
]
