"""Synthetic chest CT generator: determinism, HU, findings/masks, reports, CT-RATE layout, CLI."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
from ctvl.phantom import generate_case, image_to_slice, slice_to_image, write_dataset
from ctvl.phantom_anatomy import AIR, BONE, FAT, LIVER, LUNG_L, LUNG_R, MUSCLE
from ctvl.phantom_findings import NORMAL_SHARE, sample_labels
from ctvl.phantom_io import METADATA_COLUMNS, REPORT_COLUMNS
from ctvl.prompts import LABELS

SMALL = (40, 96, 96)


@pytest.fixture(scope="module")
def default_case():
    return generate_case(0, 3)


def _check_finding(case, f):
    n = case.volume.n_slices
    k0, k1 = f.slice_range
    assert 0 <= k0 <= f.centre_slice <= k1 < n
    ks = np.nonzero((case.mask == f.mask_value).any(axis=(1, 2)))[0]
    if ks.size:  # a later finding may cover an earlier one, never extend it
        assert ks.min() >= k0 and ks.max() <= k1
    if f.reference:
        assert f.reference in f.sentence and f.sentence in case.report["Findings_EN"]
        a, b = f.images
        for image in {a, b}:
            k = image_to_slice(image, n, case.volume.slices_toward_superior)
            assert k0 <= k <= k1, (f.label, f.reference, f.slice_range)


def test_default_geometry_and_hu(default_case):
    c = default_case
    n, rows, cols = c.volume.array.shape
    assert (rows, cols) == (256, 256) and 96 <= n <= 160
    sx, sy, sz = c.volume.spacing
    assert 1.2 <= sx <= 1.6 and sx == pytest.approx(sy) and 2.0 <= sz <= 3.0
    assert 250 <= n * sz <= 380
    assert c.volume.array.dtype == np.int16 and c.mask.shape == c.volume.array.shape
    arr, t = c.volume.array, c.tissue_full()
    med = {code: float(np.median(arr[t == code])) for code in (AIR, FAT, MUSCLE, BONE, LIVER)}
    lung = float(np.median(arr[(t == LUNG_R) | (t == LUNG_L)]))
    assert med[AIR] < -950 and -920 < lung < -700
    assert -140 < med[FAT] < -50 and 20 < med[MUSCLE] < 80 and 35 < med[LIVER] < 80 and med[BONE] > 180
    assert arr.min() >= -1024 and arr.max() <= 3071
    for f in c.findings:
        _check_finding(c, f)


def test_deterministic_by_seed_and_index():
    a = generate_case(7, 2, shape=SMALL)
    b = generate_case(7, 2, shape=SMALL)
    assert np.array_equal(a.volume.array, b.volume.array) and np.array_equal(a.mask, b.mask)
    assert a.report == b.report and a.labels == b.labels
    assert np.allclose(a.volume.ijk_to_ras, b.volume.ijk_to_ras)
    c = generate_case(7, 3, shape=SMALL)
    assert not np.array_equal(a.volume.array, c.volume.array)


@pytest.mark.parametrize("label", LABELS)
def test_every_label_can_be_forced(label):
    c = generate_case(11, LABELS.index(label), shape=SMALL, force_labels=[label])
    assert c.labels[label] == 1
    mine = [f for f in c.findings if f.label == label]
    assert mine, label
    assert all(f.sentence for f in mine)
    assert any(np.any(c.mask == f.mask_value) for f in mine)
    for f in c.findings:
        _check_finding(c, f)


def test_reverse_slice_order_keeps_image_convention():
    up = generate_case(5, 1, shape=SMALL, force_labels=["Lung nodule", "Hiatal hernia"])
    down = generate_case(5, 1, shape=SMALL, force_labels=["Lung nodule", "Hiatal hernia"], slices_toward_superior=False)
    assert up.volume.slices_toward_superior and not down.volume.slices_toward_superior
    assert np.array_equal(up.volume.array[::-1], down.volume.array)
    n = up.volume.n_slices
    for fu, fd in zip(up.findings, down.findings):
        assert fd.slice_range == (n - 1 - fu.slice_range[1], n - 1 - fu.slice_range[0])
        _check_finding(down, fd)
    # image 1 is the most superior slice in both
    for c in (up, down):
        z = c.volume.slice_positions_mm()
        assert image_to_slice(1, n, c.volume.slices_toward_superior) == int(np.argmax(z))
        assert slice_to_image(int(np.argmin(z)), n, c.volume.slices_toward_superior) == n


def test_report_fields_and_negatives():
    c = generate_case(2, 0, shape=SMALL, force_labels=["Lung nodule", "Pleural effusion"])
    assert set(c.report) == {"ClinicalInformation_EN", "Technique_EN", "Findings_EN", "Impressions_EN"}
    text = c.report["Findings_EN"].lower()
    assert "nodule" in text and "pleural effusion" in text
    normal = generate_case(2, 1, shape=SMALL, normal=True)
    assert not any(normal.labels.values()) and not normal.findings
    assert "no " in normal.report["Findings_EN"].lower()


def test_prevalence_and_normal_share():
    rng = np.random.default_rng(0)
    draws = [sample_labels(rng, [])[0] for _ in range(3000)]
    normal = np.mean([not any(d.values()) for d in draws])
    assert abs(normal - NORMAL_SHARE) < 0.05
    prev = {lab: np.mean([d[lab] for d in draws]) for lab in LABELS}
    assert all(0.04 <= p <= 0.55 for p in prev.values()), prev
    assert prev["Lung nodule"] > 0.35


def test_write_dataset_layout_and_csvs(tmp_path):
    import SimpleITK as sitk

    write_dataset(tmp_path, 2, seed=3, split="valid", progress=False, shape=SMALL)
    vol = tmp_path / "valid" / "valid_2" / "valid_2_a" / "valid_2_a_1.nii.gz"
    assert vol.exists() and (tmp_path / "masks" / "valid_2_a_1.nii.gz").exists()
    cols = {
        "radiology_text_reports/valid_reports.csv": REPORT_COLUMNS,
        "multi_abnormality_labels/valid_predicted_labels.csv": ["VolumeName", *LABELS],
        "metadata/valid_metadata.csv": METADATA_COLUMNS,
    }
    for rel, want in cols.items():
        with open(tmp_path / rel, newline="") as fh:
            rows = list(csv.DictReader(fh))
        assert list(rows[0]) == want and len(rows) == 2 and rows[1]["VolumeName"] == "valid_2_a_1.nii.gz"
    with open(tmp_path / "metadata/valid_metadata.csv", newline="") as fh:
        meta = list(csv.DictReader(fh))[1]
    case = generate_case(3, 1, shape=SMALL, split="valid")
    img = sitk.ReadImage(str(vol))
    hu = sitk.GetArrayFromImage(img)
    assert np.array_equal(hu.astype(np.int16), case.volume.array)  # header scl -> HU
    assert np.allclose(img.GetSpacing(), case.volume.spacing, atol=1e-4)
    # CT-CLIP's way: stored values from the file, HU = slope * stored + intercept from the metadata
    stored = hu - float(meta["RescaleIntercept"])
    assert float(meta["RescaleSlope"]) * stored.min() + float(meta["RescaleIntercept"]) == hu.min()
    assert float(meta["XYSpacing"][1:][:-2].split(",")[0]) == pytest.approx(case.volume.spacing[0])
    assert int(meta["NumberofSlices"]) == SMALL[0] and float(meta["ZSpacing"]) == pytest.approx(case.volume.spacing[2])
    mask = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "masks" / "valid_2_a_1.nii.gz")))
    assert np.array_equal(mask, case.mask)
    gt = [json.loads(ln) for ln in (tmp_path / "ground_truth.jsonl").read_text().splitlines()]
    assert [g["VolumeName"] for g in gt] == ["valid_1_a_1.nii.gz", "valid_2_a_1.nii.gz"]
    assert gt[1]["findings"] == [f.to_json() for f in case.findings]


def test_cli_bad_args(tmp_path, capsys):
    from ctvl.cli import main

    assert main(["phantom", "--out", str(tmp_path / "o"), "--n", "0"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--n" in err
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert main(["phantom", "--out", str(blocker / "sub"), "--n", "1"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "writable" in err
    assert main(["phantom", "--out", str(tmp_path / "o"), "--n", "x"]) == 2
    assert main(["phantom", "--out", str(tmp_path / "o"), "--n", "1", "--split", "validation"]) == 2
