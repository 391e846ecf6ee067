"""training.augment: per-volume parameters from the loader, applied to the batch on the device."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from training import augment
from training.config import AugmentConfig


def _params(**kw) -> torch.Tensor:
    p = np.zeros(augment.N_PARAMS)
    for i, k in enumerate(("scale", "shift", "std", "seed", "dy", "dx")):
        p[i] = kw.get(k, 0.0)
    return torch.from_numpy(p)


def test_identity_parameters_leave_the_batch_unchanged_and_cast_to_float32():
    x = torch.rand(2, 1, 4, 6, 5).half()
    out = augment.apply(x, torch.stack([_params(), _params()]))
    assert out.dtype == torch.float32 and torch.equal(out, x.float())
    assert torch.equal(augment.apply(x, None), x.float())


def test_scale_shift_and_translation_are_exact():
    x = torch.rand(2, 1, 3, 6, 5)
    p = torch.stack([_params(scale=0.1, shift=-0.05), _params(dy=2, dx=-1)])
    out = augment.apply(x, p)
    assert torch.allclose(out[0], x[0] * 1.1 - 0.05, atol=1e-6)
    # row r of the output is row r-2 of the input (top rows repeat row 0); column c is column c+1 (last repeats)
    assert torch.equal(out[1, ..., 2:, :-1], x[1, ..., :-2, 1:])
    assert torch.equal(out[1, ..., 0, :-1], x[1, ..., 0, 1:]) and torch.equal(out[1, ..., :, -1], out[1, ..., :, -2])


def test_noise_is_seeded_and_has_the_drawn_std():
    x = torch.zeros(1, 1, 16, 32, 32)
    a = augment.apply(x, _params(std=0.02, seed=7)[None])
    assert torch.equal(a, augment.apply(x, _params(std=0.02, seed=7)[None]))
    assert not torch.equal(a, augment.apply(x, _params(std=0.02, seed=8)[None]))
    assert float(a.std()) == pytest.approx(0.02, rel=0.05)


def test_sampled_parameters_respect_the_config():
    cfg = AugmentConfig(prob=1.0, intensity_scale=0.1, intensity_shift=0.05, noise_std=0.02, translate_vox=3.0)
    rng = np.random.default_rng(0)
    ps = np.stack([augment.sample_params(cfg, rng) for _ in range(500)])
    assert np.abs(ps[:, 0]).max() <= 0.1 and np.abs(ps[:, 1]).max() <= 0.05
    assert (ps[:, 2] >= 0).all() and ps[:, 2].max() <= 0.02 and (ps[:, 3] > 0).all()
    assert set(np.unique(ps[:, 4:])) <= set(range(-3, 4)) and np.abs(ps[:, 4:]).max() == 3
    off = np.stack([augment.sample_params(AugmentConfig(prob=0.0), rng) for _ in range(50)])
    assert not off.any()
    half = np.stack([augment.sample_params(AugmentConfig(prob=0.5), np.random.default_rng(i)) for i in range(400)])
    assert 0.4 < (half[:, 0] != 0).mean() < 0.6  # each augmentation on about half the time


def test_blobness_channels_take_the_scale_and_shift_not_the_offset_or_noise():
    x = torch.rand(1, 3, 4, 6, 5)  # image + two precomputed blobness channels
    out = augment.apply(x, _params(scale=0.1, shift=-0.05, std=0.02, seed=3, dy=1)[None])
    moved = augment._shift_plane(x[0], 1, 0)
    torch.testing.assert_close(out[0, 1:], moved[1:] * 1.1)  # blobness is linear in the intensity scale
    assert (out[0, 0] - (moved[0] * 1.1 - 0.05)).abs().max() > 1e-3  # the image gets offset and noise
