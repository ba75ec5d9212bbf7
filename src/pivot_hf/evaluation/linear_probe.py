"""Linear probe (CLIP recipe) and prototype (class-mean) classifier on frozen, pooled features.

CLIP's recipe: scikit-learn `LogisticRegression` (L2, lbfgs, max_iter=1000). The regularisation lambda (C = 1/lambda)
is chosen on a validation split held out of train: a coarse grid lambda in {1e-6, 1e-4, ..., 1e6}, then a binary
refinement that evaluates the two neighbours of the current best at half the previous step, until the step is 1/8 of a
decade. The classifier is then refit on train + validation with the chosen C and scored (top-1) on the test split.

Ties between C values go to the larger C (weaker regularisation), as in the reference sweep (CLIP_benchmark's
`find_peak`: candidates are visited from the smallest lambda = 1/C up and only a strictly better score replaces the
best). On small validation splits ties are common, so the rule moves top-1 by points; `tie_break="smaller"` keeps the
other rule for comparison.

The prototype probe's weights are the raw per-class mean features (the paper's wording: "the weights of a linear layer
are the per-class mean features"); `normalize=True` gives the cosine variant (L2-normalised features and means).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np


logger = logging.getLogger(__name__)

COARSE_LOG10_C = (-6.0, -4.0, -2.0, 0.0, 2.0, 4.0, 6.0)  # C = 1/lambda: the same decades as CLIP's lambda grid


@dataclass
class SweepResult:
    best_log10_c: float
    best_score: float
    evaluated: dict[float, float] = field(default_factory=dict)  # log10 C -> validation score, in evaluation order

    @property
    def best_c(self) -> float:
        return 10.0**self.best_log10_c


TIE_BREAKS = ("larger", "smaller")


def _better(score: float, log10_c: float, best_score: float, best_log10_c: float, tie_break: str = "larger") -> bool:
    if score != best_score:
        return score > best_score
    return log10_c > best_log10_c if tie_break == "larger" else log10_c < best_log10_c


def sweep_regularization(
    score_fn: Callable[[float], float],
    coarse: tuple[float, ...] = COARSE_LOG10_C,
    steps_per_decade: int = 8,
    tie_break: str = "larger",
) -> SweepResult:
    """Maximise `score_fn(C)` over C: the coarse grid, then binary refinement to `1/steps_per_decade` decades.

    Works in log10(C). Each refinement round halves the step and evaluates best - step and best + step (clipped to the
    coarse range), keeping whichever of the three is best; equal scores go to the larger C (`tie_break="larger"`, the
    reference's rule) or the smaller. Scores are memoised, so no C is fitted twice.
    """
    if tie_break not in TIE_BREAKS:
        raise ValueError(f"tie_break must be one of {TIE_BREAKS}, got {tie_break!r}")
    evaluated: dict[float, float] = {}

    def score(log10_c: float) -> float:
        log10_c = round(log10_c, 6)  # keys stable under float halving
        if log10_c not in evaluated:
            evaluated[log10_c] = float(score_fn(10.0**log10_c))
        return evaluated[log10_c]

    best, best_s = None, -math.inf
    for lc in coarse:
        s = score(lc)
        if best is None or _better(s, lc, best_s, best, tie_break):
            best, best_s = lc, s
    step = (coarse[1] - coarse[0]) if len(coarse) > 1 else 1.0
    lo, hi = min(coarse), max(coarse)
    while step > 1.0 / steps_per_decade + 1e-9:
        step /= 2.0
        center = best
        for lc in (center - step, center + step):
            if lo - 1e-9 <= lc <= hi + 1e-9:
                s = score(lc)
                if _better(s, round(lc, 6), best_s, best, tie_break):
                    best, best_s = round(lc, 6), s
    return SweepResult(best, best_s, evaluated)


def stratified_split(labels: np.ndarray, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices (train, val): `val_fraction` of each class (at least one when the class has >= 2 samples) to val."""
    rng = np.random.default_rng(seed)
    train_idx, val_idx = [], []
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        rng.shuffle(idx)
        n_val = int(round(len(idx) * val_fraction))
        n_val = min(max(n_val, 1 if len(idx) >= 2 else 0), len(idx) - 1) if len(idx) > 1 else 0
        val_idx.append(idx[:n_val])
        train_idx.append(idx[n_val:])
    return np.sort(np.concatenate(train_idx)), np.sort(np.concatenate(val_idx))


def check_classification_data(
    task: str,
    train_labels: np.ndarray,
    test_labels: np.ndarray,
    class_names: list[str] | None = None,
    val_fraction: float = 0.1,
    seeds: tuple[int, ...] = (0,),
) -> None:
    """Refuse, before any image is encoded, splits a probe cannot score: fewer than 2 train classes, test classes
    with no train image, and (linear probe) a validation split that comes out empty or leaves fewer than 2 classes
    to fit on for some seed. Raises ValueError naming the classes and counts."""
    train_labels, test_labels = np.asarray(train_labels), np.asarray(test_labels)

    def name(c) -> str:
        return class_names[int(c)] if class_names and int(c) < len(class_names) else str(int(c))

    present = np.unique(train_labels)
    if len(present) < 2:
        raise ValueError(
            f"{task}: the train split holds {len(present)} class ({[name(c) for c in present]}, {len(train_labels)} "
            "images); a classifier needs at least 2. Check --dataset_name / --train_split / --max_train_samples."
        )
    unseen = np.setdiff1d(np.unique(test_labels), present)
    if len(unseen):
        n = int(np.isin(test_labels, unseen).sum())
        raise ValueError(
            f"{task}: test classes {[name(c) for c in unseen]} ({n} images) have no train image, so they can never be "
            "predicted. Add train images for them, drop them from the test split, or raise --max_train_samples."
        )
    if task != "linear_probe":
        return
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"--val_fraction must lie in (0, 1), got {val_fraction}")
    for seed in seeds:
        tr, va = stratified_split(train_labels, val_fraction, seed)
        if len(va) == 0 or len(np.unique(train_labels[tr])) < 2:
            counts = {name(c): int((train_labels == c).sum()) for c in present}
            raise ValueError(
                f"linear_probe: seed {seed} leaves no usable validation split to choose C from (train images per "
                f"class: {counts}; a class gives a validation image only when it has at least 2). Add train images, "
                "or use --task prototype, which needs no validation split."
            )


def _logreg(c: float, max_iter: int, seed: int):
    from sklearn.linear_model import LogisticRegression

    return LogisticRegression(C=c, max_iter=max_iter, solver="lbfgs", random_state=seed)


def top1(pred: np.ndarray, labels: np.ndarray) -> float:
    return float(np.mean(np.asarray(pred) == np.asarray(labels)))


def linear_probe(
    train_x: np.ndarray,
    train_y: np.ndarray,
    test_x: np.ndarray,
    test_y: np.ndarray,
    val_fraction: float = 0.1,
    seed: int = 0,
    max_iter: int = 1000,
    steps_per_decade: int = 8,
    coarse: tuple[float, ...] = COARSE_LOG10_C,
    tie_break: str = "larger",
) -> dict:
    """CLIP-style probe: sweep C on a held-out val split of train (`seed` draws that split), refit on train + val,
    top-1 on test. Ties between C values go to the larger C unless `tie_break="smaller"`."""
    import warnings

    from sklearn.exceptions import ConvergenceWarning

    train_x, test_x = np.asarray(train_x, dtype=np.float32), np.asarray(test_x, dtype=np.float32)
    tr, va = stratified_split(np.asarray(train_y), val_fraction, seed)

    def val_score(c: float) -> float:
        with warnings.catch_warnings():  # extreme C values are expected not to converge; the score still counts
            warnings.simplefilter("ignore", ConvergenceWarning)
            clf = _logreg(c, max_iter, seed).fit(train_x[tr], train_y[tr])
        s = top1(clf.predict(train_x[va]), train_y[va])
        logger.info("linear probe C=%.3g val top-1 %.4f", c, s)
        return s

    sweep = sweep_regularization(val_score, coarse, steps_per_decade, tie_break)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        clf = _logreg(sweep.best_c, max_iter, seed).fit(train_x, train_y)
    return {
        "top1": top1(clf.predict(test_x), test_y),
        "best_C": sweep.best_c,
        "best_lambda": 1.0 / sweep.best_c,
        "val_top1": sweep.best_score,
        "num_fits": len(sweep.evaluated),
        "tie_break": tie_break,
        "sweep": {f"{10**k:.6g}": v for k, v in sweep.evaluated.items()},
        "num_train": int(len(tr)),
        "num_val": int(len(va)),
        "num_test": int(len(test_y)),
    }


def _l2n(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def prototype_weights(x: np.ndarray, y: np.ndarray, num_classes: int | None = None, normalize: bool = False):
    """Linear-layer weights (C, D) = per-class mean of the raw features (paper); with `normalize`, the L2-normalised
    mean of L2-normalised features (a cosine classifier)."""
    x = np.asarray(x, dtype=np.float64)
    x = _l2n(x) if normalize else x
    num_classes = num_classes or int(y.max()) + 1
    w = np.zeros((num_classes, x.shape[1]))
    for c in range(num_classes):
        if np.any(y == c):
            w[c] = x[y == c].mean(axis=0)
    return _l2n(w) if normalize else w


def prototype_classifier(
    train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, test_y: np.ndarray, normalize: bool = False
) -> dict:
    """Prototype probe: logits = x @ W^T with W the raw class means (no bias); top-1 on test. With `normalize`, x and
    W are L2-normalised (cosine). No hyperparameter and no randomness, so no val split and no seed."""
    train_y = np.asarray(train_y)
    w = prototype_weights(train_x, train_y, int(max(train_y.max(), np.asarray(test_y).max())) + 1, normalize)
    tx = np.asarray(test_x, dtype=np.float64)
    pred = ((_l2n(tx) if normalize else tx) @ w.T).argmax(axis=1)
    return {
        "top1": top1(pred, test_y),
        "normalize": normalize,
        "num_train": int(len(train_y)),
        "num_test": len(test_y),
    }
