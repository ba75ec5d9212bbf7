"""Each evaluation default equals the reference code's protocol, on constructed cases where the previous default
differed. Every expected value is computed independently in the test, from the reference's documented algorithm:
platonic-rep (alignment), CLIP_benchmark's C sweep (linear probe), the paper's prototype, patch-seg's schedule."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from sklearn.datasets import load_digits
from sklearn.linear_model import LogisticRegression

from pivot_hf.evaluation import runner
from pivot_hf.evaluation.alignment import (
    alignment_matrix,
    alignment_over_seeds,
    clamp_threshold,
    knn_indices,
    language_features,
)
from pivot_hf.evaluation.features import VisionBackbone, extract_features, resolve_pooling
from pivot_hf.evaluation.linear_probe import linear_probe, prototype_classifier, stratified_split, sweep_regularization
from pivot_hf.evaluation.segmentation import SegProbeConfig, seg_lr, train_segmentation_probe
from pivot_hf.testing import build_tiny_llm, build_tiny_vision


# ------------------------------------------------------------------------------------------------------ alignment
def _stack(seed=0, n=40, d=16):
    """(layers, samples, dim) vision stack whose two layers differ 20x in scale; layer 0 has one outlier channel per
    sample. A per-layer clamp cuts layer 0's outliers, the whole-stack threshold (set by layer 1) leaves them."""
    rng = np.random.default_rng(seed)
    l0 = rng.normal(size=(n, d))
    l0[np.arange(n), rng.integers(0, d, n)] += 8.0
    l1 = 20 * rng.normal(size=(n, d))
    text = (l0 + 0.5 * rng.normal(size=(n, d)))[None]
    return np.stack([l0, l1]).astype(np.float32), text.astype(np.float32)


def _reference_prepare(stack_nld: torch.Tensor, q: float, exact: bool) -> torch.Tensor:
    """platonic-rep's outlier removal on a (samples, layers, dim) file, rewritten from its description."""
    a = stack_nld.abs()
    if exact:
        thr = a.reshape(-1).sort().values[int(q * a.numel())]
    else:
        thr = torch.quantile(a.flatten(start_dim=1), q, dim=1).mean()
    return stack_nld.clamp(-thr, thr)


def _reference_mutual_knn(x: torch.Tensor, y: torch.Tensor, k: int) -> float:
    def nn_sets(f):
        f = F.normalize(f, dim=-1)
        sim = (f @ f.T).fill_diagonal_(-1e8)
        return sim.argsort(dim=1, descending=True)[:, :k]

    a, b = nn_sets(x), nn_sets(y)
    return float(np.mean([len(set(r.tolist()) & set(s.tolist())) / k for r, s in zip(a, b)]))


def _reference_alignment(vision_lnd, text_lnd, k=5, q=0.95, exact=False):
    v = _reference_prepare(torch.tensor(vision_lnd).permute(1, 0, 2), q, exact)
    t = _reference_prepare(torch.tensor(text_lnd).permute(1, 0, 2), q, exact)
    return np.array(
        [[_reference_mutual_knn(v[:, i], t[:, j], k) for j in range(t.shape[1])] for i in range(v.shape[1])]
    )


@pytest.mark.parametrize("method", ["mean_per_sample", "exact"])
def test_whole_stack_clamp_equals_the_reference_and_not_the_per_layer_clamp(method):
    vision, text = _stack()
    k = 5
    ours = alignment_matrix(vision, text, k, clamp_method=method)
    ref = _reference_alignment(vision, text, k, exact=method == "exact")
    np.testing.assert_allclose(ours, ref, atol=1e-7)

    # the old default: each layer clamped at its own 95th percentile of |x| (numpy's linear quantile)
    def per_layer(x):
        q = np.quantile(np.abs(x), 0.95)
        return F.normalize(torch.tensor(np.clip(x, -q, q)), dim=-1)

    old_sets = knn_indices(per_layer(vision[0]), k).sort(dim=1).values
    thr = clamp_threshold(vision, 0.95, method)
    new_sets = knn_indices(F.normalize(torch.tensor(vision[0]).clamp(-thr, thr), dim=-1), k).sort(dim=1).values
    assert not torch.equal(old_sets, new_sets)  # the per-layer clamp changes layer 0's neighbour sets
    old = _reference_mutual_knn(per_layer(vision[0]), per_layer(text[0]), k)
    assert old != pytest.approx(ours[0, 0], abs=1e-3)


def test_clamp_threshold_variants_on_a_hand_made_stack():
    # 2 layers x 2 samples x 2 channels; |x| per sample: sample 0 -> {1, 2, 3, 4}, sample 1 -> {10, 20, 30, 40}
    stack = np.array([[[1, -2], [10, -20]], [[3, 4], [-30, 40]]], dtype=np.float32)
    # per-sample linear 0.5-quantile: 2.5 and 25 -> mean 13.75
    assert clamp_threshold(stack, 0.5, "mean_per_sample") == pytest.approx(13.75)
    # exact: sorted |x| = 1 2 3 4 10 20 30 40; index int(0.5 * 8) = 4 -> 10
    assert clamp_threshold(stack, 0.5, "exact") == 10.0
    with pytest.raises(ValueError, match="clamp_method"):
        clamp_threshold(stack, 0.5, "per_layer")


def test_alignment_seeds_vary_the_drawn_pairs_or_are_refused():
    vision, text = _stack(n=60)
    with pytest.raises(ValueError, match="alignment_max_samples"):
        alignment_over_seeds(vision, text, k=5, seeds=(0, 1))  # all pairs: both seeds would give one number
    res = alignment_over_seeds(vision, text, k=5, seeds=(0, 1, 2), max_samples=30)
    assert [r["num_pairs"] for r in res["per_seed"]] == [30, 30, 30]
    assert len({r["alignment"] for r in res["per_seed"]}) > 1  # the seeds draw different subsets
    # each seed's number is the reference computed on its own subset
    idx = np.sort(np.random.default_rng(1).choice(60, 30, replace=False))
    ref = _reference_alignment(vision[:, idx], text[:, idx], 5).max()
    assert res["per_seed"][1]["alignment"] == pytest.approx(ref)
    # defaults: one seed without a subset size, three with one; several seeds without one are refused up front
    common = {"task": "alignment", "model_name_or_path": ["m"], "output_dir": "o"}
    assert runner.EvalVisionArguments(**common).seeds == [0]
    assert runner.EvalVisionArguments(**common, alignment_max_samples=512).seeds == [0, 1, 2]
    with pytest.raises(ValueError, match="same number"):
        runner.EvalVisionArguments(**common, seeds=[0, 1, 2])
    with pytest.raises(ValueError, match="no randomness"):
        runner.EvalVisionArguments(task="prototype", model_name_or_path=["m"], output_dir="o", seeds=[0, 1])


@pytest.mark.parametrize("family", ["dinov2_registers", "clip", "siglip"])
def test_alignment_pools_the_cls_token_where_the_family_has_one(family, tmp_path):
    path = build_tiny_vision(tmp_path / family, family, seed=0)
    bb = VisionBackbone.from_pretrained(path, device="cpu")
    pooling = resolve_pooling(bb.num_prefix_tokens(), "auto")
    assert pooling == ("mean" if family == "siglip" else "cls")
    rng = np.random.default_rng(0)
    images = [Image.fromarray((rng.random((40, 48, 3)) * 255).astype(np.uint8)) for _ in range(3)]
    feats = np.asarray(extract_features(bb, images, 3, f"pool-{family}", pooling, all_layers=True))
    pixel_values = bb.preprocess(images)["pixel_values"]
    with torch.no_grad():
        hidden = bb.model(pixel_values=pixel_values, output_hidden_states=True).hidden_states
    prefix = {"dinov2_registers": 5, "clip": 1, "siglip": 0}[family]  # CLS (+ 4 registers); SigLIP has none
    expected = [h[:, 0] if pooling == "cls" else h[:, prefix:].mean(1) for h in hidden]
    np.testing.assert_allclose(feats, torch.stack(expected).numpy(), rtol=1e-5, atol=1e-6)
    if family == "siglip":
        with pytest.raises(ValueError, match="no CLS token"):
            resolve_pooling(bb.num_prefix_tokens(), "cls")


def test_captions_are_not_truncated_by_default(tmp_path):
    from transformers import AutoModel, AutoTokenizer

    path = build_tiny_llm(tmp_path / "llm", "qwen2", seed=0)
    model, tok = AutoModel.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path)
    long = " ".join(["a long caption about a red bicycle leaning on a wall"] * 40)
    captions = ["a cat", long]
    feats = language_features(model, tok, captions, batch_size=2)
    ids = tok(long, return_tensors="pt")
    assert ids["input_ids"].shape[1] > 256  # the old default would have cut it
    with torch.no_grad():
        hs = model(**ids, output_hidden_states=True).hidden_states
    expected = torch.stack([h[0].mean(0) for h in hs]).numpy()
    np.testing.assert_allclose(feats[:, 1], expected, rtol=1e-4, atol=1e-5)
    cut = language_features(model, tok, captions, batch_size=2, max_length=256)
    assert not np.allclose(cut[:, 1], feats[:, 1], atol=1e-4)


# --------------------------------------------------------------------------------------------------- linear probe
def _reference_sweep(score_of_log10_c, steps_per_decade=8):
    """CLIP_benchmark's search in lambda = 1/C: visit candidates from the smallest lambda up, only a strictly better
    score replaces the best; refine around the peak at half the step (left, peak, right) to 1/8 decade."""
    lam = [6.0, 4.0, 2.0, 0.0, -2.0, -4.0, -6.0]  # log10 C of lambda = 1e-6 .. 1e6, smallest lambda first
    best, best_s = None, -math.inf
    for lc in lam:
        s = score_of_log10_c(lc)
        if s > best_s:
            best, best_s = lc, s
    step = 2.0
    while step > 1.0 / steps_per_decade + 1e-9:
        step /= 2
        peak, cands = best, []
        for lc in (peak + step, peak, peak - step):  # smaller lambda (larger C) first
            cands.append(min(6.0, max(-6.0, round(lc, 6))))
        best, best_s = None, -math.inf
        for lc in cands:
            s = score_of_log10_c(lc)
            if s > best_s:
                best, best_s = lc, s
    return best


def test_tied_c_values_go_to_the_larger_c():
    plateau = lambda c: 1.0 if math.log10(c) >= -2 else 0.5  # noqa: E731  (every C >= 1e-2 ties)
    assert sweep_regularization(plateau).best_log10_c == 6.0
    assert sweep_regularization(plateau, tie_break="smaller").best_log10_c == -2.0  # the old rule
    assert _reference_sweep(lambda lc: plateau(10.0**lc)) == 6.0


def test_linear_probe_tie_rule_matches_the_reference_sweep_on_a_small_validation_split():
    x, y = load_digits(return_X_y=True)
    x = x / 16.0
    p = np.random.default_rng(3).permutation(len(y))
    x, y = x[p], y[p]
    x_tr, y_tr, x_te, y_te = x[:80], y[:80], x[1000:1300], y[1000:1300]
    tr, va = stratified_split(y_tr, 0.2, 0)
    cache = {}

    def val_acc(lc):
        lc = round(lc, 6)
        if lc not in cache:
            clf = LogisticRegression(C=10.0**lc, max_iter=1000).fit(x_tr[tr], y_tr[tr])
            cache[lc] = float(np.mean(clf.predict(x_tr[va]) == y_tr[va]))
        return cache[lc]

    ref_lc = _reference_sweep(val_acc)
    ours = linear_probe(x_tr, y_tr, x_te, y_te, val_fraction=0.2, seed=0)
    old = linear_probe(x_tr, y_tr, x_te, y_te, val_fraction=0.2, seed=0, tie_break="smaller")
    assert math.log10(ours["best_C"]) == pytest.approx(ref_lc)
    assert old["best_C"] < ours["best_C"]  # 20 validation images: the old rule picked another C on a tie
    assert old["val_top1"] == ours["val_top1"]
    clf = LogisticRegression(C=10.0**ref_lc, max_iter=1000).fit(x_tr, y_tr)  # refit on train + val
    assert ours["top1"] == pytest.approx(float(np.mean(clf.predict(x_te) == y_te)))


# ------------------------------------------------------------------------------------------------------ prototype
def test_prototype_default_is_raw_class_means_as_linear_weights():
    # A shared offset (9..11 on the first axis) dominates the raw dot products: class A's mean has the larger norm,
    # so raw class means as weights send class B's test points to A; the cosine classifier does not.
    x_tr = np.array([[11, 0.1], [11, -0.1], [9, 1.1], [9, 0.9]])
    y_tr = np.array([0, 0, 1, 1])
    x_te = np.array([[11.0, 0.0], [9.0, 1.0], [9.2, 1.0]])
    y_te = np.array([0, 1, 1])
    w = np.stack([x_tr[y_tr == c].mean(0) for c in (0, 1)])  # independent: the paper's prototype
    expected = float(np.mean((x_te @ w.T).argmax(1) == y_te))
    assert expected == pytest.approx(1 / 3)
    assert prototype_classifier(x_tr, y_tr, x_te, y_te)["top1"] == pytest.approx(expected)  # the default
    assert prototype_classifier(x_tr, y_tr, x_te, y_te, normalize=True)["top1"] == 1.0  # the old default (cosine)
    args = runner.EvalVisionArguments(task="prototype", model_name_or_path=["m"], output_dir="o")
    assert args.prototype_normalize is False


# --------------------------------------------------------------------------------------------------- segmentation
def _timm_cosine(t, base, lr_min, warmup, total):
    """timm CosineLRScheduler(t_initial=total, lr_min, warmup_t=warmup, warmup_lr_init=0, t_in_epochs=False) at
    update t, written from its documented formula."""
    if t < warmup:
        return 0.0 + t * (base - 0.0) / warmup
    i = t // total
    if i >= 1:
        return lr_min
    return lr_min + 0.5 * (base - lr_min) * (1 + math.cos(math.pi * (t - total * i) / total))


def test_seg_schedule_equals_the_reference_formula():
    cfg = SegProbeConfig()
    assert (cfg.warmup_steps, cfg.min_lr, cfg.drop_last, cfg.autocast) == (500, 1e-4, True, "auto")
    total = cfg.steps_per_epoch(20210) * cfg.epochs  # ADE20K train, drop_last: 631 x 5
    assert total == 3155
    for t in (0, 1, 250, 499, 500, 501, 1600, 3154, 3155):
        assert seg_lr(t, cfg.lr, cfg.min_lr, cfg.warmup(total), total) == pytest.approx(
            _timm_cosine(t, 1e-3, 1e-4, 500, total), rel=1e-12, abs=1e-15
        )
    assert seg_lr(250, 1e-3, 1e-4, 500, total) == pytest.approx(5e-4)
    assert seg_lr(3154, 1e-3, 1e-4, 500, total) == pytest.approx(1e-4, rel=1e-5)
    # the old schedule (10 % warmup, cosine to 0, HF) differs at the same steps
    from transformers import get_cosine_schedule_with_warmup

    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1e-3)
    old = get_cosine_schedule_with_warmup(opt, round(0.1 * 3156), 3156)  # ceil(20210 / 32) * 5 without drop_last
    old_lrs = []
    for _ in range(3155):
        old_lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        old.step()
    assert abs(old_lrs[250] - 5e-4) > 1e-4 and old_lrs[3154] < 1e-5
    assert cfg.autocast_dtype("cuda") == torch.bfloat16 and cfg.autocast_dtype("cpu") is None


def test_seg_training_runs_the_reference_schedule_and_drops_the_last_batch():
    rng = np.random.default_rng(0)
    feats = rng.normal(size=(10, 4, 8)).astype(np.float32)
    labels = np.packbits(rng.random((10, 4, 3)) > 0.5, axis=-1)
    cfg = SegProbeConfig(num_classes=3, hidden=16, batch_size=4, epochs=3, warmup_steps=2, min_lr=1e-4)
    out = train_segmentation_probe(feats, labels, feats, labels, cfg, seed=0, record_lr=True)
    assert out["num_steps"] == 6  # 10 // 4 = 2 full batches per epoch; the 2 leftover images are dropped
    expected = [_timm_cosine(t, 1e-3, 1e-4, 2, 6) for t in range(6)]
    np.testing.assert_allclose(out["lr_per_step"], expected, rtol=1e-12, atol=0)
    assert out["autocast"] == "none"  # CPU
    # the CUDA default's bf16 autocast path, exercised on CPU: same schedule, the head runs in bf16
    bf16 = SegProbeConfig(**{**cfg.__dict__, "autocast": "bfloat16"})
    out16 = train_segmentation_probe(feats, labels, feats, labels, bf16, seed=0, record_lr=True)
    assert out16["autocast"] == "bfloat16" and out16["lr_per_step"] == out["lr_per_step"]
    assert out16["history"][0]["train_loss"] != out["history"][0]["train_loss"]
    with pytest.raises(ValueError, match="no full batch"):
        train_segmentation_probe(feats[:3], labels[:3], feats, labels, cfg)


def test_protocol_records_the_segmentation_feature_layer_and_public_sources():
    from pivot_hf.evaluation.protocol import classification_protocol, segmentation_protocol

    args = runner.EvalVisionArguments(task="segmentation", model_name_or_path=["a", "b"], output_dir="o")
    proto = segmentation_protocol(args, SegProbeConfig(), "cpu", [-2, -1])
    # patch-seg reads the last block after the final LayerNorm; we read the checkpoint's feature layer: said, flagged
    feat = proto["knobs"]["features"]
    assert feat["value"] == "hidden_states[-1, -2] (the checkpoint's feature layer), no final norm"
    assert (
        feat["reference"] == "last block output after the final LayerNorm"
        and "features" in proto["differs_from_reference"]
    )
    args.source = "projector"
    assert segmentation_protocol(args, SegProbeConfig(), "cpu", [-2])["knobs"]["features"]["value"].startswith(
        "projector output"
    )
    # every source names a public reference, not a path of the developers' workspace
    for task in ("linear_probe", "prototype"):
        p = classification_protocol(runner.EvalVisionArguments(task=task, model_name_or_path=["m"], output_dir="o"))
        assert all("../" not in k["source"] for k in p["knobs"].values()) and "../" not in p["reference"]
