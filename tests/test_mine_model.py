"""Batch mining with the model: `ctvl mine --model ... --volumes-root ... --sort disagreement` and the library
functions behind it (`ctvl.verify.with_model_predictions`, `sort_by_disagreement`), on a CT-RATE-format CSV."""

from __future__ import annotations

import csv
import json
from types import SimpleNamespace

import numpy as np
import pytest
from ctvl import verify
from ctvl.geometry import Volume
from ctvl.io import write_volume
from ctvl.snippets import MineStats, mine_reports_csv

N_SLICES = {"train_1_a_1.nii.gz": 40, "train_2_a_1.nii.gz": 30}
# the fake model's answer per volume (file slice index)
MODEL_SLICE = {"train_1_a_1.nii.gz": 30, "train_2_a_1.nii.gz": 2}


def ct(n_slices: int) -> Volume:
    m = np.diag([-1.5, -1.5, 2.0, 1.0])
    m[:3, 3] = [30.0, 30.0, -40.0]
    array = np.full((n_slices, 32, 32), -1000, dtype=np.int16)
    array[:, 6:-6, 6:-6] = 40
    array[:, 10:16, 10:22] = -850
    return Volume(array, m)


@pytest.fixture()
def dataset(tmp_path):
    """CT-RATE layout with two volumes and a reports CSV with good, malformed and reference-free rows."""
    for name, n in N_SLICES.items():
        stem = name[: -len(".nii.gz")]
        parts = stem.split("_")
        write_volume(ct(n), tmp_path / "train" / "_".join(parts[:2]) / "_".join(parts[:3]) / name)
    reports = tmp_path / "radiology_text_reports"
    reports.mkdir()
    path = reports / "train_reports.csv"
    header = ["VolumeName", "ClinicalInformation_EN", "Technique_EN", "Findings_EN", "Impressions_EN"]
    rows = [
        ["train_1_a_1.nii.gz", "", "", "A 5 mm nodule in the right upper lobe (series 3, image 10). "
         "Small effusion on the left (series 3, image 35).", "Nodule (series 3, image 10)."],
        ["train_2_a_1.nii.gz", "", "", "Consolidation in the left lower lobe (image 28).", "No other findings."],
        ["train_3_a_1.nii.gz", "", "", "Nodule (image 12).", ""],  # volume not on disk
        ["train_4_a_1.nii.gz", "", "", "Lungs are clear. No nodules.", "Normal chest CT."],  # no references
        ["", "", "", "Orphan finding (image 4).", ""],  # no VolumeName
        ["train_5_a_1.nii.gz", "too", "few"],  # wrong field count
    ]
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows(rows)
    return tmp_path, path


class FakeEncoding:
    def __init__(self, volume: Volume, best: int) -> None:
        self.volume, self.best = volume, best

    def locate(self, text, top_k=5):
        z = self.volume.slice_positions_mm()
        return [SimpleNamespace(slice=self.best, position_mm=float(z[self.best]), score=0.5)][:top_k]


class FakeEncoder:
    """encode_fn that knows each volume by its slice count; counts calls (each volume must be encoded once)."""

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, volume: Volume) -> FakeEncoding:
        self.calls += 1
        name = next(n for n, k in N_SLICES.items() if k == volume.n_slices)
        return FakeEncoding(volume, MODEL_SLICE[name])


def test_mining_with_model_predictions(dataset):
    root, csv_path = dataset
    stats = MineStats()
    records = list(mine_reports_csv(csv_path, volumes_root=root, stats=stats))
    assert stats.skipped_rows == 2  # no VolumeName + wrong field count: skipped, not fatal
    encoder = FakeEncoder()
    agreement = verify.AgreementStats()
    out = list(verify.with_model_predictions(records, root, encoder, tolerance_mm=5.0, stats=agreement))
    assert encoder.calls == 2  # each volume encoded once, although volume 1 has three references
    assert len(out) == len(records) == 5
    by = {(r["volume"], r["image"], r["column"]): r for r in out}
    first = by[("train_1_a_1.nii.gz", 10, "Findings_EN")]
    assert first["slice"] == 30 and first["model_slice"] == 30 and first["agree"] is True
    assert first["model_error_mm"] == 0.0 and first["model_score"] == 0.5
    effusion = by[("train_1_a_1.nii.gz", 35, "Findings_EN")]
    assert effusion["slice"] == 5 and effusion["model_error_slices"] == 25 and effusion["agree"] is False
    assert effusion["model_error_mm"] == pytest.approx(50.0)
    consolidation = by[("train_2_a_1.nii.gz", 28, "Findings_EN")]
    assert consolidation["slice"] == 2 and consolidation["agree"] is True
    missing = by[("train_3_a_1.nii.gz", 12, "Findings_EN")]
    assert missing["model_slice"] is None and missing["model_problem"] == "volume not found"
    assert agreement.as_dict()["agreement"] == pytest.approx(3 / 4)
    assert agreement.volumes_encoded == 2 and agreement.volumes_missing == 1

    ordered = verify.sort_by_disagreement(out)
    assert ordered[0] is effusion  # the most doubtful first
    assert ordered[-1] is missing  # no model prediction: last
    json.dumps(out)  # JSON-serialisable as-is


def test_image_outside_volume_sorted_first(dataset):
    root, _ = dataset
    record = {"volume": "train_2_a_1.nii.gz", "report_id": "train_2_a_1", "snippet": "x", "series": None,
              "image": 99, "slice": None, "problem": "image 99 is outside the volume's 1..30 images"}
    agree = {**record, "image": 28, "slice": 2}
    out = list(verify.with_model_predictions([agree, record], root, FakeEncoder()))
    assert "agree" not in out[1] and out[1]["model_slice"] == 2
    assert verify.sort_by_disagreement(out)[0]["image"] == 99


def test_real_encode_with_stub_model(dataset):
    """The real `ctvl.inference.encode` path (geometry, windows) with a tiny stand-in model."""
    torch = pytest.importorskip("torch")
    torch.set_num_threads(1)
    from ctvl.inference import encode

    from tests.inference_stub import StubModel

    root, csv_path = dataset
    model = StubModel()
    records = [r for r in mine_reports_csv(csv_path, volumes_root=root) if r["volume"] == "train_2_a_1.nii.gz"]
    out = list(verify.with_model_predictions(records, root, lambda v: encode(v, model)))
    assert model.image_calls >= 1
    assert all(0 <= r["model_slice"] < 30 and "agree" in r for r in out)


def mine_args(**kw):
    import argparse

    from ctvl.commands import _mine_model

    parser = argparse.ArgumentParser()
    parser.add_argument("--volumes-root")
    _mine_model.add_arguments(parser)
    argv = [item for k, v in kw.items() for item in (f"--{k.replace('_', '-')}", str(v))]
    return parser.parse_args(argv)


def test_mine_options_model_and_sort(dataset, monkeypatch):
    """The `ctvl mine` options (`ctvl.commands._mine_model`): --model/--volumes-root/--sort disagreement."""
    import ctvl.inference
    from ctvl.commands import _mine_model
    from ctvl.errors import CTVLInputError

    root, csv_path = dataset
    encoder = FakeEncoder()
    monkeypatch.setattr(ctvl.inference, "load_model", lambda name, device="auto": SimpleNamespace(name=name))
    monkeypatch.setattr(ctvl.inference, "encode", lambda volume, model: encoder(volume))
    records = list(mine_reports_csv(csv_path, volumes_root=root))
    args = mine_args(volumes_root=root, model="demo", sort="disagreement", tolerance_mm=5)
    out = list(_mine_model.apply(records, args))
    assert [r["image"] for r in out][:1] == [35] and out[-1]["model_slice"] is None
    assert "75.0% of 4 pairs" in _mine_model.summary(args)
    assert list(_mine_model.apply(records, mine_args())) == records  # no --model: unchanged
    with pytest.raises(CTVLInputError, match="needs the model"):
        _mine_model.apply(records, mine_args(sort="disagreement"))
    with pytest.raises(CTVLInputError, match="--volumes-root"):
        _mine_model.apply(records, mine_args(model="demo"))
