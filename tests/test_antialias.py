"""Anti-aliased preprocessing: prefilter widths per axis, what it buys, and its one-pass path (`separable_plan`)."""

from __future__ import annotations

import numpy as np
import pytest
from ctvl.geometry import (
    Volume,
    antialias,
    antialias_sigmas_mm,
    discrete_gaussian_taps,
    model_grid,
    resample,
    separable_plan,
    to_model_space,
    window,
)

MODEL_SPACING = (3.2, 4.4, 4.4)  # (d, h, w): the demo grid


def _affine(direction: np.ndarray, spacing: tuple[float, float, float]) -> np.ndarray:
    matrix = np.eye(4)
    matrix[:3, :3] = np.asarray(direction, float) @ np.diag(spacing)
    return matrix


def test_sigmas_follow_each_voxel_axis_to_its_patient_axis():
    lps_axial = _affine(np.diag([-1.0, -1.0, 1.0]), (1.5, 1.5, 2.5))  # i R->L, j A->P, k I->S
    sig = antialias_sigmas_mm(Volume(np.zeros((4, 4, 4), np.float32), lps_axial), MODEL_SPACING)
    np.testing.assert_allclose(sig, [1.45, 1.45, 0.35])
    # a coronal acquisition: k runs posterior, j superior -> j takes the depth spacing, k the in-plane one
    coronal = _affine(np.array([[1.0, 0, 0], [0, 0, 1], [0, 1, 0]]), (0.8, 1.0, 2.0))
    sig = antialias_sigmas_mm(Volume(np.zeros((4, 4, 4), np.float32), coronal), MODEL_SPACING)
    np.testing.assert_allclose(sig, [1.8, 1.1, 1.2])
    # input coarser than the model grid: no smoothing
    coarse = Volume(np.zeros((4, 4, 4), np.int16), _affine(np.eye(3), (5.0, 5.0, 5.0)))
    assert not antialias_sigmas_mm(coarse, MODEL_SPACING).any()
    assert antialias(coarse, MODEL_SPACING) is coarse  # nothing to do: no copy, no float conversion


def test_antialias_keeps_the_mean_and_geometry_and_smooths_only_along_coarsened_axes():
    rng = np.random.default_rng(0)
    array = rng.normal(0, 100, (20, 24, 24)).astype(np.float32)
    vol = Volume(array, _affine(np.eye(3), (1.0, 1.0, 5.0)))  # k already coarser than the model's 3.2 mm
    out = antialias(vol, MODEL_SPACING)
    assert out.array.shape == array.shape and out.array.dtype == np.float32
    np.testing.assert_array_equal(out.ijk_to_ras, vol.ijk_to_ras)
    assert abs(float(out.array.mean()) - float(array.mean())) < 5.0
    assert out.array.std() < 0.6 * array.std()  # smoothed in-plane
    # no smoothing along k: a slice-to-slice step survives whole
    step = np.zeros((20, 24, 24), np.float32)
    step[10:] = 1000.0
    out = antialias(Volume(step, vol.ijk_to_ras), MODEL_SPACING).array
    np.testing.assert_allclose(out[9], 0.0, atol=1e-3)
    np.testing.assert_allclose(out[10], 1000.0, atol=1e-2)


@pytest.mark.parametrize("antialias_input", [False, True])
def test_a_thin_wall_reaches_the_model_grid_wherever_it_lies(antialias_input: bool):
    """A 1-mm wall (+500 HU in -900 HU lung) sampled onto a 4.4-mm grid: plain linear resampling sees it at full
    contrast at one position and not at all 2 mm away; with the prefilter its partial volume reaches the grid the
    same way at every position (the signal the model gets no longer depends on where the wall lies)."""
    seen = []
    for offset in range(5):  # the wall moves by 1 mm steps across one model voxel
        array = np.full((12, 64, 64), -900.0, np.float32)
        array[:, :, 20 + offset] = 500.0  # i = 20 + offset, 1 mm thick, runs along j and k
        vol = Volume(array, _affine(np.diag([-1.0, -1.0, 1.0]), (1.0, 1.0, 3.2)))
        x, _ = to_model_space(vol, MODEL_SPACING, (12, 12, 12), hu_window=(-1000, 1000),
                              antialias_input=antialias_input)
        seen.append(float((x - x.min()).sum(axis=2).mean()))  # wall signal summed across w
    seen = np.array(seen)
    if antialias_input:  # skimage's sigma leaves a ripple of about +-10% with position
        assert seen.min() > 0.75 * seen.max(), seen
    else:  # the aliasing the prefilter removes: the wall all but vanishes at some positions
        assert seen.min() < 0.25 * seen.max(), seen


def test_discrete_gaussian_taps_are_itk_s_kernel():
    import SimpleITK as sitk

    assert discrete_gaussian_taps(0.0).tolist() == [1.0]
    for sigma in (0.4, 1.3, 2.6):
        taps = discrete_gaussian_taps(sigma)
        np.testing.assert_allclose(taps, taps[::-1])
        assert abs(taps.sum() - 1.0) < 1e-12
        impulse = np.zeros((1, 1, 41), np.float32)
        impulse[0, 0, 20] = 1.0
        image = sitk.GetImageFromArray(impulse)
        kernel = sitk.GetArrayFromImage(sitk.DiscreteGaussian(image, [sigma**2, 0.0, 0.0], 32, 0.01, True))[0, 0]
        r = len(taps) // 2
        np.testing.assert_allclose(kernel[20 - r:21 + r], taps, atol=1e-6)
        assert np.abs(kernel).sum() == pytest.approx(1.0, abs=1e-5)  # nothing beyond the taps


@pytest.mark.parametrize("direction", [
    np.diag([-1.0, -1.0, 1.0]),  # LPS axial, the CT-RATE convention
    np.diag([1.0, 1.0, -1.0]),  # flipped along every axis
    np.array([[1.0, 0, 0], [0, 0, 1], [0, 1, 0]]),  # coronal: voxel axes permuted
])
def test_filter_and_sample_in_one_pass_equals_smoothing_then_resampling(direction: np.ndarray):
    """Axis-parallel scans take `separable_plan` (three matrix products); the result is SimpleITK's DiscreteGaussian
    followed by linear resampling, up to float rounding, including the fill of a model grid larger than the scan."""
    rng = np.random.default_rng(1)
    array = rng.normal(-300, 400, (30, 90, 70)).astype(np.int16)
    vol = Volume(array, _affine(direction, (0.7, 0.8, 1.0)))
    vol.ijk_to_ras[:3, 3] = [12.0, -30.0, 40.0]
    shape = (40, 24, 16)  # the model grid's 3.2 x 4.4 x 4.4 mm box overhangs the scan on some axes
    grid = model_grid(vol, MODEL_SPACING, shape)
    sigmas = antialias_sigmas_mm(vol, MODEL_SPACING)
    assert separable_plan(vol.ijk_to_ras, array.shape, grid, shape, sigmas / vol.spacing) is not None
    fast, fast_grid = to_model_space(vol, MODEL_SPACING, shape, (-1000, 1000), antialias_input=True)
    slow = window(resample(antialias(vol, MODEL_SPACING), grid, shape, order=1, fill=-1024.0).array, (-1000, 1000))
    np.testing.assert_array_equal(fast_grid, grid)
    assert (slow == 0).any() and (slow > 0).any()  # the fill (-1024 HU -> 0) and the scan both present
    np.testing.assert_allclose(fast, slow, atol=2e-6)


def test_an_oblique_scan_is_smoothed_then_resampled_by_simpleitk():
    tilt = np.deg2rad(15.0)  # a gantry tilt: no one-matrix-per-axis plan exists
    direction = np.array([[1.0, 0, 0], [0, np.cos(tilt), -np.sin(tilt)], [0, np.sin(tilt), np.cos(tilt)]])
    vol = Volume(np.random.default_rng(2).normal(0, 300, (20, 40, 40)).astype(np.float32),
                 _affine(direction, (0.8, 0.8, 1.0)))
    grid = model_grid(vol, MODEL_SPACING, (8, 10, 10))
    assert separable_plan(vol.ijk_to_ras, vol.array.shape, grid, (8, 10, 10)) is None
    out, _ = to_model_space(vol, MODEL_SPACING, (8, 10, 10), (-1000, 1000), antialias_input=True)
    slow = window(resample(antialias(vol, MODEL_SPACING), grid, (8, 10, 10), order=1, fill=-1024.0).array,
                  (-1000, 1000))
    np.testing.assert_allclose(out, slow, atol=1e-6)
