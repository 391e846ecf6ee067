"""Token-grid geometry helpers: window planning along S and fast separable resampling of token scores."""

from __future__ import annotations

import math

import numpy as np
import torch
from ctvl.geometry import Volume, separable_plan


def z_extent_voxels(volume: Volume, spacing_d: float) -> int:
    """How many model slices (of ``spacing_d`` mm) cover the volume's S extent."""
    i, j, k = volume.shape_ijk
    corners = np.array([[a, b, c] for a in (0, i - 1) for b in (0, j - 1) for c in (0, k - 1)], dtype=np.float64)
    z = volume.ijk_to_ras_points(corners)[:, 2]
    return int(math.ceil((z.max() - z.min()) / spacing_d - 1e-6)) + 1


def plan_windows(n_needed: int, depth: int, patch_d: int) -> tuple[int, list[int]]:
    """Total grid depth and window starts covering ``n_needed`` slices with windows of ``depth`` (half overlap)."""
    if n_needed <= depth:
        return depth, [0]
    stride = max(patch_d, (depth // 2) // patch_d * patch_d)
    n_windows = 1 + int(math.ceil((n_needed - depth) / stride))
    total = depth + (n_windows - 1) * stride
    return total, [w * stride for w in range(n_windows)]


def refine_peak(scores: np.ndarray, radius: int, peak: int | None = None) -> float:
    """Sub-bin position of a maximum of depth-bin scores (logits; -inf = outside the scan): the softmax-weighted
    mean index of the bins within ``radius`` of ``peak`` (default: the argmax). radius 0 -> the peak's index."""
    s = np.asarray(scores, dtype=np.float64)
    b = int(np.argmax(s)) if peak is None else int(peak)
    if radius <= 0 or not np.isfinite(s[b]):
        return float(b)
    lo, hi = max(0, b - int(radius)), min(len(s), b + int(radius) + 1)
    w = np.exp(s[lo:hi] - s[lo:hi][np.isfinite(s[lo:hi])].max())
    w[~np.isfinite(w)] = 0.0
    return float((np.arange(lo, hi) * w).sum() / w.sum())


def hat_weights(n: int) -> np.ndarray:
    t = np.arange(n, dtype=np.float32)
    return np.minimum(t + 1.0, n - t)


def separable_resample(src: torch.Tensor, src_ijk_to_ras: np.ndarray, dst_ijk_to_ras: np.ndarray,
                       shape_kji: tuple[int, int, int], fill: float) -> np.ndarray | None:
    """Trilinear resampling of ``src`` [k, j, i] onto an axis-parallel grid, or None when the grids are oblique."""
    plan = separable_plan(src_ijk_to_ras, tuple(src.shape), dst_ijk_to_ras, shape_kji)
    return None if plan is None else plan.apply(src.detach().float().cpu().numpy(), fill)
