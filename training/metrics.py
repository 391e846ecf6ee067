"""Metrics for the CT-RATE protocol, in plain numpy (checked against scikit-learn in tests).

- Classification: AUROC (rank statistic with tie correction), and F1 / accuracy / precision at a threshold.
- Threshold rules: ``youden`` (max TPR - FPR, CT-CLIP's rule) and ``f1`` (F1-optimal). Picking the threshold on
  the evaluation set itself flatters F1; the evaluator also reports thresholds fixed on a validation split.
- Retrieval: report -> volume Recall@K inside pools of ``pool_size`` volumes.
- Uncertainty: percentile bootstrap intervals over volumes (a volume's labels, snippets and heatmaps move together).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np


def auroc(y_true: np.ndarray, score: np.ndarray) -> float:
    """Area under the ROC curve (Mann-Whitney U with average ranks for ties); NaN if one class is absent."""
    y = np.asarray(y_true).astype(bool).ravel()
    s = np.asarray(score, dtype=np.float64).ravel()
    n_pos = int(y.sum())
    n_neg = int(y.size - n_pos)
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    order = np.argsort(s, kind="mergesort")
    sorted_s = s[order]
    ranks = np.empty(s.size, dtype=np.float64)
    # average ranks (1-based) over runs of ties
    boundaries = np.flatnonzero(np.diff(sorted_s)) + 1
    starts = np.concatenate(([0], boundaries))
    ends = np.concatenate((boundaries, [s.size]))
    for a, b in zip(starts, ends):
        ranks[order[a:b]] = (a + b + 1) / 2.0
    return float((ranks[y].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def confusion(y_true: np.ndarray, y_pred: np.ndarray) -> tuple[int, int, int, int]:
    """(tp, fp, tn, fn) of boolean predictions."""
    y = np.asarray(y_true).astype(bool).ravel()
    p = np.asarray(y_pred).astype(bool).ravel()
    tp = int(np.sum(y & p))
    fp = int(np.sum(~y & p))
    tn = int(np.sum(~y & ~p))
    fn = int(np.sum(y & ~p))
    return tp, fp, tn, fn


def binary_metrics(y_true: np.ndarray, y_pred: np.ndarray) -> dict[str, float]:
    """F1, accuracy, precision, recall of boolean predictions (0 where undefined, like sklearn's zero_division=0)."""
    tp, fp, tn, fn = confusion(y_true, y_pred)
    n = tp + fp + tn + fn
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * tp / (2 * tp + fp + fn) if (2 * tp + fp + fn) else 0.0
    accuracy = (tp + tn) / n if n else 0.0
    return {"f1": f1, "accuracy": accuracy, "precision": precision, "recall": recall}


def _candidate_thresholds(score: np.ndarray) -> np.ndarray:
    u = np.unique(np.asarray(score, dtype=np.float64))
    return np.concatenate((u, [np.inf]))  # predict positive when score >= threshold


def pick_threshold(y_true: np.ndarray, score: np.ndarray, rule: str = "youden") -> float:
    """Threshold (predict positive when ``score >= t``) chosen on (y_true, score) by ``youden`` or ``f1``."""
    y = np.asarray(y_true).astype(bool).ravel()
    s = np.asarray(score, dtype=np.float64).ravel()
    if rule not in ("youden", "f1"):
        raise ValueError(f"unknown threshold rule {rule!r} (use 'youden' or 'f1')")
    best_t, best_v = 0.5, -np.inf
    n_pos, n_neg = max(int(y.sum()), 1), max(int((~y).sum()), 1)
    for t in _candidate_thresholds(s):
        p = s >= t
        tp, fp, tn, fn = confusion(y, p)
        v = tp / n_pos - fp / n_neg if rule == "youden" else binary_metrics(y, p)["f1"]
        if v > best_v:
            best_t, best_v = float(t), v
    return best_t


def recall_at_k(similarity: np.ndarray, ks=(1, 5, 10, 50)) -> dict[str, float]:
    """Text->volume Recall@K for a square similarity matrix [n_texts, n_volumes] (match on the diagonal)."""
    sim = np.asarray(similarity, dtype=np.float64)
    n = sim.shape[0]
    if sim.shape != (n, n) or n == 0:
        raise ValueError(f"similarity must be square and non-empty, got {sim.shape}")
    correct = sim[np.arange(n), np.arange(n)][:, None]
    rank = np.sum(sim > correct, axis=1)  # 0 = retrieved first (ties count in our favour, as in CT-CLIP)
    return {f"R@{k}": float(np.mean(rank < k)) for k in ks}


def pooled_recall_at_k(
    text_emb: np.ndarray, vol_emb: np.ndarray, pool_size: int = 100, ks=(1, 5, 10, 50), seed: int = 0
) -> dict[str, float]:
    """Recall@K averaged over disjoint random pools of ``pool_size`` (report, volume) pairs.

    With fewer pairs than ``pool_size`` one pool of all pairs is used (the result records the pool size used).
    """
    t = np.asarray(text_emb, dtype=np.float64)
    v = np.asarray(vol_emb, dtype=np.float64)
    n = t.shape[0]
    if n == 0:
        return {"pool_size": 0, "n_pools": 0, **{f"R@{k}": float("nan") for k in ks}}
    order = np.random.default_rng(seed).permutation(n)
    size = min(pool_size, n)
    pools = [order[i : i + size] for i in range(0, n - size + 1, size)]
    results = [recall_at_k(t[p] @ v[p].T, ks) for p in pools]
    out: dict[str, float] = {"pool_size": size, "n_pools": len(pools)}
    for k in ks:
        out[f"R@{k}"] = float(np.mean([r[f"R@{k}"] for r in results]))
    return out


def mean_auroc(y_true: np.ndarray, score: np.ndarray) -> float:
    """Mean AUROC over the columns of [N,L] labels (NaN = missing) and scores that hold both classes; NaN if none."""
    y, s = np.asarray(y_true, dtype=np.float64), np.asarray(score, dtype=np.float64)
    values = []
    for j in range(y.shape[1]):
        ok = ~np.isnan(y[:, j])
        pos = y[ok, j] > 0.5
        if 0 < pos.sum() < pos.size:
            values.append(auroc(pos, s[ok, j]))
    return float(np.mean(values)) if values else float("nan")


def bootstrap_interval(n_units: int, stat: Callable[[np.ndarray], float], n_boot: int = 1000, level: float = 0.95,
                       seed: int = 0) -> tuple[float, float] | None:
    """Percentile bootstrap interval of ``stat(idx)``, idx = ``n_units`` unit indices drawn with replacement.

    The units are what was sampled (volumes): every figure a volume contributes (its labels, snippets, heatmaps)
    moves with it. Draws where ``stat`` is NaN are dropped; None when no draw is finite or ``n_units`` is 0.
    """
    if n_units <= 0:
        return None
    rng = np.random.default_rng(seed)
    draws = np.array([stat(rng.integers(0, n_units, n_units)) for _ in range(n_boot)], dtype=np.float64)
    draws = draws[np.isfinite(draws)]
    if not draws.size:
        return None
    tail = (1.0 - level) / 2.0
    lo, hi = np.quantile(draws, [tail, 1.0 - tail])
    return float(lo), float(hi)


def pick_units(values_by_unit: list[np.ndarray], idx: np.ndarray) -> np.ndarray:
    """The values of the units ``idx`` (with repeats), concatenated: a bootstrap draw of per-unit row lists."""
    parts = [values_by_unit[i] for i in idx]
    return np.concatenate(parts) if parts else np.zeros(0)
