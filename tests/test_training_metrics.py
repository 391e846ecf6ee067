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
