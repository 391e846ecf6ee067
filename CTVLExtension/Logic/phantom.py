"""Synthetic chest CT + CT-RATE-style report generator with voxel ground truth (tests, demo data, benchmarks).

``generate_case(seed, index)`` is a pure function of ``(seed, index)``: workers give identical output.

Conventions
-----------
- Volume: HU, axial, default 256 x 256 x N (N 96-160, in-plane 1.2-1.6 mm, slices 2-3 mm, z extent 250-380 mm).
  Geometry is CT-RATE's: DICOM LPS axes with ImageOrientationPatient [1,0,0,0,1,0], i.e. column index i runs toward
  the patient's Left, row index j toward Posterior; the slice index k runs toward Superior (first slice = most
  inferior, origin = centre of that slice's first pixel). ``slices_toward_superior=False`` writes the reverse
  stack (used by tests to exercise orientation handling).
- Image numbers in reports: **image 1 = the most superior slice**; image ``n`` is the n-th slice counted from the
  top of the scan. For a volume with N slices: k = N - n when slices run toward superior, k = n - 1 otherwise
  (`image_to_slice`). Reports cite images with varied formats ("(series 3, image 45)", "(se 3 im 45)",
  "image 45 of series 3", "(3:45)", "Se 4 Im 112", "ser 2 img 64", "image #155", "images 20 through 60",
  "(3/102)"); every reference lies inside its finding's slice range.
- Storage (what CT-RATE does, see below): NIfTI-1 .nii.gz, int16 *stored values* SV with header
  ``scl_slope = RescaleSlope = 1`` and ``scl_inter = RescaleIntercept = -1024`` (HU = SV * slope + intercept), so a
  header-aware reader (SimpleITK, nibabel ``get_fdata``, ``ctvl.io``) returns HU, and the metadata CSV carries the
  same slope/intercept. Masks: uint8 NIfTI, same geometry, value = ``mask_value`` of a finding.

What CT-RATE does (found in the public CT-CLIP code and the CT-RATE dataset discussions):
- ``metadata/<split>_metadata.csv`` columns: VolumeName, Manufacturer, SeriesDescription, ManufacturerModelName,
  PatientSex, PatientAge, ReconstructionDiameter, DistanceSourceToDetector, DistanceSourceToPatient,
  GantryDetectorTilt, TableHeight, RotationDirection, ExposureTime, XRayTubeCurrent, Exposure, FilterType,
  GeneratorPower, FocalSpots, ConvolutionKernel, PatientPosition, RevolutionTime, SingleCollimationWidth,
  TotalCollimationWidth, TableSpeed, TableFeedPerRotation, SpiralPitchFactor, DataCollectionCenterPatient,
  ReconstructionTargetCenterPatient, ExposureModulationType, CTDIvol, ImagePositionPatient,
  ImageOrientationPatient, SliceLocation, SamplesPerPixel, PhotometricInterpretation, Rows, Columns, XYSpacing,
  RescaleIntercept, RescaleSlope, RescaleType, NumberofSlices, ZSpacing, StudyDate. XYSpacing is a string
  "[x, y]" (CT-CLIP parses it with ``s[1:][:-2].split(",")[0]``).
- CT-CLIP's loaders compute ``HU = RescaleSlope * data + RescaleIntercept`` from the metadata row. The first CT-RATE
  release had blank NIfTI headers (unit spacing, identity direction, no scl); the fixed release (HF PR #59,
  ``fix_metadata.py``) writes spacing/origin/direction, scl_slope/scl_inter and int16 into the header. We mimic the
  fixed release: a loader must take HU from the header *or* from the metadata, never both.
- Layout: ``<split>/<split>_<patient>/<split>_<patient>_<scan>/<split>_<patient>_<scan>_<recon>.nii.gz``,
  ``radiology_text_reports/<split>_reports.csv`` (VolumeName, ClinicalInformation_EN, Technique_EN, Findings_EN,
  Impressions_EN), ``multi_abnormality_labels/<split>_predicted_labels.csv`` (VolumeName + 18 labels).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from ctvl.geometry import Volume
from ctvl.phantom_anatomy import Grid, build_anatomy, sample_patient, smooth121
from ctvl.phantom_findings import apply_findings, sample_labels
from ctvl.phantom_report import make_report
from ctvl.prompts import LABELS

DEFAULT_SHAPE = (256, 256)  # (rows, columns); slices follow patient size
RESCALE_SLOPE = 1.0
RESCALE_INTERCEPT = -1024.0

__all__ = ["Finding", "PhantomCase", "generate_case", "image_to_slice", "slice_to_image", "write_dataset"]


@dataclass
class Finding:
    """One abnormality instance with its ground truth (slice indices in file voxel order, inclusive)."""

    label: str
    mask_value: int
    centre_slice: int
    slice_range: tuple[int, int]
    bbox: tuple[tuple[int, int], tuple[int, int], tuple[int, int]]  # (k, j, i) inclusive ranges
    side: str | None = None
    lobe: str | None = None
    size_mm: float | None = None
    sentence: str = ""
    reference: str | None = None
    images: tuple[int, int] | None = None  # (first, last) image numbers cited, superior-first
    details: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        return {
            "label": self.label, "mask_value": self.mask_value, "centre_slice": self.centre_slice,
            "slice_range": list(self.slice_range), "bbox": [list(b) for b in self.bbox], "side": self.side,
            "lobe": self.lobe, "size_mm": None if self.size_mm is None else round(float(self.size_mm), 1),
            "sentence": self.sentence, "reference": self.reference,
            "images": None if self.images is None else list(self.images),
        }


@dataclass
class PhantomCase:
    volume: Volume
    mask: np.ndarray
    findings: list[Finding]
    labels: dict[str, int]
    report: dict[str, str]
    volume_name: str
    metadata: dict = field(default_factory=dict)
    tissue: np.ndarray | None = None  # coarse tissue codes (`phantom_anatomy`), generation order (inferior first)

    def tissue_full(self) -> np.ndarray:
        """Tissue codes on the volume's grid and file slice order (for tests and quality checks)."""
        t = np.repeat(np.repeat(self.tissue, 2, 1), 2, 2)[:, : self.mask.shape[1], : self.mask.shape[2]]
        return t if self.volume.slices_toward_superior else t[::-1]


def slice_to_image(k: int, n_slices: int, slices_toward_superior: bool) -> int:
    """1-based image number (image 1 = most superior) of file slice ``k``."""
    return n_slices - k if slices_toward_superior else k + 1


def image_to_slice(image: int, n_slices: int, slices_toward_superior: bool) -> int:
    """File slice index of 1-based image number ``image`` (image 1 = most superior)."""
    return n_slices - image if slices_toward_superior else image - 1


def volume_name(split: str, index: int) -> str:
    """CT-RATE name of volume ``index``: one scan, one reconstruction per patient (patients are 1-based)."""
    return f"{split}_{index + 1}_a_1.nii.gz"


def _upsample2(a: np.ndarray, axis: int) -> np.ndarray:
    """Exact linear 2x upsampling along ``axis`` (coarse pixel = two fine pixels)."""
    d = np.diff(a, axis=axis) * np.float32(0.25)
    shape = list(a.shape)
    shape[axis] *= 2
    out = np.empty(shape, dtype=a.dtype)
    sl = [slice(None)] * a.ndim

    def at(s):
        sl[axis] = s
        return tuple(sl)

    out[at(slice(0, None, 2))] = a
    out[at(slice(1, None, 2))] = a
    out[at(slice(2, None, 2))] -= d
    out[at(slice(1, -1, 2))] += d
    return out


def _geometry(rng: np.random.Generator, p: dict, shape) -> tuple[int, int, int, float, float]:
    rows, cols = (shape[1], shape[2]) if shape is not None else DEFAULT_SHAPE
    if shape is not None:
        n = int(shape[0])
        dz = p["extent"] / n
    else:
        dz = float(rng.uniform(2.0, 3.0))
        n = int(np.clip(round(p["extent"] / dz), 96, 160))
        dz = float(np.clip(p["extent"] / n, 2.0, 3.0))
    need = 2 * p["a_body"] + 40  # body width + margin must fit the field of view
    sp = float(np.clip(max(need / cols, rng.uniform(1.2, 1.6) * 256 / cols), 1.2 * 256 / cols, 1.6 * 256 / cols))
    p["a_body"] = min(p["a_body"], (sp * cols - 30) / 2)
    p["b_body"] = min(p["b_body"], (sp * rows - 70) / 2)
    return n, rows, cols, round(sp, 4), round(dz, 4)


def generate_case(seed: int, index: int = 0, shape: tuple[int, int, int] | None = None,
                  force_labels: list[str] | None = None, split: str = "train",
                  slices_toward_superior: bool = True, normal: bool | None = None) -> PhantomCase:
    """Generate case ``index`` of the phantom data set ``seed``.

    ``shape``: (slices, rows, columns) override (rows/columns even); default 256 x 256 and N from patient size.
    ``force_labels``: labels that must be present (others still sampled); ``normal=True`` forces a normal case.
    """
    unknown = [x for x in (force_labels or []) if x not in LABELS]
    if unknown:
        raise ValueError(f"unknown labels {unknown}")
    rng = np.random.default_rng([int(seed), int(index)])
    p = sample_patient(rng)
    n, rows, cols, sp, dz = _geometry(rng, p, shape)
    labels, latent = sample_labels(rng, force_labels or [], normal)
    if labels["Cardiomegaly"]:
        p["heart_scale"] = float(rng.uniform(1.18, 1.35))
    grid = Grid(n, (rows + 1) // 2, (cols + 1) // 2, dz, 2 * sp, cx=float(p["offset"][0]), cy=float(p["offset"][1]))
    anat = build_anatomy(grid, p, rng)
    mask_c = np.zeros(grid.shape, np.uint8)
    raw = apply_findings(anat, mask_c, labels, rng)

    # image formation: slight blur, correlated noise, exact 2x in-plane upsampling, int16
    hu = smooth121(anat.hu)
    sigma = float(rng.uniform(12, 30)) * (1 + 0.3 * p["size"])
    hu += rng.standard_normal(grid.shape, dtype=np.float32) * np.float32(sigma / 0.625)
    hu = _upsample2(_upsample2(hu, 1), 2)[:, :rows, :cols]
    mask = np.repeat(np.repeat(mask_c, 2, 1), 2, 2)[:, :rows, :cols]
    arr = np.clip(np.rint(hu), -1024, 3071).astype(np.int16)
    if not slices_toward_superior:
        arr, mask = arr[::-1].copy(), mask[::-1].copy()

    # geometry: LPS columns -> +x (left), rows -> +y (posterior); RAS = (-x, -y, z)
    z0 = float(rng.uniform(-350, -150))
    x0 = -(cols - 1) / 2 * sp
    y0 = -(rows - 1) / 2 * sp
    kdir = 1.0 if slices_toward_superior else -1.0
    zfirst = z0 if slices_toward_superior else z0 + (n - 1) * dz
    m = np.eye(4)
    m[:3, 0] = (-sp, 0, 0)
    m[:3, 1] = (0, -sp, 0)
    m[:3, 2] = (0, 0, kdir * dz)
    m[:3, 3] = (-x0, -y0, zfirst)
    volume = Volume(arr, m)

    findings = []
    for value, f in enumerate(raw, start=1):
        g0, g1 = f["g_range"]
        k0, k1 = (g0, g1) if slices_toward_superior else (n - 1 - g1, n - 1 - g0)
        gc = f["g_centre"]
        kc = gc if slices_toward_superior else n - 1 - gc
        (r0, r1), (c0, c1) = f["rc_range"]
        bbox = ((k0, k1), (2 * r0, min(2 * r1 + 1, rows - 1)), (2 * c0, min(2 * c1 + 1, cols - 1)))
        findings.append(Finding(f["label"], value, kc, (k0, k1), bbox, f.get("side"), f.get("lobe"),
                                f.get("size_mm"), details=f.get("details", {})))
    name = volume_name(split, index)
    report = make_report(rng, findings, labels, latent, volume)
    meta = dict(sex=latent["sex"], age=latent["age"], sp=sp, dz=dz, n=n, rows=rows, cols=cols,
                ipp=(x0, y0, zfirst), index=index)
    return PhantomCase(volume, mask, findings, labels, report, name, meta, anat.tissue)


def write_dataset(out_dir, n: int, seed: int, split: str = "train", workers: int = 1, progress: bool = True,
                  shape: tuple[int, int, int] | None = None):
    """Write ``n`` cases in CT-RATE's layout (+ masks/ and ground_truth.jsonl); see `ctvl.phantom_io`."""
    from ctvl.phantom_io import write_dataset as _write

    return _write(out_dir, n, seed, split=split, workers=workers, progress=progress, shape=shape)
