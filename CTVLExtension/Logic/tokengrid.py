"""Token-grid geometry helpers: window planning along S and fast separable resampling of token scores."""

from __future__ import annotations

import math

import numpy as np
import torch
from ctvl.geometry import Volume


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


def linear_weights(coords: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """[len(coords), n] linear-interpolation weights (clamped at the edges) and the mask of coords inside."""
    inside = (coords >= -0.5) & (coords <= n - 0.5)
    c = np.clip(coords, 0.0, n - 1.0)
    lo = np.minimum(np.floor(c).astype(np.int64), max(n - 2, 0))
    frac = c - lo
    w = np.zeros((len(coords), n), dtype=np.float32)
    rows = np.arange(len(coords))
    w[rows, lo] = 1.0 - frac
    if n > 1:
        w[rows, lo + 1] += frac
    return w, inside


def separable_resample(src: torch.Tensor, src_ijk_to_ras: np.ndarray, dst_ijk_to_ras: np.ndarray,
                       shape_kji: tuple[int, int, int], fill: float) -> np.ndarray | None:
    """Trilinear resampling of ``src`` [k, j, i] onto an axis-parallel grid, or None when the grids are oblique."""
    a = np.linalg.inv(src_ijk_to_ras) @ dst_ijk_to_ras  # dst ijk -> src ijk
    lin = a[:3, :3]
    absl = np.abs(lin)
    axis_of = np.argmax(absl, axis=1)  # src axis t <- dst axis axis_of[t]
    off = absl.copy()
    off[np.arange(3), axis_of] = 0.0
    if sorted(axis_of.tolist()) != [0, 1, 2] or off.max() > 1e-6 * absl.max():
        return None
    dst_shape_ijk = shape_kji[::-1]
    src_shape_ijk = tuple(src.shape[::-1])
    weights, masks = {}, {}
    for t in range(3):  # src axis (i, j, k)
        p = int(axis_of[t])  # dst axis
        coords = lin[t, p] * np.arange(dst_shape_ijk[p], dtype=np.float64) + a[t, 3]
        weights[p], masks[p] = linear_weights(coords, src_shape_ijk[t])
        weights[p] = torch.from_numpy(weights[p])
    # src numpy axes ordered by the dst numpy axis (k, j, i) they map to, then three contractions, the largest last
    # so the output is written contiguously: [X,p]x[p,q,r] -> [X,Y,r] -> [X*Y, r] @ [r, Z].
    src_np_axis_for_dst = [2 - int(np.where(axis_of == 2 - n)[0][0]) for n in range(3)]
    t = src.detach().float().cpu().permute(*src_np_axis_for_dst).contiguous()
    wx, wy, wz = (weights[2 - n] for n in range(3))
    u = torch.tensordot(wx, t, dims=([1], [0]))  # [X, q, r]
    v = torch.einsum("Yq,Xqr->XYr", wy, u).contiguous()  # [X, Y, r]
    out = (v.reshape(-1, v.shape[-1]) @ wz.t()).reshape(shape_kji)
    for p in range(3):  # dst ijk axis p is numpy axis 2 - p
        bad = torch.from_numpy(~masks[p])
        if bad.any():
            index: list = [slice(None)] * 3
            index[2 - p] = bad
            out[tuple(index)] = fill
    return out.numpy()
