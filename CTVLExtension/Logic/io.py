"""Read CT volumes (NIfTI, NRRD, MetaImage, DICOM series) into a `Volume`, validate them, write volumes back.

Everything goes through SimpleITK; geometry is converted from ITK's LPS to RAS by `ctvl.geometry`. Every
problem with the input becomes a one-line `CTVLInputError` naming the file, the problem and the fix.
"""

from __future__ import annotations

import logging
import os
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from ctvl.atomic import atomic_path
from ctvl.errors import CTVLInputError
from ctvl.geometry import Volume, volume_from_sitk, volume_to_sitk

log = logging.getLogger(__name__)

WRITABLE = (".nii", ".nii.gz", ".nrrd", ".mha")
FORMATS_HINT = "Use NIfTI (.nii/.nii.gz), NRRD (.nrrd/.nhdr), MetaImage (.mha/.mhd) or a DICOM series folder"
MIN_SLICES = 16
WARN_VOXELS = 512 * 512 * 1500
MAX_VOXELS = 1024 * 1024 * 2048
SPACING_RANGE_MM = (0.05, 20.0)


@dataclass
class DicomSeries:
    """A DICOM series read as a volume; ``instance_numbers[k]`` is the InstanceNumber of slice ``k``."""

    volume: Volume
    instance_numbers: list[int]
    series_number: int | None
    series_uid: str
    modality: str | None = None


def file_suffix(path: str | Path) -> str:
    """Lower-case suffix, with ``.nii.gz`` kept whole."""
    name = Path(path).name.lower()
    return ".nii.gz" if name.endswith(".nii.gz") else Path(name).suffix


def read_volume(path: str | Path, validate: bool = True) -> Volume:
    """Read a 3D scalar volume (file or DICOM series folder). ``validate`` adds the CT checks of `validate_ct`."""
    path = Path(path).expanduser()
    if path.is_dir():
        return read_dicom_series(path, validate=validate).volume
    if not path.is_file():
        raise CTVLInputError(path, "file not found", f"Check the path. {FORMATS_HINT}")
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        reader.ReadImageInformation()
    except RuntimeError as err:
        raise _read_error(path, err) from None
    if reader.HasMetaDataKey("0020|000e"):  # one DICOM file: read the series it belongs to
        uid = reader.GetMetaData("0020|000e").strip()
        return read_dicom_series(path.parent, series_uid=uid, validate=validate).volume
    _check_header(path, reader.GetSize(), reader.GetNumberOfComponents(), reader.GetPixelID())
    if file_suffix(path) in (".nii", ".nii.gz"):
        _check_nifti_complete(path, reader)
    try:
        image = reader.Execute()
    except RuntimeError as err:
        raise _read_error(path, err) from None
    volume = _to_volume(path, image)
    if validate:
        validate_ct(volume, path)
    return volume


def read_dicom_series(folder: str | Path, series_uid: str | None = None, validate: bool = True) -> DicomSeries:
    """Read one DICOM series from ``folder`` (the largest one, unless ``series_uid`` names another)."""
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise CTVLInputError(folder, "DICOM folder not found", "Check the path")
    uids = list(sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(folder)))
    if not uids:
        raise CTVLInputError(folder, "no DICOM series found in this folder",
                             f"Point to the folder that holds the series' files. {FORMATS_HINT}")
    files = {uid: sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder), uid) for uid in uids}
    if series_uid is None:
        series_uid = max(uids, key=lambda uid: len(files[uid]))
        if len(uids) > 1:
            counts = ", ".join(f"{uid} ({len(files[uid])} files)" for uid in uids)
            log.info("%s holds %d DICOM series: %s; using the largest, %s", folder, len(uids), counts, series_uid)
    elif series_uid not in files:
        raise CTVLInputError(folder, f"no DICOM series with SeriesInstanceUID {series_uid}", "Check the folder")
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(files[series_uid])
    reader.MetaDataDictionaryArrayUpdateOn()
    try:
        image = reader.Execute()
    except RuntimeError as err:
        raise _read_error(folder, err) from None
    _check_header(folder, image.GetSize(), image.GetNumberOfComponentsPerPixel(), image.GetPixelID())
    volume = _to_volume(folder, image)

    def tag(index: int, key: str) -> str | None:
        return reader.GetMetaData(index, key).strip() if reader.HasMetaDataKey(index, key) else None

    n_files = len(files[series_uid])
    if n_files == volume.array.shape[0]:
        instance_numbers = [_int_or(tag(k, "0020|0013"), k + 1) for k in range(n_files)]
        _warn_irregular_slices(folder, [tag(k, "0020|0032") for k in range(n_files)], volume)
    else:  # a multi-frame file: frames are numbered 1..n
        instance_numbers = list(range(1, volume.array.shape[0] + 1))
    modality = tag(0, "0008|0060")
    series = DicomSeries(volume, instance_numbers, _int_or(tag(0, "0020|0011"), None), series_uid, modality)
    if validate:
        if modality and modality.upper() not in ("CT", "OT"):
            raise CTVLInputError(folder, f"is a {modality} series (DICOM Modality), not CT", "Load a CT series")
        validate_ct(volume, folder)
    return series


def validate_ct(volume: Volume, source: str | Path | None) -> None:
    """Raise `CTVLInputError` unless ``volume`` looks like a 3D CT in Hounsfield units.

    Checks: 3D, size limits, at least `MIN_SLICES` along every axis, plausible spacing, finite and non-constant
    values, not an 8-bit image, air present (1st percentile <= -500 HU) and no more than 1% above 4000 HU.
    """
    array = volume.array
    if array.ndim != 3:
        raise CTVLInputError(source, f"is {array.ndim}D, not a 3D volume", "Load a 3D CT volume")
    _check_size(source, volume.shape_ijk)
    if min(array.shape) < MIN_SLICES:
        raise CTVLInputError(source, f"has only {min(array.shape)} slices (size {_size_text(volume.shape_ijk)}, "
                             f"need at least {MIN_SLICES})", "Load the full CT series, not a few slices")
    spacing = volume.spacing
    if not (np.all(np.isfinite(spacing)) and np.all(spacing >= SPACING_RANGE_MM[0])
            and np.all(spacing <= SPACING_RANGE_MM[1])):
        raise CTVLInputError(source, f"has implausible voxel spacing {_size_text(spacing, '.3g')} mm",
                             "Check the pixel spacing / slice thickness in the file header")
    lo, hi = float(array.min()), float(array.max())
    if not (np.isfinite(lo) and np.isfinite(hi)):
        raise CTVLInputError(source, "contains NaN or infinite values", "Re-export the CT without invalid voxels")
    if lo == hi:
        raise CTVLInputError(source, f"is empty: every voxel is {lo:g}", "Check the export; it holds no image data")
    if array.dtype == np.uint8 or (np.issubdtype(array.dtype, np.integer) and lo >= 0 and hi <= 255):
        raise CTVLInputError(source, f"looks like an 8-bit image (values {lo:g}..{hi:g}), not CT in Hounsfield units",
                             "Load the original CT (DICOM/NIfTI in HU), not a screenshot or 8-bit export")
    p1, p99 = (float(v) for v in np.percentile(_sample(array), [1.0, 99.0]))
    if p1 > -500.0:
        raise CTVLInputError(source, f"values do not look like CT Hounsfield units (range {lo:g}..{hi:g}, no air near "
                             "-1000 HU: MR, PET or unscaled data?)",
                             "Load a CT in HU; if values are stored as HU+1024, apply the rescale intercept -1024")
    if p99 > 4000.0:
        raise CTVLInputError(source, f"values do not look like CT Hounsfield units (1% of voxels above {p99:g} HU)",
                             "Load a CT in HU (check the rescale slope/intercept)")


def write_volume(volume: Volume, path: str | Path, dtype: np.dtype | type | None = None,
                 compress: bool = True) -> Path:
    """Write ``volume`` (cast to ``dtype`` if given) with its exact geometry, atomically. Returns the path."""
    path = Path(path)
    suffix = file_suffix(path)
    if suffix not in WRITABLE:
        raise CTVLInputError(path, f"cannot write '{suffix}' files", "Use .nii.gz, .nii, .nrrd or .mha")
    image = volume_to_sitk(volume, dtype)
    try:
        with atomic_path(path, suffix) as tmp:
            sitk.WriteImage(image, str(tmp), compress and suffix in (".nrrd", ".mha"))
    except (OSError, RuntimeError) as err:
        raise CTVLInputError(path, f"could not be written ({_itk_reason(err)})",
                             "Check that the folder is writable and has free space") from None
    return path


# --- helpers --------------------------------------------------------------------------------------------------------


def _to_volume(source: Path, image: sitk.Image) -> Volume:
    if image.GetDimension() == 4 and image.GetSize()[3] == 1:
        image = image[:, :, :, 0]
    if image.GetDimension() != 3:
        _check_header(source, image.GetSize(), image.GetNumberOfComponentsPerPixel(), image.GetPixelID())
    volume = volume_from_sitk(image)
    if not np.all(np.isfinite(volume.ijk_to_ras)) or abs(np.linalg.det(volume.ijk_to_ras[:3, :3])) < 1e-12:
        raise CTVLInputError(source, "has an invalid (singular) voxel-to-world matrix", "Fix the header's geometry")
    return volume


def _check_header(source: Path, size: tuple[int, ...], components: int, pixel_id: int) -> None:
    size_text = _size_text(size)
    if len(size) < 3 or (len(size) == 3 and size[2] == 1):
        raise CTVLInputError(source, f"is a 2D image (size {size_text}), not a 3D CT volume",
                             "Load the whole CT series or volume, not a single slice or picture")
    if len(size) > 3 and any(n > 1 for n in size[3:]):
        raise CTVLInputError(source, f"is {len(size)}D (size {size_text}): a time series or multi-volume file",
                             "Extract one 3D CT volume first")
    if components > 1:
        raise CTVLInputError(source, f"has {components}-component (RGB or vector) pixels, not scalar HU values",
                             "Load the original grayscale CT, not a colour rendering or vector field")
    if "complex" in sitk.GetPixelIDValueAsString(pixel_id).lower():
        raise CTVLInputError(source, "has complex-valued pixels", "Load a real-valued CT volume")
    _check_size(source, size[:3])


def _check_size(source: str | Path | None, size: tuple[int, ...]) -> None:
    voxels = int(np.prod(size, dtype=np.int64))
    if voxels > MAX_VOXELS:
        raise CTVLInputError(source, f"is too large ({_size_text(size)} = {voxels:,} voxels, limit {MAX_VOXELS:,})",
                             "Crop or downsample the volume first")
    if voxels > WARN_VOXELS:
        log.warning("%s is very large (%s voxels): expect high memory use", source, _size_text(size))


def _warn_irregular_slices(folder: Path, positions: list[str | None], volume: Volume) -> None:
    """Log a warning when slice positions (ImagePositionPatient) are not evenly spaced: missing slices?"""
    try:
        points = np.array([[float(v) for v in p.split("\\")] for p in positions if p], dtype=np.float64)
    except ValueError:
        return
    if len(points) != len(positions) or len(points) < 3:
        return
    steps = np.diff(points @ (volume.direction[:, 2] * [-1.0, -1.0, 1.0]))  # along the slice normal, in LPS
    if np.ptp(steps) > 0.1 * max(abs(float(np.median(steps))), 1e-6):
        log.warning("%s: uneven slice spacing (%.3g..%.3g mm): missing slices? Positions are approximate",
                    folder, steps.min(), steps.max())


def _check_nifti_complete(path: Path, reader: sitk.ImageFileReader) -> None:
    """ITK reads truncated NIfTI silently (zero- or garbage-filled): check the data size ourselves."""
    try:
        ndim = int(reader.GetMetaData("dim[0]"))
        dims = [int(reader.GetMetaData(f"dim[{i}]")) for i in range(1, ndim + 1)]
        expected = int(float(reader.GetMetaData("vox_offset"))) + int(np.prod(dims)) * int(
            reader.GetMetaData("bitpix")) // 8
    except (RuntimeError, ValueError):
        return
    if file_suffix(path) == ".nii":
        found = path.stat().st_size
    else:
        with open(path, "rb") as handle:  # gzip trailer: uncompressed size mod 2**32 (fast path)
            handle.seek(-4, os.SEEK_END)
            if int.from_bytes(handle.read(4), "little") == expected % 2**32:
                return
        found = _gunzip_size(path)
    if found < expected:
        raise CTVLInputError(path, f"is truncated or corrupt (about {found:,} of {expected:,} bytes)",
                             "Re-export or re-download the file")


def _gunzip_size(path: Path) -> int:
    """Uncompressed size, counted up to where the stream breaks (about 0.3 s per 100 MB)."""
    size = 0
    inflater = zlib.decompressobj(16 + zlib.MAX_WBITS)
    try:
        with open(path, "rb") as handle:
            while chunk := handle.read(1 << 20):
                while chunk:
                    size += len(inflater.decompress(chunk))
                    chunk = inflater.unused_data
                    if chunk or inflater.eof:  # next gzip member (concatenated .gz)
                        inflater = zlib.decompressobj(16 + zlib.MAX_WBITS)
    except zlib.error:
        pass
    return size


def _read_error(source: Path, err: RuntimeError) -> CTVLInputError:
    log.debug("SimpleITK could not read %s: %s", source, err)
    if "Unable to determine ImageIO reader" in str(err):
        return CTVLInputError(source, "is not a readable image file (unknown format or corrupt)", FORMATS_HINT)
    reason = _itk_reason(err)
    detail = "" if reason.startswith("Reason:") else f" ({reason})"  # MetaImage's "Reason: ..." misleads
    return CTVLInputError(source, f"could not be read: truncated or corrupt{detail}",
                          "Re-export or re-download the file")


def _itk_reason(err: Exception) -> str:
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    reason = lines[-1] if lines else type(err).__name__
    reason = reason.split("ERROR:", 1)[-1].strip()
    return reason[:160].rstrip(".")


def _sample(array: np.ndarray, target: int = 2_000_000) -> np.ndarray:
    step = max(1, int(round((array.size / target) ** (1.0 / 3.0))))
    return array[::step, ::step, ::step]


def _size_text(values, fmt: str = "d") -> str:
    return "x".join(format(int(v) if fmt == "d" else float(v), fmt) for v in values)


def _int_or(text: str | None, default: int | None) -> int | None:
    try:
        return int(float(text)) if text else default
    except ValueError:
        return default


