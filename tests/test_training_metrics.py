"""training.metrics against scikit-learn."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn import metrics as skm

from training import metrics as M


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_auroc_matches_sklearn_with_ties(seed):
    rng = np.random.default_rng(seed)
    y = rng.random(200) < 0.3
    s = np.round(rng.random(200) + y * 0.3, 1)  # rounding creates many ties
    assert M.auroc(y, s) == pytest.approx(skm.roc_auc_score(y, s), abs=1e-12)


def test_auroc_single_class_is_nan():
    assert np.isnan(M.auroc(np.zeros(5), np.arange(5)))


@pytest.mark.parametrize("seed", [0, 3])
def test_binary_metrics_match_sklearn(seed):
    rng = np.random.default_rng(seed)
    y = rng.random(150) < 0.4
    p = rng.random(150) < 0.5
    got = M.binary_metrics(y, p)
    assert got["f1"] == pytest.approx(skm.f1_score(y, p))
    assert got["precision"] == pytest.approx(skm.precision_score(y, p))
    assert got["accuracy"] == pytest.approx(skm.accuracy_score(y, p))
    assert got["recall"] == pytest.approx(skm.recall_score(y, p))


def test_zero_division_matches_sklearn():
    y, p = np.array([1, 0, 1]), np.zeros(3, bool)
    got = M.binary_metrics(y, p)
    assert got["precision"] == skm.precision_score(y, p, zero_division=0)
    assert got["f1"] == skm.f1_score(y, p, zero_division=0)


def test_youden_threshold_matches_roc_curve():
    rng = np.random.default_rng(5)
    y = rng.random(300) < 0.3
    s = rng.random(300) + 0.4 * y
    fpr, tpr, th = skm.roc_curve(y, s)
    best = th[np.argmax(tpr - fpr)]
    t = M.pick_threshold(y, s, "youden")
    p = s >= t
    j_ours = p[y].mean() - p[~y].mean()
    assert j_ours == pytest.approx(np.max(tpr - fpr))
    assert t == pytest.approx(best)


def test_f1_threshold_is_optimal():
    rng = np.random.default_rng(6)
    y = rng.random(200) < 0.3
    s = rng.random(200) + 0.3 * y
    t = M.pick_threshold(y, s, "f1")
    best = max(skm.f1_score(y, s >= u) for u in np.unique(s))
    assert skm.f1_score(y, s >= t) == pytest.approx(best)


def test_recall_at_k():
    sim = np.eye(4)
    assert M.recall_at_k(sim, ks=(1,)) == {"R@1": 1.0}
    sim = np.array([[0.0, 1.0], [1.0, 0.0]])
    assert M.recall_at_k(sim, ks=(1, 2)) == {"R@1": 0.0, "R@2": 1.0}


def test_pooled_recall_random_is_chance():
    rng = np.random.default_rng(0)
    t, v = rng.normal(size=(400, 16)), rng.normal(size=(400, 16))
    r = M.pooled_recall_at_k(t, v, pool_size=100, ks=(1, 10, 50))
    assert r["pool_size"] == 100 and r["n_pools"] == 4
    assert 0.03 < r["R@10"] < 0.2 and 0.35 < r["R@50"] < 0.65
    v = v / np.linalg.norm(v, axis=1, keepdims=True)
    r = M.pooled_recall_at_k(v, v, pool_size=100, ks=(1,))
    assert r["R@1"] == 1.0


def test_mean_auroc_matches_sklearn_over_labels_with_both_classes():
    rng = np.random.default_rng(4)
    y = (rng.random((60, 4)) < 0.3).astype(float)
    s = rng.random((60, 4)) + 0.4 * y
    y[:, 2] = 0.0  # one class only: left out
    y[:5, 3] = np.nan  # missing labels: rows left out of that column
    ok = ~np.isnan(y[:, 3])
    want = np.mean([skm.roc_auc_score(y[:, 0], s[:, 0]), skm.roc_auc_score(y[:, 1], s[:, 1]),
                    skm.roc_auc_score(y[ok, 3], s[ok, 3])])
    assert M.mean_auroc(y, s) == pytest.approx(want, abs=1e-12)
    assert np.isnan(M.mean_auroc(np.zeros((5, 2)), rng.random((5, 2))))


def test_bootstrap_interval_of_a_mean_has_the_normal_width():
    rng = np.random.default_rng(5)
    x = rng.normal(3.0, 2.0, size=400)
    lo, hi = M.bootstrap_interval(len(x), lambda idx: x[idx].mean(), n_boot=2000, seed=1)
    half = 1.96 * x.std() / np.sqrt(len(x))  # the normal approximation's 95% half-width
    assert lo < x.mean() < hi
    assert (hi - lo) / 2 == pytest.approx(half, rel=0.15)
    assert M.bootstrap_interval(len(x), lambda idx: x[idx].mean(), n_boot=2000, seed=1) == (lo, hi)  # seeded


def test_bootstrap_interval_drops_nan_draws_and_has_none_without_data():
    x = np.array([0.0, 1.0])
    # a draw holding only unit 0 is NaN; the others' means are 0.5 or 1.0, so the interval lies there (a NaN kept
    # would make the quantiles NaN)
    lo, hi = M.bootstrap_interval(2, lambda idx: np.nan if (idx == 0).all() else float(x[idx].mean()), seed=0)
    assert 0.5 <= lo <= hi <= 1.0
    assert M.bootstrap_interval(3, lambda idx: np.nan) is None
    assert M.bootstrap_interval(0, lambda idx: 1.0) is None


def test_pick_units_keeps_a_units_rows_together_with_repeats():
    rows = [np.array([1.0, 2.0]), np.array([]), np.array([5.0])]
    assert M.pick_units(rows, np.array([2, 0, 2])).tolist() == [5.0, 1.0, 2.0, 5.0]
    assert M.pick_units(rows, np.array([1])).size == 0
