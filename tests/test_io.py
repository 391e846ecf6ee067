"""ctvl.io: read/write round trips per format, LPS/RAS files, DICOM series, and every bad input -> CTVLInputError."""

from __future__ import annotations

import gzip
import logging
import os

import numpy as np
import pytest
import SimpleITK as sitk
from ctvl import io
from ctvl.errors import CTVLInputError
from ctvl.geometry import Volume, volume_to_sitk

SHAPE_KJI = (18, 20, 24)  # odd-ish, all different: catches axis swaps


def oblique_matrix(spacing=(0.7, 0.8, 2.5), origin=(-100.3, 50.2, -300.7)) -> np.ndarray:
    a, b = 0.2, -0.3
    rx = np.array([[1, 0, 0], [0, np.cos(a), -np.sin(a)], [0, np.sin(a), np.cos(a)]])
    rz = np.array([[np.cos(b), -np.sin(b), 0], [np.sin(b), np.cos(b), 0], [0, 0, 1]])
    matrix = np.eye(4)
    matrix[:3, :3] = rz @ rx @ np.diag([-1.0, -1.0, 1.0]) @ np.diag(spacing)
    matrix[:3, 3] = origin
    return matrix


def ct_array(shape=SHAPE_KJI, seed=0) -> np.ndarray:
    """Air outside, soft tissue body, a bone blob: passes the CT checks."""
    rng = np.random.default_rng(seed)
    array = np.full(shape, -1000, np.int16)
    k, j, i = shape
    array[:, j // 4 : 3 * j // 4, i // 4 : 3 * i // 4] = 40
    array[k // 3, j // 2, i // 2] = 900
    return array + rng.integers(-20, 20, shape).astype(np.int16)


def ct_volume(matrix=None) -> Volume:
    return Volume(ct_array(), oblique_matrix() if matrix is None else matrix)


def assert_input_error(path, *words, validate=True):
    with pytest.raises(CTVLInputError) as info:
        io.read_volume(path, validate=validate)
    message = str(info.value)
    assert "\n" not in message and str(path) in message and info.value.hint, message
    for word in words:
        assert word.lower() in message.lower(), message
    return message


# --- round trips ----------------------------------------------------------------------------------------------------

# NIfTI stores its matrices as float32: exact to float32 precision; the others store doubles.
TOLERANCE = {".nii.gz": 1e-4, ".nii": 1e-4, ".nrrd": 1e-9, ".mha": 1e-9}


@pytest.mark.parametrize("suffix", [".nii.gz", ".nii", ".nrrd", ".mha"])
@pytest.mark.parametrize("dtype", [np.int16, np.float32])
def test_round_trip_oblique_anisotropic(tmp_path, suffix, dtype):
    volume = Volume(ct_array().astype(dtype) + (0.25 if dtype == np.float32 else 0), oblique_matrix())
    path = io.write_volume(volume, tmp_path / f"ct{suffix}")
    back = io.read_volume(path)
    assert back.array.dtype == dtype
    np.testing.assert_array_equal(back.array, volume.array)
    np.testing.assert_allclose(back.ijk_to_ras, volume.ijk_to_ras, rtol=0, atol=TOLERANCE[suffix])
    assert os.listdir(tmp_path) == [f"ct{suffix}"]  # no temp file left behind


@pytest.mark.parametrize("matrix", [oblique_matrix(), np.diag([0.6, 0.9, -3.0, 1.0])])
def test_nibabel_reads_our_affine(tmp_path, matrix):
    nib = pytest.importorskip("nibabel")
    volume = ct_volume(matrix)
    path = io.write_volume(volume, tmp_path / "ct.nii.gz")
    image = nib.load(str(path))
    np.testing.assert_allclose(image.affine, volume.ijk_to_ras, atol=1e-4)
    np.testing.assert_array_equal(np.asarray(image.dataobj).transpose(2, 1, 0), volume.array)


@pytest.mark.parametrize("codes", ["RAS", "LPS", "LAI"])
def test_reads_nibabel_written_nifti_in_any_orientation(tmp_path, codes):
    nib = pytest.importorskip("nibabel")
    flips = {"R": 1, "L": -1, "A": 1, "P": -1, "S": 1, "I": -1}
    affine = np.diag([flips[c] * s for c, s in zip(codes, (0.75, 0.85, 2.0))] + [1.0])
    affine[:3, 3] = (-90.0, 120.5, -40.25)
    data = ct_array().transpose(2, 1, 0)  # nibabel is [i, j, k]
    nib.save(nib.Nifti1Image(data, affine), str(tmp_path / "x.nii.gz"))
    volume = io.read_volume(tmp_path / "x.nii.gz")
    np.testing.assert_allclose(volume.ijk_to_ras, affine, atol=1e-5)
    np.testing.assert_array_equal(volume.array, ct_array())


def write_nrrd(path, space: str, directions: np.ndarray, origin, array: np.ndarray) -> None:
    """A hand-written NRRD (so the file's own space, LPS or RAS, is what we test)."""
    k, j, i = array.shape
    vectors = " ".join("(" + ",".join(f"{v:.17g}" for v in col) + ")" for col in directions.T)
    header = (f"NRRD0004\ntype: short\ndimension: 3\nspace: {space}\nsizes: {i} {j} {k}\n"
              f"space directions: {vectors}\nkinds: domain domain domain\nendian: little\nencoding: raw\n"
              f"space origin: ({','.join(f'{v:.17g}' for v in origin)})\n\n")
    path.write_bytes(header.encode() + array.astype("<i2").tobytes())


@pytest.mark.parametrize("space", ["left-posterior-superior", "right-anterior-superior"])
def test_nrrd_lps_and_ras_spaces(tmp_path, space):
    expected = oblique_matrix()
    flip = np.diag([-1.0, -1.0, 1.0]) if space.startswith("left") else np.eye(3)
    write_nrrd(tmp_path / "x.nrrd", space, flip @ expected[:3, :3], flip @ expected[:3, 3], ct_array())
    volume = io.read_volume(tmp_path / "x.nrrd")
    np.testing.assert_allclose(volume.ijk_to_ras, expected, atol=1e-9)
    np.testing.assert_array_equal(volume.array, ct_array())


def test_write_heatmap_and_labels_with_dtype(tmp_path):
    volume = ct_volume()
    heat = volume.with_array(np.linspace(0, 1, volume.array.size).reshape(volume.array.shape))
    labels = volume.with_array(volume.array > 500)
    io.write_volume(heat, tmp_path / "heat.nii.gz", dtype=np.float32)
    io.write_volume(labels, tmp_path / "labels.nrrd")
    heat_back = io.read_volume(tmp_path / "heat.nii.gz", validate=False)
    labels_back = io.read_volume(tmp_path / "labels.nrrd", validate=False)
    assert heat_back.array.dtype == np.float32 and labels_back.array.dtype == np.uint8
    np.testing.assert_array_equal(heat_back.array, heat.array.astype(np.float32))
    np.testing.assert_array_equal(labels_back.array, labels.array)
    np.testing.assert_allclose(labels_back.ijk_to_ras, volume.ijk_to_ras, atol=1e-9)


def test_nifti_rescale_slope_intercept_is_applied(tmp_path):
    nib = pytest.importorskip("nibabel")
    stored = (ct_array().astype(np.int32) + 1024).astype(np.uint16).transpose(2, 1, 0)
    image = nib.Nifti1Image(stored, np.diag([0.7, 0.7, 2.0, 1.0]))
    image.header.set_slope_inter(1.0, -1024.0)
    nib.save(image, str(tmp_path / "scaled.nii.gz"))
    np.testing.assert_array_equal(io.read_volume(tmp_path / "scaled.nii.gz").array, ct_array())


def test_write_replaces_atomically_and_rejects_unknown_format(tmp_path):
    path = tmp_path / "sub" / "ct.nii.gz"
    io.write_volume(ct_volume(), path)
    io.write_volume(ct_volume().with_array(ct_array(seed=1)), path)
    np.testing.assert_array_equal(io.read_volume(path).array, ct_array(seed=1))
    assert os.listdir(path.parent) == ["ct.nii.gz"]
    with pytest.raises(CTVLInputError, match="cannot write"):
        io.write_volume(ct_volume(), tmp_path / "ct.png")
    (tmp_path / "file").write_text("")
    with pytest.raises(CTVLInputError, match="could not be written"):
        io.write_volume(ct_volume(), tmp_path / "file" / "ct.nii.gz")


# --- DICOM ----------------------------------------------------------------------------------------------------------


def write_dicom_series(folder, n_slices=18, series_number=3, modality="CT", z0=-150.0, dz=2.5, seed=0, skip=()):
    """Axial series, stored unsigned with RescaleIntercept -1024; InstanceNumber 1 = most superior slice.

    Returns (HU array in increasing-z order [k, j, i], instance numbers in that order).
    """
    pytest.importorskip("pydicom")
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

    folder.mkdir(parents=True, exist_ok=True)
    hu = ct_array((n_slices, 20, 24), seed=seed)
    series_uid, study_uid = generate_uid(), generate_uid()
    instances = []
    for k in range(n_slices):
        if k in skip:
            continue
        ds = Dataset()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.MediaStorageSOPClassUID = CTImageStorage
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.SOPClassUID = CTImageStorage
        ds.Modality, ds.PatientID, ds.StudyInstanceUID, ds.SeriesInstanceUID = modality, "P1", study_uid, series_uid
        ds.SeriesNumber, ds.InstanceNumber = series_number, n_slices - k  # superior first
        ds.ImagePositionPatient = [-12.5, -30.0, z0 + dz * k]  # LPS
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.PixelSpacing, ds.SliceThickness = [0.9, 0.8], dz  # row spacing (y), column spacing (x)
        ds.Rows, ds.Columns, ds.SamplesPerPixel, ds.PhotometricInterpretation = 20, 24, 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
        ds.RescaleIntercept, ds.RescaleSlope = -1024, 1
        ds.PixelData = (hu[k].astype(np.int32) + 1024).astype("<u2").tobytes()
        ds.save_as(folder / f"{(k * 7) % n_slices:03d}_{series_number}.dcm", enforce_file_format=True)
        instances.append(n_slices - k)
    return hu, instances


def test_dicom_series_geometry_rescale_and_instance_numbers(tmp_path, caplog):
    hu, instances = write_dicom_series(tmp_path / "dcm")
    write_dicom_series(tmp_path / "dcm", n_slices=16, series_number=9, seed=1)  # a smaller second series
    with caplog.at_level(logging.INFO, logger="ctvl.io"):
        series = io.read_dicom_series(tmp_path / "dcm")
    assert "2 DICOM series" in caplog.text and "largest" in caplog.text
    assert series.series_number == 3 and series.modality == "CT"
    np.testing.assert_array_equal(series.volume.array, hu)
    assert series.instance_numbers == instances
    expected = np.eye(4)
    expected[:3, :3] = np.diag([-0.8, -0.9, 2.5])
    expected[:3, 3] = (12.5, 30.0, -150.0)
    np.testing.assert_allclose(series.volume.ijk_to_ras, expected, atol=1e-6)
    # the folder and any one of its files read the same volume through read_volume
    np.testing.assert_array_equal(io.read_volume(tmp_path / "dcm").array, hu)
    np.testing.assert_array_equal(io.read_volume(tmp_path / "dcm" / "000_3.dcm").array, hu)
    small = io.read_volume(tmp_path / "dcm" / "000_9.dcm")
    assert small.array.shape == (16, 20, 24)


def test_dicom_missing_slice_is_logged(tmp_path, caplog):
    write_dicom_series(tmp_path / "gap", n_slices=20, skip=(10,))
    with caplog.at_level(logging.WARNING, logger="ctvl.io"):
        series = io.read_dicom_series(tmp_path / "gap")
    assert "uneven slice spacing" in caplog.text
    assert series.instance_numbers == [n for n in range(20, 0, -1) if n != 10]


def test_dicom_bad_inputs(tmp_path):
    write_dicom_series(tmp_path / "mr", modality="MR")
    with pytest.raises(CTVLInputError, match="MR series"):
        io.read_dicom_series(tmp_path / "mr")
    assert io.read_dicom_series(tmp_path / "mr", validate=False).modality == "MR"
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("not dicom")
    assert_input_error(tmp_path / "empty", "no DICOM series")
    write_dicom_series(tmp_path / "few", n_slices=5)
    assert_input_error(tmp_path / "few", "only 5 slices")


# --- bad input ------------------------------------------------------------------------------------------------------


def test_missing_file(tmp_path):
    assert_input_error(tmp_path / "nope.nii.gz", "not found")


@pytest.mark.parametrize("name", ["garbage.nii.gz", "garbage.nii", "garbage.nrrd", "garbage.mha", "garbage.bin"])
def test_garbage_bytes(tmp_path, name):
    path = tmp_path / name
    path.write_bytes(np.random.default_rng(0).bytes(4000))
    assert_input_error(path, "not a readable image")


@pytest.mark.parametrize("suffix", [".nii.gz", ".nii", ".nrrd", ".mha"])
def test_truncated_file(tmp_path, suffix):
    path = io.write_volume(ct_volume(), tmp_path / f"ct{suffix}")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) * 2 // 3])
    assert_input_error(path, "truncated or corrupt")


def test_nifti_gz_with_wrong_trailer_but_complete_data_still_reads(tmp_path):
    path = tmp_path / "ct.nii.gz"
    io.write_volume(ct_volume(), tmp_path / "ct.nii")
    path.write_bytes(gzip.compress((tmp_path / "ct.nii").read_bytes() + b"\0" * 8))  # trailing slack
    np.testing.assert_array_equal(io.read_volume(path).array, ct_array())


def test_2d_images(tmp_path):
    sitk.WriteImage(sitk.GetImageFromArray(ct_array()[0]), str(tmp_path / "slice.nii.gz"))
    assert_input_error(tmp_path / "slice.nii.gz", "2D image")
    rgb = sitk.GetImageFromArray(np.zeros((20, 24, 3), np.uint8), isVector=True)
    sitk.WriteImage(rgb, str(tmp_path / "shot.png"))
    assert_input_error(tmp_path / "shot.png", "2D image")


def test_4d_and_vector_images(tmp_path):
    frame = sitk.GetImageFromArray(ct_array())
    sitk.WriteImage(sitk.JoinSeries([frame, frame]), str(tmp_path / "t.nii.gz"))
    assert_input_error(tmp_path / "t.nii.gz", "4D", validate=False)
    sitk.WriteImage(sitk.JoinSeries([frame]), str(tmp_path / "t1.nii.gz"))  # 4D with one frame is fine
    assert io.read_volume(tmp_path / "t1.nii.gz").array.shape == SHAPE_KJI
    rgb = sitk.GetImageFromArray(np.zeros(SHAPE_KJI + (3,), np.uint8), isVector=True)
    sitk.WriteImage(rgb, str(tmp_path / "rgb.nrrd"))
    assert_input_error(tmp_path / "rgb.nrrd", "RGB or vector", validate=False)


def write(tmp_path, name, array, matrix=None):
    return io.write_volume(Volume(array, oblique_matrix() if matrix is None else matrix), tmp_path / name)


def test_too_few_slices(tmp_path):
    path = write(tmp_path, "thin.nii.gz", ct_array((8, 20, 24)))
    assert_input_error(path, "only 8 slices", "at least 16")
    assert io.read_volume(path, validate=False).array.shape == (8, 20, 24)


def test_mr_like_values(tmp_path):
    mr = np.random.default_rng(0).integers(0, 1200, SHAPE_KJI).astype(np.int16)
    assert_input_error(write(tmp_path, "mr.nii.gz", mr), "Hounsfield", "no air")
    scaled = ct_array().astype(np.float32) * 20  # e.g. a wrong rescale slope
    scaled[:, :10] = 8000
    assert_input_error(write(tmp_path, "x20.nrrd", scaled), "Hounsfield", "above")
    with pytest.raises(CTVLInputError, match="2D"):
        io.validate_ct(Volume(np.zeros((20, 20)), np.eye(4)), "mem")


def test_normalised_float_image(tmp_path):
    unit = (ct_array().astype(np.float32) + 1000) / 2000
    assert_input_error(write(tmp_path, "unit.nrrd", unit), "Hounsfield")


def test_8bit_image(tmp_path):
    png_like = np.random.default_rng(0).integers(0, 256, SHAPE_KJI).astype(np.uint8)
    assert_input_error(write(tmp_path, "u8.nii.gz", png_like), "8-bit")
    mask = io.read_volume(tmp_path / "u8.nii.gz", validate=False)  # masks / heatmaps skip the CT checks
    assert mask.array.dtype == np.uint8


def test_constant_and_nan(tmp_path):
    assert_input_error(write(tmp_path, "zero.nii.gz", np.zeros(SHAPE_KJI, np.int16)), "empty")
    bad = ct_array().astype(np.float32)
    bad[3, 4, 5] = np.nan
    assert_input_error(write(tmp_path, "nan.nrrd", bad), "NaN")


def test_implausible_spacing(tmp_path):
    path = write(tmp_path, "wide.nii.gz", ct_array(), np.diag([0.7, 0.7, 50.0, 1.0]))
    assert_input_error(path, "spacing")


def test_absurd_size_is_refused_before_loading(tmp_path):
    (tmp_path / "huge.raw").write_bytes(b"\0" * 64)
    (tmp_path / "huge.nhdr").write_text("NRRD0004\ntype: short\ndimension: 3\nsizes: 4000 4000 4000\n"
                                        "encoding: raw\nendian: little\ndata file: huge.raw\n")
    assert_input_error(tmp_path / "huge.nhdr", "too large", validate=False)


def test_validate_ct_accepts_ct_and_warns_on_large(monkeypatch, caplog):
    volume = ct_volume()
    io.validate_ct(volume, "mem")
    monkeypatch.setattr(io, "WARN_VOXELS", 100)
    with caplog.at_level(logging.WARNING, logger="ctvl.io"):
        io.validate_ct(volume, "mem")
    assert "very large" in caplog.text
    monkeypatch.setattr(io, "MAX_VOXELS", 1000)
    with pytest.raises(CTVLInputError, match="too large"):
        io.validate_ct(volume, "mem")


def test_volume_to_sitk_geometry_survives_file(tmp_path):
    """The file's physical points match ours (LPS in the file, RAS in ctvl)."""
    volume = ct_volume()
    path = io.write_volume(volume, tmp_path / "ct.nrrd")
    image = sitk.ReadImage(str(path))
    lps = np.array(image.TransformIndexToPhysicalPoint((3, 5, 7)))
    np.testing.assert_allclose(lps * [-1, -1, 1], volume.ijk_to_ras_points([3, 5, 7])[0], atol=1e-9)
    assert volume_to_sitk(volume).GetDirection() == pytest.approx(image.GetDirection(), abs=1e-12)


def test_atomic_writes_get_normal_file_modes(tmp_path):
    import os
    import stat

    from ctvl.atomic import NEW_FILE_MODE, atomic_write_bytes

    new = atomic_write_bytes(tmp_path / "new.bin", b"x")
    assert stat.S_IMODE(new.stat().st_mode) == NEW_FILE_MODE  # like open(), not mkstemp's 0o600
    os.chmod(new, 0o640)
    atomic_write_bytes(new, b"y")
    assert stat.S_IMODE(new.stat().st_mode) == 0o640 and new.read_bytes() == b"y"  # a replaced file keeps its mode
