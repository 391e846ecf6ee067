"""A tiny synthetic CT-RATE-layout dataset (seconds to write) for tests and smoke runs.

Not the phantom corpus (``ctvl.phantom`` is the realistic generator with masks and ground truth); this only has
to exercise the loader: nested folders, the three CSVs, RescaleSlope/Intercept (stored = HU + 1024), metadata
spacing, and reports citing "(series 2, image N)" with image 1 = the most superior slice. Three labels have a
visible sign so a model can learn something: Lung nodule (bright sphere), Pleural effusion (fluid at the back of
the lowest slices), Cardiomegaly (large bright disc).
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
from ctvl.prompts import LABELS

REPORT_FIELDS = ("VolumeName", "ClinicalInformation_EN", "Technique_EN", "Findings_EN", "Impressions_EN")


def _write_csv(path: Path, header: list[str], rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="", encoding="utf-8") as fh:
        w = csv.DictWriter(fh, fieldnames=header)
        w.writeheader()
        w.writerows(rows)


def write_synthetic_dataset(
    root: str | Path, n: int = 8, seed: int = 0, split: str = "train", shape_kji=(40, 64, 64),
    spacing_mm: float = 5.0, header_spacing: bool = True,
) -> list[str]:
    """Write ``n`` volumes in CT-RATE layout under ``root``; returns the volume names."""
    import SimpleITK as sitk

    root = Path(root)
    rng = np.random.default_rng(seed)
    nk, nj, ni = shape_kji
    kk, jj, ii = np.meshgrid(np.arange(nk), np.arange(nj), np.arange(ni), indexing="ij")
    reports, labels, meta, names = [], [], [], []
    for idx in range(n):
        name = f"{split}_{idx + 1}_a_1.nii.gz"
        names.append(name)
        visible = ("Lung nodule", "Pleural effusion", "Cardiomegaly")
        y = {label: int(rng.random() < (0.5 if label in visible else 0.2)) for label in LABELS}
        y["Lung nodule"] = int(idx % 2 == 0)  # every other volume: snippet pairs for the localization loss
        hu = np.full(shape_kji, -1000.0, dtype=np.float32)
        body = ((jj - nj / 2) / (0.42 * nj)) ** 2 + ((ii - ni / 2) / (0.45 * ni)) ** 2 < 1
        hu[body] = 30.0
        lungs = body & (((jj - nj / 2) / (0.3 * nj)) ** 2 + ((np.abs(ii - ni / 2) - ni / 5) / (0.15 * ni)) ** 2 < 1)
        hu[lungs] = -850.0
        findings, impressions = [], []
        if y["Cardiomegaly"]:
            r = 0.16 * ni
            hu[((jj - nj / 2) ** 2 + (ii - ni / 2) ** 2 < r * r) & (kk < nk * 0.6)] = 60.0
            findings.append("The heart is enlarged.")
            impressions.append("Cardiomegaly.")
        if y["Pleural effusion"]:
            hu[lungs & (jj > nj * 0.62) & (kk < nk // 2)] = 15.0
            findings.append("There is a right pleural effusion.")
        if y["Lung nodule"]:
            k0 = int(rng.integers(4, nk - 4))
            j0, i0 = nj // 2, int(ni / 2 - ni / 5)
            hu[(kk - k0) ** 2 + (jj - j0) ** 2 + (ii - i0) ** 2 < 9] = 80.0
            image = nk - k0  # image 1 = most superior slice = k = nk - 1 (k toward superior)
            findings.append(f"A 6 mm nodule is seen in the right upper lobe (series 2, image {image}).")
            impressions.append("Right lung nodule.")
        if not findings:
            findings.append("No acute findings.")
        hu += rng.normal(0, 10, size=hu.shape).astype(np.float32)
        stored = np.clip(np.round(hu + 1024.0), 0, 4095).astype(np.int16)
        img = sitk.GetImageFromArray(stored)
        img.SetSpacing((spacing_mm,) * 3 if header_spacing else (1.0, 1.0, 1.0))
        parts = name.split(".")[0].split("_")
        path = root / split / "_".join(parts[:2]) / "_".join(parts[:3]) / name
        path.parent.mkdir(parents=True, exist_ok=True)
        sitk.WriteImage(img, str(path))
        reports.append({"VolumeName": name, "ClinicalInformation_EN": "Cough.", "Technique_EN": "Non-contrast CT.",
                        "Findings_EN": " ".join(findings), "Impressions_EN": " ".join(impressions) or "Normal."})
        labels.append({"VolumeName": name, **y})
        meta.append({"VolumeName": name, "RescaleSlope": 1, "RescaleIntercept": -1024,
                     "XYSpacing": f"[{spacing_mm}, {spacing_mm}]", "ZSpacing": spacing_mm})
    _write_csv(root / "radiology_text_reports" / f"{split}_reports.csv", list(REPORT_FIELDS), reports)
    _write_csv(root / "multi_abnormality_labels" / f"{split}_predicted_labels.csv", ["VolumeName", *LABELS], labels)
    _write_csv(root / "metadata" / f"{split}_metadata.csv",
               ["VolumeName", "RescaleSlope", "RescaleIntercept", "XYSpacing", "ZSpacing"], meta)
    return names


def write_small_phantom(root: str | Path, n: int = 4, seed: int = 1, split: str = "valid",
                        shape=(40, 64, 64)) -> Path:
    """Phantom cases at a small ``shape`` (slices, rows, cols) in CT-RATE layout with masks/ + ground_truth.jsonl.

    Same files as ``ctvl.phantom.write_dataset`` (which has no shape option), for fast tests.
    """
    import json

    from ctvl.phantom import RESCALE_INTERCEPT, RESCALE_SLOPE, generate_case
    from ctvl.phantom_io import METADATA_COLUMNS, REPORT_COLUMNS, metadata_row, write_nifti

    root = Path(root)
    reports, labels, meta, gt = [], [], [], []
    for i in range(n):
        case = generate_case(seed, i, shape=tuple(shape), split=split)
        name = case.volume_name
        parts = name.split(".")[0].split("_")
        folder = root / split / "_".join(parts[:2]) / "_".join(parts[:3])
        folder.mkdir(parents=True, exist_ok=True)
        write_nifti(case.volume.array, case.volume.ijk_to_ras, folder / name, RESCALE_SLOPE, RESCALE_INTERCEPT)
        (root / "masks").mkdir(parents=True, exist_ok=True)
        write_nifti(case.mask, case.volume.ijk_to_ras, root / "masks" / name, dtype=np.uint8)
        reports.append({"VolumeName": name, **case.report})
        labels.append({"VolumeName": name, **case.labels})
        meta.append(metadata_row(case, np.random.default_rng([seed, i, 7])))
        gt.append({"VolumeName": name, "n_slices": case.volume.n_slices, "labels": case.labels,
                   "findings": [f.to_json() for f in case.findings]})
    _write_csv(root / "radiology_text_reports" / f"{split}_reports.csv", REPORT_COLUMNS, reports)
    _write_csv(root / "multi_abnormality_labels" / f"{split}_predicted_labels.csv", ["VolumeName", *LABELS], labels)
    _write_csv(root / "metadata" / f"{split}_metadata.csv", METADATA_COLUMNS, meta)
    with open(root / "ground_truth.jsonl", "a", encoding="utf-8") as fh:
        for r in gt:
            fh.write(json.dumps(r) + "\n")
    return root
