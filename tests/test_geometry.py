"""Geometry: SimpleITK conversion (LPS <-> RAS), model grid, resampling, slice <-> position <-> model depth."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk
from ctvl.geometry import (
    Volume,
    model_depth_to_slice,
    model_grid,
    ras_z_to_slice,
    resample,
    slice_index_to_position_mm,
    slice_to_model_depth,
    to_model_space,
    volume_centre_ras,
    volume_from_sitk,
    volume_to_sitk,
    window,
)

SHAPE_KJI = (18, 20, 24)


def rotation(ax: float, ay: float, az: float) -> np.ndarray:
    cx, sx, cy, sy, cz, sz = np.cos(ax), np.sin(ax), np.cos(ay), np.sin(ay), np.cos(az), np.sin(az)
    rx = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    ry = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    rz = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    return rz @ ry @ rx


def affine(direction: np.ndarray, spacing=(0.7, 0.8, 2.5), origin=(-100.3, 50.2, -300.7)) -> np.ndarray:
    matrix = np.eye(4)
    matrix[:3, :3] = np.asarray(direction) @ np.diag(spacing)
    matrix[:3, 3] = origin
    return matrix


OBLIQUE = affine(rotation(0.2, -0.15, 0.3) @ np.diag([-1.0, 1.0, 1.0]))
LPS_AXIAL = affine(np.diag([-1.0, -1.0, 1.0]))
RAS_INFERIOR = affine(np.diag([1.0, 1.0, -1.0]))  # slices go toward the feet


def ras_grid_points(matrix: np.ndarray, shape_kji) -> np.ndarray:
    """RAS of every voxel centre, shape [k, j, i, 3]."""
    k, j, i = np.meshgrid(*(np.arange(n) for n in shape_kji), indexing="ij")
    ijk = np.stack([i, j, k], axis=-1).astype(np.float64)
    return ijk @ matrix[:3, :3].T + matrix[:3, 3]


def linear_field(ras: np.ndarray) -> np.ndarray:
    return ras @ np.array([1.5, -2.0, 0.75]) + 10.0


@pytest.mark.parametrize("matrix", [OBLIQUE, LPS_AXIAL, RAS_INFERIOR])
def test_sitk_round_trip_and_lps_physical_points(matrix):
    array = np.arange(np.prod(SHAPE_KJI), dtype=np.int16).reshape(SHAPE_KJI)
    volume = Volume(array, matrix)
    image = volume_to_sitk(volume)
    assert image.GetSize() == (24, 20, 18)
    for ijk in [(0, 0, 0), (23, 19, 17), (5, 7, 11)]:
        lps = np.array(image.TransformIndexToPhysicalPoint(ijk))
        ras = volume.ijk_to_ras_points(ijk)[0]
        np.testing.assert_allclose(lps, ras * [-1, -1, 1], atol=1e-9)
        assert sitk.GetArrayViewFromImage(image)[ijk[2], ijk[1], ijk[0]] == array[ijk[2], ijk[1], ijk[0]]
    back = volume_from_sitk(image)
    np.testing.assert_array_equal(back.array, array)
    np.testing.assert_allclose(back.ijk_to_ras, matrix, rtol=0, atol=1e-12)
    assert back.ijk_to_ras.dtype == np.float64


def test_volume_to_sitk_casts_bool_and_dtype():
    mask = np.zeros(SHAPE_KJI, dtype=bool)
    mask[3, 4, 5] = True
    assert volume_to_sitk(Volume(mask, OBLIQUE)).GetPixelID() == sitk.sitkUInt8
    assert volume_to_sitk(Volume(mask, OBLIQUE), np.float32).GetPixelID() == sitk.sitkFloat32
    half = np.linspace(0, 1, mask.size, dtype=np.float16).reshape(SHAPE_KJI)
    assert volume_to_sitk(Volume(half, OBLIQUE)).GetPixelID() == sitk.sitkFloat32
    big = np.arange(mask.size, dtype=">i2").reshape(SHAPE_KJI)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(volume_to_sitk(Volume(big, OBLIQUE))), big)


def test_model_grid_is_lps_aligned_and_centred():
    volume = Volume(np.zeros(SHAPE_KJI, np.int16), OBLIQUE)
    grid = model_grid(volume, spacing_dhw=(3.0, 1.5, 1.25), shape_dhw=(7, 10, 12))
    np.testing.assert_allclose(grid[:3, :3], np.diag([-1.25, -1.5, 3.0]))
    centre_model = grid @ np.array([(12 - 1) / 2, (10 - 1) / 2, (7 - 1) / 2, 1.0])
    np.testing.assert_allclose(centre_model[:3], volume_centre_ras(volume), atol=1e-9)


@pytest.mark.parametrize("order", [0, 1])
def test_resample_onto_own_grid_is_identity(order):
    array = np.random.default_rng(0).integers(-1000, 1000, SHAPE_KJI).astype(np.int16)
    volume = Volume(array, OBLIQUE)
    out = resample(volume, OBLIQUE, SHAPE_KJI, order=order)
    np.testing.assert_array_equal(out.array, array)
    assert out.array.dtype == (np.int16 if order == 0 else np.float32)


@pytest.mark.parametrize("order", [0, 1])
def test_resample_integer_shift_is_exact(order):
    """A grid shifted by one voxel along each axis (real resampling path) returns the shifted array."""
    array = np.random.default_rng(1).integers(-1000, 1000, SHAPE_KJI).astype(np.int16)
    volume = Volume(array, OBLIQUE)
    shifted = OBLIQUE.copy()
    shifted[:3, 3] = volume.ijk_to_ras_points([1, 1, 1])[0]
    out = resample(volume, shifted, (17, 19, 23), order=order, fill=-1024)
    np.testing.assert_allclose(out.array, array[1:, 1:, 1:], atol=1e-3)


@pytest.mark.parametrize("source", [OBLIQUE, RAS_INFERIOR])
def test_resample_reproduces_a_linear_field_in_ras(source):
    """Trilinear interpolation is exact for a linear function of RAS: any LPS/RAS or axis mix-up would show."""
    volume = Volume(linear_field(ras_grid_points(source, SHAPE_KJI)).astype(np.float32), source)
    target = affine(rotation(-0.1, 0.25, 1.2), spacing=(1.1, 0.9, 1.7), origin=(0, 0, 0))
    target[:3, 3] = volume_centre_ras(volume) - target[:3, :3] @ np.array([4.5, 5.0, 3.5])
    out = resample(volume, target, (8, 11, 10), order=1, fill=np.nan)
    ras = ras_grid_points(target, (8, 11, 10))
    expected = linear_field(ras)
    ijk = volume.ras_to_ijk_points(ras.reshape(-1, 3)).reshape(ras.shape)
    inside = np.all((ijk >= 0) & (ijk <= np.array(volume.shape_ijk) - 1), axis=-1)  # not in the half-voxel rim
    assert inside.sum() > 0.3 * inside.size and np.isfinite(out.array[inside]).all()
    np.testing.assert_allclose(out.array[inside], expected[inside], atol=1e-3)


def test_point_lesion_lands_at_same_ras():
    array = np.full(SHAPE_KJI, -1000, np.int16)
    lesion_ijk = (14, 6, 9)
    array[lesion_ijk[2], lesion_ijk[1], lesion_ijk[0]] = 1
    volume = Volume(array, OBLIQUE)
    lesion_ras = volume.ijk_to_ras_points(lesion_ijk)[0]
    labels = volume.with_array((array > 0).astype(np.uint8))
    grid = model_grid(volume, (0.5, 0.5, 0.5), (64, 64, 64))
    for order, source, fill in [(1, volume, -1000.0), (0, labels, 0)]:
        out = resample(source, grid, (64, 64, 64), order=order, fill=fill)
        values = out.array.astype(np.float64) - out.array.min()
        kji = np.argwhere(values > 0.5 * values.max())
        weights = values[tuple(kji.T)]
        centroid_ijk = (kji[:, ::-1] * weights[:, None]).sum(0) / weights.sum()
        np.testing.assert_allclose(out.ijk_to_ras_points(centroid_ijk)[0], lesion_ras, atol=0.8)


def test_resample_label_rejects_unrepresentable_fill():
    labels = Volume(np.ones(SHAPE_KJI, np.uint8), OBLIQUE)
    with pytest.raises(ValueError, match="fill=0"):
        resample(labels, LPS_AXIAL, (4, 4, 4), order=0)
    out = resample(labels, LPS_AXIAL, (4, 4, 4), order=0, fill=0)
    assert out.array.dtype == np.uint8


def test_to_model_space_puts_a_ras_point_at_the_right_model_voxel():
    array = np.full(SHAPE_KJI, -1000, np.int16)
    array[7:10, 5:8, 11:14] = 400  # a bright cube around voxel (12, 6, 8)
    volume = Volume(array, RAS_INFERIOR)
    point = volume.ijk_to_ras_points([12, 6, 8])[0]
    x, grid = to_model_space(volume, spacing_dhw=(2.0, 1.0, 1.0), shape_dhw=(24, 24, 24), hu_window=(-1000, 400))
    assert x.dtype == np.float32 and x.shape == (24, 24, 24) and x.flags.c_contiguous
    assert x.min() >= 0.0 and x.max() <= 1.0
    dhw = np.argwhere(x > 0)
    weights = x[tuple(dhw.T)]
    centroid_whd = (dhw[:, ::-1] * weights[:, None]).sum(axis=0) / weights.sum()
    expected_whd = (np.linalg.inv(grid) @ np.append(point, 1.0))[:3]
    np.testing.assert_allclose(centroid_whd, expected_whd, atol=0.3)
    # orientation: model w grows toward patient Left, h toward Posterior, d toward Superior
    np.testing.assert_allclose(grid[:3, :3] @ [1, 0, 0], [-1, 0, 0])
    np.testing.assert_allclose(grid[:3, :3] @ [0, 0, 1], [0, 0, 2])


def test_window():
    out = window(np.array([-2000, -1000, 0, 400, 3000], np.int16), (-1000, 400))
    np.testing.assert_allclose(out, [0, 0, 1000 / 1400, 1, 1], rtol=1e-6)
    assert out.dtype == np.float32
    with pytest.raises(ValueError):
        window(np.zeros(3), (10, 10))


@pytest.mark.parametrize("matrix", [OBLIQUE, LPS_AXIAL, RAS_INFERIOR])
def test_slice_positions_and_inverse(matrix):
    volume = Volume(np.zeros(SHAPE_KJI, np.int16), matrix)
    k = np.arange(volume.n_slices)
    positions = slice_index_to_position_mm(volume, k)
    np.testing.assert_allclose(positions, volume.slice_positions_mm(), atol=1e-9)
    np.testing.assert_allclose(ras_z_to_slice(volume, positions), k, atol=1e-9)
    assert isinstance(ras_z_to_slice(volume, float(positions[3])), float)
    assert (np.diff(positions) > 0).all() == volume.slices_toward_superior


@pytest.mark.parametrize("matrix", [OBLIQUE, RAS_INFERIOR])
def test_slice_to_model_depth_and_back(matrix):
    volume = Volume(np.zeros(SHAPE_KJI, np.int16), matrix)
    grid = model_grid(volume, (1.5, 1.0, 1.0), (40, 16, 16))
    k = np.array([0.0, 3.0, 8.5, 17.0])
    d = slice_to_model_depth(volume, grid, k)
    np.testing.assert_allclose(grid[2, 2] * d + grid[2, 3], slice_index_to_position_mm(volume, k), atol=1e-9)
    np.testing.assert_allclose(model_depth_to_slice(volume, grid, d), k, atol=1e-9)
    # the centre slice of the volume sits at the centre depth of the model grid
    centre_k = (volume.n_slices - 1) / 2
    assert slice_to_model_depth(volume, grid, centre_k) == pytest.approx((40 - 1) / 2, abs=1e-9)
