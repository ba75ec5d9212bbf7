"""`benchmarks/flops.py` (the FLOP model behind the benchmark's GFLOP/pair, MFU and "FLOP model" ratio) against a
count done by hand for one small config."""

import sys
from pathlib import Path
from types import SimpleNamespace

import pytest


sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import flops  # noqa: E402


# Vision: width 4, MLP 8, 3 blocks, feature layer -2 (2 blocks run), patch 2, 4 patches per image.
# LLM: width 4, MLP 6, 1 layer, 2 query heads and 1 key/value head of width 2, vocabulary 10.
CONFIG = SimpleNamespace(
    vision_config=SimpleNamespace(hidden_size=4, intermediate_size=8, num_hidden_layers=3, patch_size=2),
    vision_feature_layer=-2,
    text_config=SimpleNamespace(
        hidden_size=4,
        intermediate_size=6,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=2,
        vocab_size=10,
    ),
)
PAIR = {"prefix": 3, "chosen": 2, "rejected": 1, "images": 1, "image_tokens": 4, "width": 5}

# By hand (2 FLOPs per multiply-accumulate):
# vision block: q,k,v,o 4 x (4x4 matmul on 4 tokens) = 4*16*4*2 = 512; MLP 2 x (4x8 on 4 tokens) = 2*32*4*2 = 512;
#   scores + values 2 x (4 tokens x 4 keys x width 4) x 2 = 256  -> 1280 per block, 2 blocks = 2560
# patch embedding: 4 patches x (3 channels x 2 x 2 -> 4) x 2 = 384; projector 4 tokens x (4x4 + 4x4) x 2 = 256
VISION = 2560 + 384 + 256  # 3200 per image
# LLM per token: q (4->4) 32 + o (4->4) 32 + k (4->2) 16 + v (4->2) 16 + gated MLP 3 x (4x6) x 2 = 144 -> 240;
# attention per attended key: scores + values over 2 heads of width 2 = 2 x 4 x 2 = 16
# ours: one row [prefix 3 | chosen 2 | rejected 1] = 6 tokens; keys: prefix 1+2+3 = 6, chosen (3+1)+(3+2) = 9,
#   rejected 3+1 = 4 -> 19; LM head on the 3 answer positions: 3 x 4 x 10 x 2 = 240
OURS_FORWARD = VISION + 6 * 240 + 19 * 16 + 240  # 5184
# stock: rows [prefix | chosen] (5 tokens, 15 keys) and [prefix | rejected] (4 tokens, 10 keys), the image twice
STOCK_FORWARD = 2 * VISION + 9 * 240 + 25 * 16 + 240  # 9200


def test_pair_forward_matches_the_hand_count():
    for path, expected in (("ours", OURS_FORWARD), ("stock", STOCK_FORWARD)):
        got = flops.pair_forward_flops(CONFIG, 3, 2, 1, images=1, image_tokens=4, path=path, head_positions=3)
        assert got == expected, path


def test_step_counts_training_three_forwards_and_the_reference():
    # Training = forward + backward (2x forward); stock runs its reference every step, ours 1/epochs of one.
    stock = flops.dpo_step_flops(CONFIG, [PAIR], "stock", compact_head=True)
    assert stock == {"train": 3 * 9200, "reference": 9200, "total": 4 * 9200}
    ours = flops.dpo_step_flops(CONFIG, [PAIR], "ours", compact_head=True, epochs=3)
    assert ours["train"] == 3 * 5184 and ours["reference"] == pytest.approx(5184 / 3)
    assert flops.dpo_step_flops(CONFIG, [PAIR], "ours", compact_head=True, epochs=1)["total"] == 4 * 5184
    # TRL off CUDA scores every position of both padded rows: 2 x (width 5 - 1) = 8 head positions, not 3.
    plain_head = flops.dpo_step_flops(CONFIG, [PAIR], "stock", compact_head=False)
    assert plain_head["total"] == 4 * (9200 + (8 - 3) * 80)


def test_tower_blocks_that_run_are_counted():
    # A LLaVA tower run whole (3 blocks) costs one more block per image than the cut one.
    full = flops.pair_forward_flops(CONFIG, 3, 2, 1, 1, 4, "stock", head_positions=3, vision_blocks=3)
    assert full == STOCK_FORWARD + 2 * 1280


def test_padded_step_counts_row_slots():
    # Stock's batch of one pair: 2 rows padded to width 5 -> 10 slots x 240, causal triangles 2 x 15 keys x 16.
    batch = {"pairs": 1, "answer_tokens": 3, "rows": {"stock": [5, 5], "ours": [6]}, "keys": {"ours": 19}}
    stock = flops.padded_step_flops(CONFIG, batch, "stock", image_tokens=4, compact_head=True)
    forward = 2 * VISION + 10 * 240 + 30 * 16 + 240
    assert stock["total"] == 4 * forward
    ours = flops.padded_step_flops(CONFIG, batch, "ours", image_tokens=4, compact_head=True, epochs=1)
    assert ours["total"] == 4 * OURS_FORWARD


# A second config with every width distinct (T=9 patches != d_v=6 != d=5, d_q=6 != d through an explicit head_dim,
# 2 LLM layers), so a formula that swaps one width for another (T for d_v in attention, d_v for d in the projector,
# d for d_q in q/o, head_dim ignored) changes the count.
WIDE = SimpleNamespace(
    vision_config=SimpleNamespace(hidden_size=6, intermediate_size=10, num_hidden_layers=3, patch_size=3),
    vision_feature_layer=-2,
    text_config=SimpleNamespace(
        hidden_size=5,
        intermediate_size=7,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=3,
        vocab_size=11,
    ),
)
# vision block: q,k,v,o 4 x 9 x 6 x 6 x 2 = 2592; MLP 2 x 9 x 6 x 10 x 2 = 2160; scores + values 2 x 9 x 9 x 6 x 2 =
#   1944 -> 6696, 2 blocks = 13392; patch embedding 9 x (3 x 3 x 3 -> 6) x 2 = 2916; projector 9 x (6x5 + 5x5) x 2 = 990
WIDE_VISION = 13392 + 2916 + 990  # 17298
# LLM per token, 2 layers: q, o 2 x 5 x 6 x 2 = 120; k, v 2 x 5 x 3 x 2 = 60; MLP 3 x 5 x 7 x 2 = 210 -> 390 x 2 = 780;
#   per attended key 2 layers x (scores + values, d_q 6) 2 x 6 x 2 = 48; LM head 5 answer positions x 5 x 11 x 2 = 550
# pair: prefix 4, chosen 3, rejected 2. ours: 9 tokens; keys 10 + (3 x 4 + 6) + (2 x 4 + 3) = 39.
WIDE_OURS = WIDE_VISION + 9 * 780 + 39 * 48 + 550  # 26740
# stock: rows of 7 and 6 tokens (13), keys 28 + 21 = 49, the image twice.
WIDE_STOCK = 2 * WIDE_VISION + 13 * 780 + 49 * 48 + 550  # 47638


def test_distinct_widths_match_the_hand_count():
    for path, expected in (("ours", WIDE_OURS), ("stock", WIDE_STOCK)):
        got = flops.pair_forward_flops(WIDE, 4, 3, 2, images=1, image_tokens=9, path=path, head_positions=5)
        assert got == expected, path
    # Without an explicit head_dim it is hidden / heads: d 6, 3 heads -> head_dim 2, d_q 6, d_kv 2 (1 layer, MLP 7):
    # 2 x (2 x 6 x 6 + 2 x 6 x 2) + 6 x 6 x 7 = 444 per token, 4 x 6 = 24 per attended key.
    implicit = SimpleNamespace(
        text_config=SimpleNamespace(
            hidden_size=6, intermediate_size=7, num_hidden_layers=1, num_attention_heads=3, num_key_value_heads=1
        )
    )
    assert flops._llm_token_flops(implicit) == (444, 24)


def test_sampled_paper_shape_batches_lay_out_as_each_path_runs():
    """`flops.py`'s table samples MMPR-like batches: stock pads 2B rows to the longest, ours packs the valid tokens in
    one row; the prefix (576 image tokens and more) is counted twice by stock, once by ours."""
    for batch in flops.sampled_batches(batch_pairs=4, batches=20, seed=1, image_tokens=576):
        assert batch["rows"]["ours"] == [batch["packed_tokens"]]
        assert len(batch["rows"]["stock"]) == 8 and sum(batch["rows"]["stock"]) >= batch["tokens"]
        assert batch["tokens"] - batch["packed_tokens"] >= 4 * 576  # each pair's prefix once less
        ours = flops.rows_forward_flops(CONFIG, batch["rows"]["ours"], batch["keys"]["ours"])
        assert ours < flops.rows_forward_flops(CONFIG, batch["rows"]["stock"])
