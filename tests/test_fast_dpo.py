"""Fast PIVOT DPO: shared images / shared prefixes are exact, cached reference log-probs give the same loss."""

import copy
import importlib.util
import json
from unittest import mock

import numpy as np
import pytest
import torch
from datasets import Dataset
from PIL import Image
from trl import DPOConfig, DPOTrainer
from trl.trainer.dpo_trainer import DataCollatorForVisionPreference
from trl.trainer.utils import add_fused_lm_head

from pivot_hf import PivotForConditionalGeneration, PivotProcessor
from pivot_hf.trainer.fast_dpo import (
    FastDPOMixin,
    compact_lm_head_scoring,
    pack_pairs,
    pack_rows,
    pair_attention_selected,
    paired_forward,
    plan_pairs,
)
from pivot_hf.trainer.fast_dpo.packing import _place_units


def _trainer_and_config():
    # The project's trainer once it exists (it must carry the mixin); until then a minimal stand-in.
    if importlib.util.find_spec("pivot_hf.trainer") is not None:
        try:
            from pivot_hf.configs import PivotDPOConfig
            from pivot_hf.trainer.dpo import PivotDPOTrainer

            assert issubclass(PivotDPOTrainer, FastDPOMixin)
            return PivotDPOTrainer, PivotDPOConfig
        except ImportError:
            pass

    class _T(FastDPOMixin, DPOTrainer):
        pass

    return _T, DPOConfig


def _image(rng, size=32):
    return Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8))


def _rows(n=4, seed=0):
    rng = np.random.default_rng(seed)
    questions = ["What is in the picture?", "Describe it", "Count the objects please", "Color?"]
    answers = [
        ("A cat sitting.", "A dog running on grass quickly."),
        ("Blue sky with clouds and a long description of it.", "Red."),
        ("Three apples", "Three pears"),  # common start beyond the prompt
        ("Green", "Yellow and a bit of green"),
    ]
    rows = []
    for i in range(n):
        chosen, rejected = answers[i % len(answers)]
        rows.append(
            {
                "images": [_image(rng)],
                "prompt": [
                    {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": questions[i % 4]}]}
                ],
                "chosen": [{"role": "assistant", "content": [{"type": "text", "text": chosen}]}],
                "rejected": [{"role": "assistant", "content": [{"type": "text", "text": rejected}]}],
            }
        )
    return rows


@pytest.fixture(scope="module")
def tiny(tiny_pivot_factory):
    path = tiny_pivot_factory("siglip", "qwen2")
    return path, PivotProcessor.from_pretrained(path)


def _model(path, attn="sdpa"):
    torch.manual_seed(0)
    model = PivotForConditionalGeneration.from_pretrained(path, dtype=torch.float32, attn_implementation=attn)
    add_fused_lm_head(model, outputs=("log_probs", "entropy", "mean_logits", "is_top1"))
    return model


def _left_padded(batch, pad_id):
    """The same rows, left padded instead of flush-left (a layout other collators produce)."""
    ids, mask, comp = batch["input_ids"], batch["attention_mask"], batch["completion_mask"]
    out = {k: v.clone() for k, v in batch.items()}
    for r in range(ids.shape[0]):
        n = int(mask[r].sum())
        for name, src, fill in (("input_ids", ids, pad_id), ("attention_mask", mask, 0), ("completion_mask", comp, 0)):
            row = torch.full_like(src[r], fill)
            row[-n:] = src[r, :n]
            out[name][r] = row
    return out


def _logps_and_grads(model, batch, position_ids=None):
    model.zero_grad(set_to_none=True)
    labels = batch["input_ids"].masked_fill(batch["completion_mask"] == 0, -100)
    kwargs = {k: v for k, v in batch.items() if k != "completion_mask"}
    if position_ids is not None:
        kwargs["position_ids"] = position_ids
    out = model(**kwargs, labels=labels, fused_lm_head=True, use_cache=False)
    logps = out.log_probs.sum(1)
    # Distinct weights per sequence so that a chosen/rejected mix-up cannot cancel out.
    (logps * torch.linspace(1.0, 2.0, logps.numel())).sum().backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    return logps.detach(), grads


def _assert_close(reference, candidate):
    (lp0, g0), (lp1, g1) = reference, candidate
    assert torch.allclose(lp0, lp1, rtol=1e-5, atol=0)
    assert g0.keys() == g1.keys()
    scale = max(g.norm().item() for g in g0.values())
    for name in g0:
        # Per-tensor relative error, floored by the largest gradient: tensors whose exact gradient is zero (key biases
        # under softmax) only carry round-off.
        err = (g0[name] - g1[name]).norm().item()
        assert err <= 1e-5 * max(g0[name].norm().item(), 1e-3 * scale), name


@pytest.mark.parametrize("layout", ["flush_left", "left_padded"])
def test_shared_image_and_prefix_match_plain(tiny, layout):
    path, processor = tiny
    batch = DataCollatorForVisionPreference(processor=processor)(copy.deepcopy(_rows(4)))
    if layout == "left_padded":
        batch = _left_padded(batch, processor.tokenizer.pad_token_id)
    model = _model(path)
    # The plain computation with positions counted from each row's first token (RoPE makes this equal to the
    # collator's default positions for right padding, and is the correct one for left padding).
    start = batch["attention_mask"].argmax(1, keepdim=True)
    positions = (torch.arange(batch["input_ids"].shape[1])[None] - start).clamp(min=0)
    plain = _logps_and_grads(model, batch, position_ids=positions)

    plan = plan_pairs(batch["input_ids"], batch["attention_mask"], model.config.image_token_id)
    assert plan is not None and bool((plan["prefix"] > 16).all())  # 16 image tokens + prompt are shared
    # (share_prefix, compact head): image sharing alone, then image + prefix sharing with TRL's head and with the
    # compact head. Each run costs seconds on CPU (151k-token vocabulary), so left padding checks the full path only.
    variants = [(False, True), (True, False), (True, True)] if layout == "flush_left" else [(True, True)]
    for share_prefix, compact in variants:
        with paired_forward(model, share_image=True, share_prefix=share_prefix), compact_lm_head_scoring(compact):
            _assert_close(plain, _logps_and_grads(model, batch))


def test_not_pairs_fall_back_to_plain(tiny):
    path, processor = tiny
    batch = DataCollatorForVisionPreference(processor=processor)(copy.deepcopy(_rows(3)))
    # Swap two rejected rows: prompts and images no longer line up with their chosen rows.
    order = torch.tensor([0, 1, 2, 4, 3, 5])
    swapped = {k: v[order] for k, v in batch.items()}
    model = _model(path)
    plain = _logps_and_grads(model, swapped)
    # Token-wise the rows still share system prompt and image tokens, but the pixels differ: only image-level checks
    # in the pair forward can tell, and they must send the batch down the plain path.
    with paired_forward(model):
        _assert_close(plain, _logps_and_grads(model, swapped))
    odd = {k: v[:3] for k, v in batch.items()}
    assert plan_pairs(odd["input_ids"], odd["attention_mask"], model.config.image_token_id) is None


def _config(tmp_path, config_class=DPOConfig, **kwargs):
    return config_class(
        output_dir=str(tmp_path / "out"),
        per_device_train_batch_size=2,
        max_steps=2,  # step 2 runs a moved policy against the reference: the cached values really matter
        # Plain SGD: Adam would turn round-off-level gradients (key biases, whose exact gradient is 0) into full-size
        # steps, so two exact computations could differ after one step.
        optim="sgd",
        learning_rate=1.0,
        beta=0.1,
        use_cpu=True,
        report_to="none",
        save_strategy="no",
        logging_steps=1,
        disable_tqdm=True,
        dataloader_num_workers=0,
        seed=0,
        **kwargs,
    )


def _train_one_step(path, processor, dataset, config, cls, live_reference=True):
    model = PivotForConditionalGeneration.from_pretrained(path, dtype=torch.float32)
    ref = PivotForConditionalGeneration.from_pretrained(path, dtype=torch.float32) if live_reference else None
    trainer = cls(model=model, ref_model=ref, args=config, train_dataset=dataset, processing_class=processor)
    result = trainer.train()
    losses = [log["loss"] for log in trainer.state.log_history if "loss" in log]
    return trainer, result, losses


def test_cached_reference_logps_give_the_live_reference_loss(tiny, tmp_path, monkeypatch):
    path, processor = tiny
    dataset = Dataset.from_list(_rows(4))
    cls, config_class = _trainer_and_config()
    _, _, live = _train_one_step(path, processor, dataset, _config(tmp_path / "live"), DPOTrainer)
    _, _, ours_live = _train_one_step(path, processor, dataset, _config(tmp_path / "ours_live", config_class), cls)
    config = _config(tmp_path / "cached", config_class, precompute_ref_log_probs=True)
    trainer, _, cached = _train_one_step(path, processor, dataset, config, cls, live_reference=False)
    assert trainer.ref_model is None  # freed after caching
    assert len(live) == 2 and live[1] != pytest.approx(live[0], rel=1e-4)
    # The acceptance check: same trainer, cached reference == live reference.
    assert cached == pytest.approx(ours_live, rel=1e-6)
    # Cross-check against stock TRL: step 1 exactly; step 2 follows an SGD step with lr 1.0, which turns fp32 round-off
    # differences of the shared-prefix forward into ~1e-4 loss differences, hence the looser bound there.
    assert live[0] == pytest.approx(ours_live[0], rel=1e-6) and live[1] == pytest.approx(ours_live[1], rel=1e-3)

    files = sorted((tmp_path / "cached" / "out" / "ref_logps").iterdir())
    assert [f.suffix for f in files] == [".json", ".safetensors"]
    meta = json.loads(files[0].read_text())
    assert meta["num_rows"] == 4 and meta["reference"]

    # Resuming (a new trainer on the same data and reference) reuses the file instead of running the reference.
    stamp = files[1].stat().st_mtime_ns

    def _no_reference_pass(*args, **kwargs):
        raise AssertionError("the cached reference log-probs were not reused")

    monkeypatch.setattr(cls, "_run_reference_pass", _no_reference_pass)
    _, _, again = _train_one_step(path, processor, dataset, config, cls, live_reference=False)
    assert files[1].stat().st_mtime_ns == stamp and again == pytest.approx(cached, rel=1e-6)


@pytest.mark.slow
def test_gpu_benchmark_code_path_runs_on_cpu_with_a_tiny_config(tmp_path):
    """`benchmarks/dpo_throughput.py --setting gpu` stays exercised without a GPU: its tiny config, both paths, one run.

    Only the agreement of the two paths' losses and the report's shape are asserted; speed lives in BENCHMARKS.md.
    """
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "dpo_throughput.py"
    summary = tmp_path / "summary.json"
    cmd = [sys.executable, str(script), "--setting", "gpu", "--tiny", "--repeats", "1", "--workdir", str(tmp_path)]
    cmd += ["--check"]
    result = subprocess.run(cmd + ["--json", str(summary)], capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    lines = result.stdout.strip().splitlines()
    assert lines[-1].startswith("--check: ") and lines[-1].endswith("ok")
    assert lines[-2].startswith("ratio ours/stock pairs/s, median [min-max] of 1 A/B pairs: 1-epoch ")
    assert "3-epoch" in lines[-2] and "CPU-time ratio" in lines[-2] and "load" in lines[-2]
    report = json.loads(summary.read_text())
    assert report["loss_max_rel_diff"] < 1e-5
    # Equal tower work: the stock LLaVA checkpoint is cut after the feature layer, as ours runs it.
    assert report["vision_blocks_run"]["stock"] == report["vision_blocks_run"]["ours"] == 2
    assert report["stock_options"]["precompute_ref_log_probs"].startswith("refused")
    rows = report["runs"][0]["3"]
    assert set(rows) == {"stock", "ours"} and report["threads"] >= 1
    assert rows["stock"]["losses"] == pytest.approx(rows["ours"]["losses"], rel=1e-5)
    assert set(report["by_epochs"]) == {"1", "3"}


# ------------------------------------------------------------------------------------------------ padding-free
def _mixed_rows(seed=0):
    """Pairs of very different lengths: single-token answers, a long answer, two images, no image."""
    rng = np.random.default_rng(seed)
    long_answer = " ".join(["the cat sits on the red table near a small blue cup"] * 6)

    def row(images, question, chosen, rejected):
        content = [{"type": "image"} for _ in images] + [{"type": "text", "text": question}]
        return {
            "images": images,
            "prompt": [{"role": "user", "content": content}],
            "chosen": [{"role": "assistant", "content": [{"type": "text", "text": chosen}]}],
            "rejected": [{"role": "assistant", "content": [{"type": "text", "text": rejected}]}],
        }

    return [
        row([_image(rng)], "What is in the picture?", "A", "B"),  # single-token answers
        row([_image(rng), _image(rng)], "Compare the two pictures", long_answer, "They differ."),  # two images
        row([], "Say something without a picture", "Nothing to see here at all.", "Hi"),  # no image
        row([_image(rng)], "Count the objects please", "Three", long_answer[:90]),
        row([_image(rng)], "Color?", "Green", "Yellow and a bit of green"),
    ]


def _plain_positions(batch):
    start = batch["attention_mask"].argmax(1, keepdim=True)
    return (torch.arange(batch["input_ids"].shape[1])[None] - start).clamp(min=0)


def _vision_grads_present(grads):
    return any(name.startswith("model.vision_tower") for name in grads)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("truncate", [False, True])
def test_padding_free_pairs_match_plain(tiny, truncate, attn):
    """Several pairs per packed row (mixed lengths, single-token answers, two images, no image; rows truncated by
    `max_length`): log-probs and gradients, vision tower included, equal the plain padded forward. sdpa packs the
    whole micro-batch into one row with pair-block attention; eager packs bounded rows with a dense block mask."""
    path, processor = tiny
    max_length = None
    if truncate:  # cut inside the answers, two tokens after the longest prompt (image tokens are never cut)
        full = DataCollatorForVisionPreference(processor=processor)(copy.deepcopy(_mixed_rows()))
        max_length = int(full["completion_mask"].argmax(1).max()) + 2
    batch = DataCollatorForVisionPreference(processor=processor, max_length=max_length)(copy.deepcopy(_mixed_rows()))
    model = _model(path, attn)
    plain = _logps_and_grads(model, batch, position_ids=_plain_positions(batch))
    assert _vision_grads_present(plain[1])

    plan = plan_pairs(batch["input_ids"], batch["attention_mask"], model.config.image_token_id)
    assert plan is not None
    lengths = (plan["lengths"][: plan["pairs"]] + plan["lengths"][plan["pairs"] :] - plan["prefix"]).tolist()
    # Rows are as wide as the longest pair by default; with room for two pairs, several pairs share a row.
    assert pack_pairs(plan, batch["input_ids"], padding_free=True)["input_ids"].shape[1] == max(lengths)
    wide = pack_pairs(plan, batch["input_ids"], padding_free=True, max_row_tokens=2 * max(lengths))["input_ids"]
    assert wide.shape[0] < plan["pairs"] and wide.shape[1] <= 2 * max(lengths)
    if max_length is not None:
        assert int(batch["attention_mask"].sum(1).max()) == max_length  # some rows really were truncated

    one_row = pack_pairs(plan, batch["input_ids"], single_row=True)
    assert one_row["input_ids"].shape == (1, sum(lengths)) and one_row["allowed"] is None
    assert [p + a + r for _, p, a, r in one_row["blocks"].spans] == lengths

    calls = []
    original = torch.nn.functional.scaled_dot_product_attention
    spy = lambda *a, **k: calls.append(a[0].shape[2]) or original(*a, **k)  # noqa: E731
    for max_row_tokens in (None, 2 * max(lengths)):
        with (
            paired_forward(model, padding_free=True, max_row_tokens=max_row_tokens),
            compact_lm_head_scoring(True),
            mock.patch("torch.nn.functional.scaled_dot_product_attention", spy),
        ):
            _assert_close(plain, _logps_and_grads(model, batch))
    if attn == "sdpa":  # attention ran per pair block: no query block longer than a pair's prefix + tail
        assert calls and max(calls) <= max(lengths)


def test_padding_free_varlen_rows_match_plain(tiny):
    """The layout flash-attention-2 reads (sequences back to back, positions restarting, no mask), run through sdpa's
    packed-sequence mask: the path taken without prefix sharing or with a flash-attention backend."""
    path, processor = tiny
    batch = DataCollatorForVisionPreference(processor=processor)(copy.deepcopy(_mixed_rows(1)))
    model = _model(path)
    plain = _logps_and_grads(model, batch, position_ids=_plain_positions(batch))
    spans = (batch["attention_mask"].argmax(1), batch["attention_mask"].sum(1))
    one_row = pack_rows(*spans, batch["input_ids"])
    assert one_row["input_ids"].shape == (1, int(batch["attention_mask"].sum()))
    bounded = pack_rows(*spans, batch["input_ids"], max_row_tokens=int(spans[1].max()))
    assert bounded["input_ids"].shape[1] == int(spans[1].max()) and bounded["input_ids"].shape[0] > 1
    with paired_forward(model, share_prefix=False, padding_free=True):
        _assert_close(plain, _logps_and_grads(model, batch))


def test_row_placement_is_bounded_and_first_fit():
    lengths = torch.tensor([5, 9, 3, 4, 1, 9])
    rows, offsets, width, n_rows = _place_units(lengths, True, None)
    assert width == 9 and n_rows == 4  # 9 | 9 | 5+4 | 3+1
    ends = {}
    for r, o, n in zip(rows.tolist(), offsets.tolist(), lengths.tolist()):
        assert o + n <= 9
        ends.setdefault(r, []).append((o, o + n))
    for spans in ends.values():  # no overlaps inside a row
        spans.sort()
        assert all(a[1] <= b[0] for a, b in zip(spans, spans[1:]))
    assert _place_units(lengths, True, 16)[3] == 2  # a larger budget: fewer, wider rows
    assert _place_units(lengths, False, None)[3] == 6  # not padding-free: one unit per row


def test_padding_free_trainer_is_on_by_default_and_silences_trl(tiny, tmp_path, monkeypatch):
    """`padding_free` (TRL's own key, which TRL's DPO turns off with a warning) is on and reaches the pair forward."""
    import trl.trainer.dpo_trainer as trl_dpo

    path, processor = tiny
    cls, config_class = _trainer_and_config()
    if config_class is DPOConfig:
        pytest.skip("the project's PivotDPOConfig is not importable")
    config = _config(tmp_path, config_class)
    assert config.padding_free is True
    warnings = []
    monkeypatch.setattr(trl_dpo.logger, "warning", lambda msg, *a, **k: warnings.append(str(msg)))
    model = PivotForConditionalGeneration.from_pretrained(path, dtype=torch.float32)
    ref = PivotForConditionalGeneration.from_pretrained(path, dtype=torch.float32)
    dataset = Dataset.from_list(_rows(2))
    trainer = cls(model=model, ref_model=ref, args=config, train_dataset=dataset, processing_class=processor)
    assert not [w for w in warnings if "padding_free" in w] and trainer.args.padding_free is True
    seen = []
    monkeypatch.setattr(
        "pivot_hf.trainer.fast_dpo.forward.pack_pairs", lambda *a, **k: seen.append(k) or pack_pairs(*a, **k)
    )
    batch = DataCollatorForVisionPreference(processor=processor)(copy.deepcopy(_rows(2)))
    # What `train()` does around its steps: pair-block attention selected, the paired forward around the loss.
    with torch.no_grad(), pair_attention_selected(trainer.model, trainer.ref_model):
        trainer.compute_loss(trainer.model, batch)
    # sdpa (the default): every pair of the micro-batch in one row, attention computed pair by pair.
    assert seen and seen[0]["single_row"] is True


@pytest.mark.parametrize("window", [None, 3])
def test_pair_block_attention_equals_the_dense_block_mask(window):
    """`PairBlocks.attend` (two sdpa calls per pair) against one dense masked attention over the whole row: grouped
    query heads, single-token and empty rejected tails, and a sliding window shorter than the blocks."""
    from pivot_hf.trainer.fast_dpo.attention import PairBlocks

    torch.manual_seed(0)
    spans, start = [], 0
    for prefix, chosen, rejected in ((5, 3, 4), (2, 1, 1), (4, 6, 0), (1, 1, 7)):
        spans.append((start, prefix, chosen, rejected))
        start += prefix + chosen + rejected
    blocks = PairBlocks(spans)
    heads, kv_heads, dim = 4, 2, 8
    q = torch.randn(1, heads, start, dim, requires_grad=True)
    k = torch.randn(1, kv_heads, start, dim, requires_grad=True)
    v = torch.randn(1, kv_heads, start, dim, requires_grad=True)
    module = torch.nn.Module()
    module.num_key_value_groups = heads // kv_heads

    # Independent reference: every token's pair, segment and position in its own sequence, one dense mask.
    owner, segment, position = [], [], []
    for i, (_, prefix, chosen, rejected) in enumerate(spans):
        owner += [i] * (prefix + chosen + rejected)
        segment += [0] * prefix + [1] * chosen + [2] * rejected
        position += list(range(prefix + chosen)) + list(range(prefix, prefix + rejected))
    owner, segment, position = map(torch.tensor, (owner, segment, position))
    visible = (segment[None, :] == 0) | (segment[None, :] == segment[:, None])
    allowed = (owner[:, None] == owner[None, :]) & visible & (position[None, :] <= position[:, None])
    if window is not None:
        allowed &= position[:, None] - position[None, :] < window
    expected = torch.nn.functional.scaled_dot_product_attention(
        q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1), attn_mask=allowed, scale=0.3
    ).transpose(1, 2)
    got, _ = blocks.attend(module, q, k, v, scaling=0.3, sliding_window=window)
    assert got.shape == (1, start, heads, dim)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    weights = torch.randn_like(got)
    grads = torch.autograd.grad((got * weights).sum(), (q, k, v))
    expected_grads = torch.autograd.grad((expected * weights).sum(), (q, k, v))
    for a, b in zip(grads, expected_grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_pair_block_marker_is_refused_by_other_layouts():
    """A marker reaching attention with another row length (a cache, another batch) fails instead of mixing pairs;
    calls without a marker go to transformers' sdpa function unchanged, and transformers' own `sdpa` entry is
    untouched: pair-block attention is registered under a name of its own."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    from pivot_hf.trainer.fast_dpo.attention import PAIR_ATTENTION, PairBlocks, pair_block_sdpa

    assert ALL_ATTENTION_FUNCTIONS["sdpa"] is sdpa_attention_forward
    assert ALL_ATTENTION_FUNCTIONS[PAIR_ATTENTION] is pair_block_sdpa
    module = torch.nn.Module()
    q = torch.randn(1, 2, 5, 4)
    marker = PairBlocks([(0, 2, 2, 2)]).marker()
    with pytest.raises(ValueError, match="one packed row of 6 tokens"):
        pair_block_sdpa(module, q, q, q, marker)
    plain, _ = pair_block_sdpa(module, q, q, q, None, is_causal=True)
    torch.testing.assert_close(plain, sdpa_attention_forward(module, q, q, q, None, is_causal=True)[0])


def test_pair_blocks_with_gradient_checkpointing_match_plain(tiny):
    """The layout rides on the attention mask, which the checkpointed layers keep for their recomputation."""
    path, processor = tiny
    batch = DataCollatorForVisionPreference(processor=processor)(copy.deepcopy(_mixed_rows(2)))
    model = _model(path)
    plain = _logps_and_grads(model, batch, position_ids=_plain_positions(batch))
    # transformers 5.24 renamed it activation checkpointing; the lower end of the tested range has the old name only.
    enable = getattr(model, "activation_checkpointing_enable", None)
    if enable is not None:
        enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    assert any(getattr(m, "gradient_checkpointing", False) for m in model.modules())
    model.train()
    with paired_forward(model, padding_free=True), compact_lm_head_scoring(True):
        _assert_close(plain, _logps_and_grads(model, batch))


def test_attention_that_ignores_the_pair_layout_is_refused(tiny, monkeypatch):
    """An LLM whose attention never reaches the pair-block function (remote code calling sdpa itself, say) would let
    the pairs of the packed row attend to each other: the forward raises instead of training on that."""
    from transformers import AttentionInterface
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    from pivot_hf.trainer.fast_dpo.attention import PAIR_ATTENTION

    path, processor = tiny
    batch = DataCollatorForVisionPreference(processor=processor)(copy.deepcopy(_rows(2)))
    model = _model(path)
    original = ALL_ATTENTION_FUNCTIONS["sdpa"]

    def causal_only(module, query, key, value, attention_mask, *args, **kwargs):
        return original(module, query, key, value, None, *args, **kwargs)

    # The attention layers call a plain causal sdpa that never sees the layout.
    monkeypatch.setitem(AttentionInterface._global_mapping, PAIR_ATTENTION, causal_only)
    inputs = {k: v for k, v in batch.items() if k != "completion_mask"}
    with paired_forward(model, padding_free=True), pytest.raises(RuntimeError, match="did not go through the regis"):
        model(**inputs, use_cache=False)


@pytest.mark.parametrize("attn, padding_free", [("sdpa", True), ("eager", True), ("sdpa", False)])
def test_sliding_window_shorter_than_a_pair_matches_plain(tiny, attn, padding_free):
    """Qwen2 with a sliding window on some layers only (`max_window_layers`), shorter than every pair: pair-block
    attention applies each layer's window; the dense block mask (one tensor for all layers) cannot, so those batches
    must take a path whose masks transformers builds per layer. Log-probs and gradients equal the plain forward."""
    from transformers import AutoConfig

    path, processor = tiny
    config = AutoConfig.from_pretrained(path)
    text = {k: v for k, v in config.text_config.to_dict().items() if k != "layer_types"}
    text.update(use_sliding_window=True, sliding_window=8, max_window_layers=1)
    config.text_config = type(config.text_config)(**text)
    assert config.text_config.layer_types == ["full_attention", "sliding_attention"]
    torch.manual_seed(0)
    model = PivotForConditionalGeneration.from_pretrained(
        path, config=config, dtype=torch.float32, attn_implementation=attn
    )
    add_fused_lm_head(model, outputs=("log_probs", "entropy", "mean_logits", "is_top1"))
    batch = DataCollatorForVisionPreference(processor=processor)(copy.deepcopy(_mixed_rows()))
    plain = _logps_and_grads(model, batch, position_ids=_plain_positions(batch))
    with paired_forward(model, padding_free=padding_free), compact_lm_head_scoring(True):
        _assert_close(plain, _logps_and_grads(model, batch))


def _relative_errors(reference, candidate):
    """(max relative error of the log-probs, max per-tensor relative gradient error floored by 1e-3 of the largest
    gradient), both against `reference` and computed in float64."""
    (lp0, g0), (lp1, g1) = reference, candidate
    lp_err = ((lp0.double() - lp1.double()).abs() / lp0.double().abs()).max().item()
    scale = max(g.double().norm().item() for g in g0.values())
    grad_err = max(
        (g0[n].double() - g1[n].double()).norm().item() / max(g0[n].double().norm().item(), 1e-3 * scale) for n in g0
    )
    return lp_err, grad_err


def test_pair_blocks_in_bf16_are_as_exact_as_the_plain_path(tiny):
    """bf16 on CPU: the padding-free pair-block forward (shared image, shared prefix, one packed row) against the
    plain padded forward, both in bf16, each compared with the fp32 plain forward of the same weights.

    Tolerances, relative to the plain path's own bf16 error on the same machine (so they follow the CPU's bf16
    kernels): the fast path's log-prob error <= 1.5x the plain path's + 1e-5, its gradient error <= 1.5x + 5e-3,
    and the two bf16 paths' log-probs differ by <= half the plain path's error against fp32. Measured on a 2-vCPU
    Intel VM: log-prob errors 9.1e-5 both, the two paths 1.4e-5 apart, gradient errors 0.0155 (plain) / 0.0168
    (fast). Most of the bf16 error is the rounding of weights and activations both layouts share; only reduction
    orders and lengths differ between them, hence the last bound. Bugs seen to break them: a mask leaking one
    future token (log-prob error 2.1e-4, paths 1.65e-4 apart, gradient error 0.06), rejected-tail positions not
    restarting (gradient error 0.30)."""
    path, processor = tiny
    batch = DataCollatorForVisionPreference(processor=processor)(copy.deepcopy(_mixed_rows()))
    fp32 = _model(path)
    truth = _logps_and_grads(fp32, batch, position_ids=_plain_positions(batch))
    assert _vision_grads_present(truth[1])
    del fp32

    model = _model(path).to(torch.bfloat16)
    bf16 = {k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in batch.items()}
    plain = _logps_and_grads(model, bf16, position_ids=_plain_positions(batch))
    with paired_forward(model, padding_free=True), compact_lm_head_scoring(True):
        fast = _logps_and_grads(model, bf16)
    assert fast[0].dtype == torch.bfloat16 or fast[0].dtype == torch.float32
    assert fast[1].keys() == plain[1].keys() == truth[1].keys()
    plain_lp, plain_grad = _relative_errors(truth, plain)
    fast_lp, fast_grad = _relative_errors(truth, fast)
    assert plain_lp > 0 and plain_grad > 0  # bf16 really rounded (the bounds below scale with it)
    assert fast_lp <= 1.5 * plain_lp + 1e-5, (fast_lp, plain_lp)
    assert fast_grad <= 1.5 * plain_grad + 5e-3, (fast_grad, plain_grad)
    between = ((plain[0].double() - fast[0].double()).abs() / plain[0].double().abs()).max().item()
    assert between <= 0.5 * plain_lp, (between, plain_lp)


def test_cached_reference_model_is_released(tiny, tmp_path):
    """With `precompute_ref_log_probs` the reference model passed in is garbage once its log-probs are cached: no
    reference to it is left in the trainer or in accelerate's list of prepared models (at the paper's shape it held
    3.4 GiB through training)."""
    import gc
    import weakref

    path, processor = tiny
    cls, config_class = _trainer_and_config()
    model = PivotForConditionalGeneration.from_pretrained(path, dtype=torch.float32)
    ref = PivotForConditionalGeneration.from_pretrained(path, dtype=torch.float32)
    alive = weakref.ref(ref)
    config = _config(tmp_path, config_class, precompute_ref_log_probs=True)
    trainer = cls(
        model=model, ref_model=ref, args=config, train_dataset=Dataset.from_list(_rows(2)), processing_class=processor
    )
    del ref
    gc.collect()
    assert trainer.ref_model is None
    assert alive() is None, [type(r).__name__ for r in gc.get_referrers(alive())]
    assert "ref_chosen_logps" in trainer.train_dataset.column_names
