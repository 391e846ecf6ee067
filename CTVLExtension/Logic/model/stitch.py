"""Shift-and-stitch (Long et al., FCN): a token-grid map evaluated at sub-token offsets and interleaved.

A token of the demo model covers 2 x 4 x 4 model voxels (6.4 x 17.6 x 17.6 mm), and a label heatmap on that grid
can only peak on a token centre. Running the encoder on the input moved by k * p/n voxels (k = 0..n-1 per axis,
p = the token size, n = `ModelConfig.heatmap_subdivision`) puts a token centre on every (p/n)-th voxel; the maps
interleave into one n times finer per axis, with the same per-token function (no retraining, no interpolation).
The input moves by index, the edge voxel filling the gap (as the training augmentation's in-plane shifts do).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable

import numpy as np
import torch
from torch import Tensor


def shift_input(x: Tensor, offset: tuple[int, int, int]) -> Tensor:
    """x [..., D, H, W] -> y with y[..., i, j, k] = x[..., i + a, j + b, k + c] (indices clamped to the edge)."""
    for axis, k in zip((-3, -2, -1), offset):
        if k:
            n = x.shape[axis]
            idx = (torch.arange(n, device=x.device) + int(k)).clamp_(0, n - 1)
            x = x.index_select(axis, idx)
    return x


def stitch_offsets(patch: tuple[int, int, int], subdivision: tuple[int, int, int]) -> list[tuple[int, int, int]]:
    """The input offsets (model voxels) of the passes: k * p/n for k < n, per axis."""
    steps = [range(0, int(p), int(p) // int(n)) for p, n in zip(patch, subdivision)]
    return [tuple(o) for o in itertools.product(*steps)]  # type: ignore[misc]


def stitched(fn: Callable[[Tensor], Tensor], x: Tensor, patch: tuple[int, int, int],
             subdivision: tuple[int, int, int]) -> Tensor:
    """fn: input [B,C,D,H,W] -> maps [B,L,d,h,w] on the token grid (d = D/p_d, ...) -> [B,L,d*n_d,h*n_h,w*n_w].

    Cell f of the result is token f // n of the pass moved by (f % n) * p/n voxels: its centre lies at model voxel
    f * p/n + (p - 1)/2 (`stitched_ijk_to_ras`). subdivision (1, 1, 1) is fn(x).
    """
    n = tuple(int(v) for v in subdivision)
    step = tuple(int(p) // k for p, k in zip(patch, n))
    out: Tensor | None = None
    for offset in stitch_offsets(patch, n):
        maps = fn(shift_input(x, offset))
        if out is None:
            b, lab, d, h, w = maps.shape
            out = maps.new_empty((b, lab, d * n[0], h * n[1], w * n[2]))
        k = tuple(o // s for o, s in zip(offset, step))
        out[:, :, k[0]::n[0], k[1]::n[1], k[2]::n[2]] = maps
    assert out is not None
    return out


def stitched_ijk_to_ras(model_ijk_to_ras: np.ndarray, patch: tuple[int, int, int],
                        subdivision: tuple[int, int, int]) -> np.ndarray:
    """IJK->RAS of the stitched grid: cell f (per axis) at model voxel f * p/n + (p - 1)/2; (1, 1, 1) gives the
    token grid's geometry."""
    step = np.array([int(p) // int(n) for p, n in zip(patch, subdivision)], dtype=np.float64)[::-1]  # i, j, k
    centre = (np.array(patch, dtype=np.float64)[::-1] - 1) / 2
    scale = np.diag([*step, 1.0])
    scale[:3, 3] = centre
    return np.asarray(model_ijk_to_ras, dtype=np.float64) @ scale
