"""ctvl.tokengrid.refine_peak: the sub-bin position of a depth-bin maximum."""

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
