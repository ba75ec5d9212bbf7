"""Metrics of the vision-only evaluations, each checked against an independent computation written in the test."""

import math

import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits
from sklearn.linear_model import LogisticRegression
from sklearn.neighbors import NearestNeighbors

from pivot_hf.evaluation.alignment import alignment_matrix, mutual_knn, preprocess_features, summarize_alignment
from pivot_hf.evaluation.linear_probe import (
    COARSE_LOG10_C,
    linear_probe,
    prototype_classifier,
    stratified_split,
    sweep_regularization,
)
from pivot_hf.evaluation.segmentation import RecallAccumulator, patch_multihot


# ---------------------------------------------------------------------------------------------------- mutual kNN
def _unit(angles_deg):
    a = np.deg2rad(np.asarray(angles_deg, dtype=np.float64))
    return torch.tensor(np.stack([np.cos(a), np.sin(a)], axis=1), dtype=torch.float32)


def test_mutual_knn_known_answer():
    # Points on the unit circle: cosine neighbours are angular neighbours, so the sets can be read off by hand.
    a = _unit([0, 10, 30, 70, 150])  # 1-NN: 0->1, 1->0, 2->1, 3->2, 4->3
    b = _unit([0, 52, 60, 40, 170])  # 1-NN: 0->3, 1->2, 2->1, 3->1, 4->2
    # agreements: sample 2 (1 == 1) only -> 1/5
    assert mutual_knn(a, b, k=1) == pytest.approx(1 / 5)
    # identical geometry up to a rotation: perfect alignment
    rot = torch.tensor([[0.0, -1.0], [1.0, 0.0]])
    assert mutual_knn(a, a @ rot, k=2) == 1.0


def test_mutual_knn_matches_sklearn_neighbours():
    rng = np.random.default_rng(0)
    n, k = 60, 10
    va = rng.normal(size=(n, 16))
    vb = va[:, :8] @ rng.normal(size=(8, 24)) + 0.5 * rng.normal(size=(n, 24))  # partially shared structure
    a, b = preprocess_features(va), preprocess_features(vb)

    def knn_sets(x):
        nn_ = NearestNeighbors(n_neighbors=k + 1, metric="cosine").fit(x)
        _, idx = nn_.kneighbors(x)
        return [set(row[row != i][:k]) for i, row in enumerate(idx)]

    sa, sb = knn_sets(a.numpy()), knn_sets(b.numpy())
    expected = np.mean([len(x & y) / k for x, y in zip(sa, sb)])
    assert mutual_knn(a, b, k) == pytest.approx(expected, abs=1e-6)
    assert 0.0 < expected < 1.0


def test_preprocess_clamps_at_95th_percentile_then_normalises():
    rng = np.random.default_rng(1)
    x = rng.standard_t(df=2, size=(50, 12))  # heavy tails: the clamp matters
    q = np.mean([np.quantile(np.abs(row), 0.95) for row in x])  # reference default: mean of per-sample quantiles
    ref = np.clip(x, -q, q)
    ref = ref / np.linalg.norm(ref, axis=1, keepdims=True)
    np.testing.assert_allclose(preprocess_features(x).numpy(), ref, atol=1e-5)
    qe = np.sort(np.abs(x).ravel())[int(0.95 * x.size)]  # --precise: sorted |x| at floor(q * numel)
    ref = np.clip(x, -qe, qe)
    ref = ref / np.linalg.norm(ref, axis=1, keepdims=True)
    np.testing.assert_allclose(preprocess_features(x, clamp_method="exact").numpy(), ref, atol=1e-5)


def test_alignment_is_max_over_layer_pairs():
    rng = np.random.default_rng(2)
    n = 40
    shared = rng.normal(size=(n, 8))
    vision = np.stack([rng.normal(size=(n, 8)), shared @ rng.normal(size=(8, 8)), rng.normal(size=(n, 8))])
    text = np.stack([rng.normal(size=(n, 6)), rng.normal(size=(n, 6)), shared @ rng.normal(size=(8, 6))])
    m = alignment_matrix(vision, text, k=5)

    def prep(stack):  # one threshold per stack: mean over samples of the quantile over (layers x dim)
        q = np.mean([np.quantile(np.abs(stack[:, i]), 0.95) for i in range(stack.shape[1])])
        c = np.clip(stack, -q, q)
        return [torch.tensor(layer / np.linalg.norm(layer, axis=1, keepdims=True), dtype=torch.float32) for layer in c]

    ref = np.array([[mutual_knn(v, t, 5) for t in prep(text)] for v in prep(vision)])
    np.testing.assert_allclose(m, ref)
    s = summarize_alignment(m)
    assert (s["best_vision_layer"], s["best_text_layer"]) == (1, 2)  # the pair that shares structure
    assert s["alignment"] == pytest.approx(ref.max())


# ------------------------------------------------------------------------------------------------- segmentation
def test_patch_multihot_union_and_class0_rule():
    mask = np.zeros((8, 12), dtype=np.int64)  # patch 4 -> 2 x 3 grid
    mask[0:4, 0:4] = 0  # patch (0,0): only unlabeled -> class 0 stays
    mask[0:4, 4:8] = 3
    mask[1, 5] = 0  # patch (0,1): 3 + a bit of unlabeled -> 0 cleared
    mask[0:4, 8:12] = 2
    mask[3, 11] = 5  # patch (0,2): 2 and 5
    mask[4:8, :] = 1
    mask[7, 0] = 7  # id >= num_classes: ignored
    got = patch_multihot(mask, patch=4, num_classes=6)
    # independent reference: explicit loops over patches and pixels
    ref = np.zeros((6, 6), dtype=bool)
    for gi in range(2):
        for gj in range(3):
            row = gi * 3 + gj
            for v in np.unique(mask[gi * 4 : gi * 4 + 4, gj * 4 : gj * 4 + 4]):
                if v < 6:
                    ref[row, v] = True
            if ref[row, 1:].any():
                ref[row, 0] = False
    np.testing.assert_array_equal(got, ref)
    assert got[0].tolist() == [True, False, False, False, False, False]
    assert got[1].tolist() == [False, False, False, True, False, False]
    assert got[2].tolist() == [False, False, True, False, False, True]


def test_patch_multihot_crops_the_remainder():
    mask = np.ones((30, 30), dtype=np.int64)
    mask[28:, :] = 2  # lies in the cropped remainder of a 7-pixel grid (4 x 7 = 28)
    got = patch_multihot(mask, patch=7, num_classes=3)
    assert got.shape == (16, 3)
    assert not got[:, 2].any()


def test_macro_recall_on_hand_made_predictions():
    # 6 patches x 4 classes. Class 3 has no positive patch: excluded from the macro mean.
    target = np.array([[1, 0, 1, 0], [1, 1, 0, 0], [0, 1, 0, 0], [0, 1, 1, 0], [1, 0, 0, 0], [0, 0, 1, 0]], dtype=bool)
    pred = np.array([[1, 0, 0, 1], [0, 1, 0, 0], [0, 1, 0, 1], [0, 0, 1, 0], [1, 1, 0, 0], [0, 0, 1, 0]], dtype=bool)
    # by hand: class 0: positives rows 0,1,4 -> TP rows 0,4 = 2/3; class 1: rows 1,2,3 -> TP 1,2 = 2/3;
    # class 2: rows 0,3,5 -> TP 3,5 = 2/3; class 3: none.
    acc = RecallAccumulator(4)
    acc.update(pred[:3], target[:3])  # accumulated over batches, as over validation patches
    acc.update(pred[3:], target[3:])
    r = acc.per_class_recall()
    np.testing.assert_allclose(r[:3], [2 / 3, 2 / 3, 2 / 3])
    assert math.isnan(r[3])
    assert acc.macro_recall() == pytest.approx(2 / 3)
    pred2 = pred.copy()
    pred2[:, 0] = target[:, 0]  # class 0 now perfect -> (1 + 2/3 + 2/3) / 3
    acc2 = RecallAccumulator(4)
    acc2.update(pred2, target)
    assert acc2.macro_recall() == pytest.approx((1 + 4 / 3) / 3)


# --------------------------------------------------------------------------------------------------- prototypes
def test_prototype_classifier_on_separable_features():
    rng = np.random.default_rng(0)
    centers = np.eye(5, 16) * 10
    y_tr, y_te = np.repeat(np.arange(5), 20), np.repeat(np.arange(5), 6)
    x_tr = centers[y_tr] + rng.normal(size=(100, 16))
    x_te = centers[y_te] + rng.normal(size=(30, 16))
    for normalize in (True, False):
        r = prototype_classifier(x_tr, y_tr, x_te, y_te, normalize=normalize)
        assert r["top1"] == 1.0


def test_prototype_classifier_matches_independent_class_means_on_digits():
    x, y = load_digits(return_X_y=True)
    x_tr, y_tr, x_te, y_te = x[:1200], y[:1200], x[1200:], y[1200:]
    for normalize in (True, False):
        xt = x_tr / np.linalg.norm(x_tr, axis=1, keepdims=True) if normalize else x_tr
        xe = x_te / np.linalg.norm(x_te, axis=1, keepdims=True) if normalize else x_te
        means = np.stack([xt[y_tr == c].mean(0) for c in range(10)])
        if normalize:
            means = means / np.linalg.norm(means, axis=1, keepdims=True)
        pred = np.array([int(np.argmax([row @ m for m in means])) for row in xe])
        expected = float(np.mean(pred == y_te))
        assert prototype_classifier(x_tr, y_tr, x_te, y_te, normalize)["top1"] == pytest.approx(expected)
        assert expected > 0.8


# ------------------------------------------------------------------------------------------------- linear probe
def test_sweep_finds_the_direct_grid_optimum_of_a_unimodal_score():
    fine = np.round(np.arange(-6, 6 + 1e-9, 1 / 8), 6)
    for peak in (-4.6, 0.3, 1.375, 3.9, 5.2):
        score = lambda c, p=peak: -abs(math.log10(c) - p)  # noqa: E731
        direct = fine[int(np.argmax([score(10.0**lc) for lc in fine]))]
        res = sweep_regularization(score)
        assert res.best_log10_c == pytest.approx(direct), peak
        assert len(res.evaluated) <= 7 + 2 * 4  # coarse grid + two neighbours per halving (2 -> 1/8 decade)
        assert set(COARSE_LOG10_C) <= set(res.evaluated)


def test_sweep_halves_the_step_down_to_one_eighth_decade():
    seen = []
    sweep_regularization(lambda c: (seen.append(math.log10(c)), -abs(math.log10(c) - 0.3))[1])
    refine = [round(s, 6) for s in seen[7:]]
    steps = sorted({round(abs(a - b), 6) for a, b in zip(refine[::2], refine[1::2])})
    assert steps == [0.25, 0.5, 1.0, 2.0]  # the neighbour pairs +-1, +-0.5, +-0.25, +-0.125 around the best


def test_linear_probe_picks_the_c_a_direct_grid_finds_on_digits():
    x, y = load_digits(return_X_y=True)
    x = x / 16.0
    rng = np.random.default_rng(0)
    p = rng.permutation(len(y))
    x, y = x[p], y[p]
    x_tr, y_tr, x_te, y_te = x[:600], y[:600], x[1400:], y[1400:]
    r = linear_probe(x_tr, y_tr, x_te, y_te, val_fraction=0.2, seed=0)

    tr, va = stratified_split(y_tr, 0.2, 0)

    def val_acc(c):
        clf = LogisticRegression(C=c, max_iter=1000).fit(x_tr[tr], y_tr[tr])
        return float(np.mean(clf.predict(x_tr[va]) == y_tr[va]))

    # Direct grid around the chosen C at the sweep's final resolution (1/8 decade, +-1 decade): the sweep's C is
    # its argmax (ties -> larger C, as in the sweep and the reference).
    best_lc = math.log10(r["best_C"])
    grid = [round(best_lc + d / 8, 6) for d in range(-8, 9) if abs(best_lc + d / 8) <= 6 + 1e-9]  # C in 1e-6..1e6
    accs = [val_acc(10.0**lc) for lc in grid]
    best = max(accs)
    direct = max(lc for lc, a in zip(grid, accs) if a == best)
    assert best_lc == pytest.approx(direct)
    assert r["val_top1"] == pytest.approx(best)
    # refit on train + val, top-1 on test
    clf = LogisticRegression(C=r["best_C"], max_iter=1000).fit(x_tr, y_tr)
    assert r["top1"] == pytest.approx(float(np.mean(clf.predict(x_te) == y_te)))
    assert r["top1"] > 0.85


def test_stratified_split_holds_out_each_class():
    y = np.repeat(np.arange(4), [10, 20, 5, 2])
    tr, va = stratified_split(y, 0.2, 0)
    assert len(np.intersect1d(tr, va)) == 0 and len(tr) + len(va) == len(y)
    assert [int(np.sum(y[va] == c)) for c in range(4)] == [2, 4, 1, 1]
