"""ctvl.tokengrid: the sub-bin position of a depth-bin maximum, and separable resampling of token scores."""

from __future__ import annotations

import math

import numpy as np
import pytest
from ctvl.tokengrid import refine_peak


def test_refine_peak_is_the_softmax_mean_around_the_peak():
    s = np.array([0.0, 1.0, 3.0, 2.0, 5.0 - 10.0, -np.inf])
    assert refine_peak(s, 0) == 2.0
    w = np.exp(np.array([0.0, 1.0, 3.0, 2.0]) - 3.0)  # radius 2 around bin 2: bins 0-4, bin 4 at -5
    w = np.append(w, math.exp(-8.0))
    assert refine_peak(s, 2) == pytest.approx(float((np.arange(5) * w).sum() / w.sum()))
    assert 2.0 < refine_peak(s, 1) < 2.5  # pulled toward the better neighbour, never past half a bin here
    assert refine_peak(np.array([1.0, 4.0, 1.0]), 1) == pytest.approx(1.0)  # symmetric: the centre
    # bins outside the scan (-inf) weigh nothing; a given peak is refined where it is
    assert refine_peak(np.array([-np.inf, 2.0, 2.0, -np.inf]), 3) == pytest.approx(1.5)
    assert refine_peak(np.array([9.0, 0.0, 1.0, 0.0]), 1, peak=2) == pytest.approx(2.0)


def test_separable_resample_equals_simpleitk_on_parallel_grids_and_declines_oblique_ones():
    """Heatmap scores onto the input grid: any flips and axis permutations, a destination larger than the source
    (the fill beyond half a cell), the same values as SimpleITK's linear resampling."""
    import torch
    from ctvl.geometry import Volume, resample
    from ctvl.tokengrid import separable_resample

    rng = np.random.default_rng(3)
    filled = inside = 0
    for _ in range(12):
        src = np.eye(4)
        src[:3, :3] = np.eye(3)[:, rng.permutation(3)] * rng.choice([-1.0, 1.0], 3) * rng.uniform(4.0, 18.0, 3)
        src[:3, 3] = rng.uniform(-40.0, 40.0, 3)
        dst = np.eye(4)
        dst[:3, :3] = np.diag(rng.choice([-1.0, 1.0], 3) * rng.uniform(0.7, 3.0, 3))
        dst[:3, 3] = rng.uniform(-90.0, -30.0, 3) * np.sign(np.diag(dst[:3, :3]))
        scores = torch.rand(*(int(n) for n in rng.integers(3, 9, 3)))
        shape = tuple(int(n) for n in rng.integers(20, 70, 3))
        got = separable_resample(scores, src, dst, shape, fill=-1.0)
        want = resample(Volume(scores.numpy(), src), dst, shape, order=1, fill=-1.0).array
        assert got.shape == shape and got.dtype == np.float32
        np.testing.assert_allclose(got, want, atol=1e-5)
        filled, inside = filled + int((want == -1.0).any()), inside + int((want > -1.0).any())
    assert filled >= 3 and inside >= 3, (filled, inside)  # both the fill and the interpolation were compared
    tilt = np.deg2rad(10.0)
    oblique = src.copy()
    oblique[:3, :3] = np.array([[1.0, 0, 0], [0, np.cos(tilt), -np.sin(tilt)], [0, np.sin(tilt), np.cos(tilt)]]) * 5.0
    assert separable_resample(scores, oblique, dst, shape, fill=-1.0) is None
