"""Write phantom cases in CT-RATE's layout (NIfTI int16 + scl_inter, CSVs with CT-RATE's columns) + ground truth."""

from __future__ import annotations

import csv
import gzip
import io
import json
import logging
import shutil
import struct
import tempfile
from pathlib import Path

import numpy as np
from ctvl.atomic import atomic_file, ensure_writable_dir
from ctvl.errors import CTVLInputError
from ctvl.prompts import LABELS

log = logging.getLogger(__name__)

REPORT_COLUMNS = ["VolumeName", "ClinicalInformation_EN", "Technique_EN", "Findings_EN", "Impressions_EN"]
METADATA_COLUMNS = [
    "VolumeName", "Manufacturer", "SeriesDescription", "ManufacturerModelName", "PatientSex", "PatientAge",
    "ReconstructionDiameter", "DistanceSourceToDetector", "DistanceSourceToPatient", "GantryDetectorTilt",
    "TableHeight", "RotationDirection", "ExposureTime", "XRayTubeCurrent", "Exposure", "FilterType", "GeneratorPower",
    "FocalSpots", "ConvolutionKernel", "PatientPosition", "RevolutionTime", "SingleCollimationWidth",
    "TotalCollimationWidth", "TableSpeed", "TableFeedPerRotation", "SpiralPitchFactor", "DataCollectionCenterPatient",
    "ReconstructionTargetCenterPatient", "ExposureModulationType", "CTDIvol", "ImagePositionPatient",
    "ImageOrientationPatient", "SliceLocation", "SamplesPerPixel", "PhotometricInterpretation", "Rows", "Columns",
    "XYSpacing", "RescaleIntercept", "RescaleSlope", "RescaleType", "NumberofSlices", "ZSpacing", "StudyDate",
]
SCANNERS = [("SIEMENS", "SOMATOM Definition Edge", "Br40f"), ("Philips", "Ingenuity CT", "B"),
            ("GE MEDICAL SYSTEMS", "Revolution EVO", "STANDARD"), ("TOSHIBA", "Aquilion PRIME", "FC08")]


def write_nifti(array: np.ndarray, ijk_to_ras: np.ndarray, path: Path, slope: float = 1.0, intercept: float = 0.0,
                dtype=np.int16, level: int = 1) -> None:
    """Atomically write ``array`` [k, j, i] as NIfTI-1 with exact geometry; stored = (array - intercept) / slope.

    The header carries ``scl_slope``/``scl_inter`` so header-aware readers get ``array`` back.
    """
    import SimpleITK as sitk

    path = Path(path)
    stored = np.rint((np.asarray(array, np.float64) - intercept) / slope).astype(dtype) if (
        slope != 1.0 or intercept != 0.0) else np.asarray(array).astype(dtype, copy=False)
    img = sitk.GetImageFromArray(stored)
    spacing = np.linalg.norm(ijk_to_ras[:3, :3], axis=0)
    lps = np.diag([-1.0, -1.0, 1.0])
    direction = lps @ (ijk_to_ras[:3, :3] / spacing)
    img.SetSpacing([float(s) for s in spacing])
    img.SetDirection([float(v) for v in direction.ravel()])
    img.SetOrigin([float(v) for v in lps @ ijk_to_ras[:3, 3]])
    with tempfile.TemporaryDirectory(dir=path.parent, prefix=".tmp_") as tdir:
        raw = Path(tdir) / "v.nii"
        sitk.WriteImage(img, str(raw), False)
        with open(raw, "rb+") as fh:
            head = fh.read(4)
            endian = "<" if struct.unpack("<i", head)[0] == 348 else ">"
            fh.seek(112)
            fh.write(struct.pack(endian + "ff", slope, intercept))
        with open(raw, "rb") as src, atomic_file(path) as dst_raw, \
                gzip.GzipFile(fileobj=dst_raw, mode="wb", compresslevel=level, mtime=0) as dst:
            shutil.copyfileobj(src, dst, 1 << 20)


def _atomic_text(path: Path, text: str) -> None:
    with atomic_file(path, "w", encoding="utf-8", newline="") as fh:
        fh.write(text)


def metadata_row(case, rng: np.random.Generator) -> dict:
    m = case.metadata
    man, model, kernel = SCANNERS[int(rng.integers(len(SCANNERS)))]
    sp, dz = m["sp"], m["dz"]
    x0, y0, zf = m["ipp"]
    kvp_ma = int(rng.integers(80, 300))
    return {
        "VolumeName": case.volume_name, "Manufacturer": man, "SeriesDescription": "THORAX",
        "ManufacturerModelName": model,
        "PatientSex": m["sex"], "PatientAge": f"{m['age']:03d}Y", "ReconstructionDiameter": round(sp * m["cols"], 1),
        "DistanceSourceToDetector": 1085.6, "DistanceSourceToPatient": 595.0, "GantryDetectorTilt": 0.0,
        "TableHeight": round(float(rng.uniform(120, 200)), 1), "RotationDirection": "CW",
        "ExposureTime": int(rng.integers(300, 1000)), "XRayTubeCurrent": kvp_ma, "Exposure": int(kvp_ma * 0.5),
        "FilterType": "FLAT", "GeneratorPower": int(rng.integers(10, 60)), "FocalSpots": "[1.2]",
        "ConvolutionKernel": kernel, "PatientPosition": "FFS", "RevolutionTime": 0.5, "SingleCollimationWidth": 0.6,
        "TotalCollimationWidth": 38.4, "TableSpeed": 46.0, "TableFeedPerRotation": 46.0, "SpiralPitchFactor": 1.2,
        "DataCollectionCenterPatient": "[0.0, 0.0, 0.0]", "ReconstructionTargetCenterPatient": "[0.0, 0.0, 0.0]",
        "ExposureModulationType": "XYZ_EC", "CTDIvol": round(float(rng.uniform(3, 15)), 2),
        "ImagePositionPatient": f"[{x0:.4f}, {y0:.4f}, {zf:.4f}]", "ImageOrientationPatient": "[1, 0, 0, 0, 1, 0]",
        "SliceLocation": round(zf, 4), "SamplesPerPixel": 1, "PhotometricInterpretation": "MONOCHROME2",
        "Rows": m["rows"], "Columns": m["cols"], "XYSpacing": f"[{sp}, {sp}]", "RescaleIntercept": -1024,
        "RescaleSlope": 1, "RescaleType": "HU", "NumberofSlices": m["n"], "ZSpacing": dz,
        "StudyDate": f"20{int(rng.integers(18, 24))}{int(rng.integers(1, 13)):02d}{int(rng.integers(1, 29)):02d}",
    }


def _one(job):
    out_dir, seed, index, split, shape = job
    from ctvl.phantom import RESCALE_INTERCEPT, RESCALE_SLOPE, generate_case

    case = generate_case(seed, index, shape=shape, split=split)
    out = Path(out_dir)
    name = case.volume_name
    stem = name[: -len(".nii.gz")]
    parts = stem.split("_")
    folder = out / split / "_".join(parts[:2]) / "_".join(parts[:3])
    folder.mkdir(parents=True, exist_ok=True)
    write_nifti(case.volume.array, case.volume.ijk_to_ras, folder / name, RESCALE_SLOPE, RESCALE_INTERCEPT)
    write_nifti(case.mask, case.volume.ijk_to_ras, out / "masks" / name, dtype=np.uint8, level=6)
    rng = np.random.default_rng([int(seed), int(index), 7])
    gt = {"VolumeName": name, "n_slices": case.volume.n_slices,
          "slices_toward_superior": case.volume.slices_toward_superior, "image_convention": "superior_first",
          "labels": case.labels, "findings": [f.to_json() for f in case.findings]}
    return ({"VolumeName": name, **case.report}, {"VolumeName": name, **case.labels}, metadata_row(case, rng), gt)


def _csv(path: Path, columns: list[str], rows: list[dict]) -> None:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=columns)
    w.writeheader()
    w.writerows(rows)
    _atomic_text(path, buf.getvalue())


def write_dataset(out_dir, n: int, seed: int, split: str = "train", workers: int = 1, progress: bool = True,
                  shape=None) -> Path:
    """Generate ``n`` cases into ``out_dir`` (CT-RATE layout, masks/, ground_truth.jsonl); returns ``out_dir``."""
    out = Path(out_dir)
    if int(n) < 1:
        raise CTVLInputError(None, f"--n must be at least 1, got {n}", "ask for one or more volumes")
    if split not in ("train", "valid", "test"):
        raise CTVLInputError(None, f"unknown split {split!r}", "use 'train', 'valid' or 'test'")
    ensure_writable_dir(out, ("radiology_text_reports", "multi_abnormality_labels", "metadata", "masks", split))
    jobs = [(str(out), int(seed), i, split, shape) for i in range(int(n))]
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(jobs), unit="vol", desc=f"phantom {split}")
    results = []
    if workers > 1:
        import multiprocessing as mp

        with mp.get_context("spawn").Pool(int(workers)) as pool:
            for r in pool.imap(_one, jobs, chunksize=1):
                results.append(r)
                bar and bar.update(1)
    else:
        for job in jobs:
            results.append(_one(job))
            bar and bar.update(1)
    if bar is not None:
        bar.close()
    _csv(out / "radiology_text_reports" / f"{split}_reports.csv", REPORT_COLUMNS, [r[0] for r in results])
    _csv(out / "multi_abnormality_labels" / f"{split}_predicted_labels.csv", ["VolumeName", *LABELS],
         [r[1] for r in results])
    _csv(out / "metadata" / f"{split}_metadata.csv", METADATA_COLUMNS, [r[2] for r in results])
    gt_path = out / "ground_truth.jsonl"  # records of the other split are kept
    keep = []
    if gt_path.exists():
        keep = [ln for ln in gt_path.read_text(encoding="utf-8").splitlines()
                if ln.strip() and not json.loads(ln)["VolumeName"].startswith(f"{split}_")]
    _atomic_text(gt_path, "".join(ln + "\n" for ln in keep) + "".join(json.dumps(r[3]) + "\n" for r in results))
    log.info("wrote %d %s volumes to %s", len(results), split, out)
    return out
