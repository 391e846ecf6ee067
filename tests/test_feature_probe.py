"""benchmarks.feature_probe: the linear probe reads a label that is in the features and not one that is not."""

from __future__ import annotations

import numpy as np


def test_probe_reads_a_label_in_the_features_and_not_noise():
    from benchmarks.feature_probe import probe

    rng = np.random.default_rng(0)
    xt, xv = rng.normal(size=(300, 40)), rng.normal(size=(200, 40))

    def labels(x, noise):
        y = np.zeros((len(x), 3), np.float32)
        y[:, 0] = x[:, 3] + 0.3 * x[:, 7] > 0.5  # in the features
        y[:, 1] = noise.random(len(x)) < 0.3  # independent of them
        y[:, 2] = 0  # one class: no AUROC
        return y

    yt, yv = labels(xt, rng), labels(xv, rng)
    yt[::10, 0] = np.nan  # labels a CSV lacks for some scans are left out, not fitted as NaN
    yv[::10, 0] = np.nan
    valid, train = probe(xt, yt, xv, yv)
    assert valid[0] > 0.95 and train[0] > 0.95
    assert abs(valid[1] - 0.5) < 0.15
    assert np.isnan(valid[2]) and np.isnan(train[2])
