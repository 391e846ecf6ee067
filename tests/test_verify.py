"""The verification session model: rows from a report, navigation, shortcuts, counters, resume."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
from ctvl import annotations as ann
from ctvl import verify
from ctvl.errors import CTVLInputError

REPORT = (
    "Findings: A 5 mm nodule in the right upper lobe (series 3, image 10). "
    "Consolidation in the left lower lobe (series 3, image 80). "
    "A 4 mm nodule in the lingula (series 3, image 500)."
)


def make_rows() -> list[verify.VerifyRow]:
    return [
        verify.VerifyRow(snippet="nodule A", series=3, image=10, mined_slice=90, model_slice=90, model_score=0.9),
        verify.VerifyRow(snippet="consolidation", series=3, image=80, mined_slice=20, model_slice=40),
        verify.VerifyRow(snippet="nodule B", series=None, image=500, mined_slice=None, problem="out of range"),
    ]


def open_session(path, **kw) -> tuple[ann.AnnotationStore, verify.VerifySession]:
    store = ann.AnnotationStore(path, annotator="ann")
    return store, verify.VerifySession(store, "v.nii.gz", "r1", make_rows(), n_slices=100, **kw)


def test_rows_from_report_maps_images_and_flags_out_of_range():
    rows = verify.rows_from_report(REPORT, n_slices=100, slices_toward_superior=True)
    assert [(r.series, r.image) for r in rows] == [(3, 10), (3, 80), (3, 500)]
    # image 1 = most superior; slices go toward superior, so image 1 is slice 99
    assert rows[0].mined_slice == 90 and rows[1].mined_slice == 20
    assert rows[2].mined_slice is None and rows[2].problem
    assert all("image" in r.snippet.lower() or r.snippet for r in rows)
    assert verify.rows_from_report("No image references at all.", 100, True) == []


def test_model_predictions_and_table_values():
    rows = make_rows()[:2]
    hits = {"nodule A": [SimpleNamespace(slice=90, score=0.8)], "consolidation": [SimpleNamespace(slice=41, score=0.2)]}
    verify.add_model_predictions(rows, SimpleNamespace(locate=lambda text, top_k=1: hits[text]))
    assert [(r.model_slice, r.agrees) for r in rows] == [(90, True), (41, False)]
    values = rows[0].table_values()
    assert len(values) == len(verify.TABLE_COLUMNS) and values[5] == "0.800" and values[6] == "to do"


def test_decisions_shortcuts_counters_and_resume(tmp_path):
    path = tmp_path / "a.jsonl"
    changes = []
    store, session = open_session(path, on_change=lambda s: changes.append(s.index))
    assert (session.index, session.done, session.remaining) == (0, 0, 3)
    assert session.handle_key("a") == "accept"  # case-insensitive
    assert session.index == 1 and session.counter_text() == "1 done, 2 remaining of 3"
    assert session.handle_key("C", current_slice=lambda: 23, comment="two slices lower") == "correct"
    assert session.index == 2
    with pytest.raises(CTVLInputError, match="no mined slice"):
        session.handle_key("A")  # out-of-range reference cannot be accepted
    assert session.handle_key("P") == "previous" and session.index == 1
    assert session.handle_key("Alt+Right") == "next" and session.index == 2
    assert session.handle_key("x") is None
    store.close()

    records = ann.read_records(path)
    assert [r["status"] for r in records] == ["accepted", "corrected"]
    assert records[1]["verified_slice"] == 23 and records[1]["comment"] == "two slices lower"
    assert records[0]["model_slice"] == 90 and records[0]["annotator"] == "ann"
    assert changes  # GUI refresh callback fired

    # reopen: resumes at the first unverified row with restored state
    store, session = open_session(path)
    assert session.index == 2 and session.done == 2
    assert session.rows[1].status == "corrected" and session.rows[1].verified_slice == 23
    session.reject()
    assert session.remaining == 0
    # change of mind on row 0: appended, latest wins, history kept
    session.select(0)
    session.correct(88)
    store.close()
    state = ann.current_state(ann.read_records(path))
    assert len(state) == 3 and len(ann.read_records(path)) == 4
    key = ann.pair_key({"volume": "v.nii.gz", "report_id": "r1", "series": 3, "image": 10, "snippet": "nodule A"})
    assert state[key]["verified_slice"] == 88


def test_correct_outside_volume_refused_and_nothing_written(tmp_path):
    path = tmp_path / "a.jsonl"
    store, session = open_session(path)
    with pytest.raises(CTVLInputError, match="outside the volume"):
        session.correct(100)
    with pytest.raises(CTVLInputError, match="no current slice"):
        session.handle_key("C")
    store.close()
    assert ann.read_records(path) == []


def test_session_without_rows(tmp_path):
    session = verify.VerifySession(None, "v", "r", [])
    assert session.current is None and session.counter_text() == "0 done, 0 remaining of 0"
    session.next()
    with pytest.raises(CTVLInputError, match="no snippet"):
        session.reject()


def test_read_report_txt_and_csv(tmp_path):
    txt = tmp_path / "case7.txt"
    txt.write_text(REPORT)
    assert verify.read_report(txt) == ("case7", REPORT)
    csv_path = tmp_path / "reports.csv"
    rows = [
        {"VolumeName": "train_1_a_1.nii.gz", "ClinicalInformation_EN": "x", "Technique_EN": "",
         "Findings_EN": "Nodule (image 5).", "Impressions_EN": "Nodule."},
        {"VolumeName": "train_2_a_1.nii.gz", "ClinicalInformation_EN": "", "Technique_EN": "",
         "Findings_EN": "Effusion (image 9).", "Impressions_EN": ""},
    ]
    import csv

    with open(csv_path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    assert verify.read_report(csv_path, "train_2_a_1") == ("train_2_a_1", "Effusion (image 9).")
    assert verify.read_report(csv_path, "train_1_a_1.nii.gz") == ("train_1_a_1", "Nodule (image 5).\nNodule.")
    assert verify.read_report(csv_path)[0] == "train_1_a_1"
    with pytest.raises(CTVLInputError, match="no report for volume"):
        verify.read_report(csv_path, "train_3_a_1.nii.gz")
    with pytest.raises(CTVLInputError, match="not found"):
        verify.read_report(tmp_path / "nope.txt")
    assert verify.report_id_for_text(REPORT) == verify.report_id_for_text("  " + REPORT.replace(" ", "  "))
    json.dumps(verify.SHORTCUTS)


def test_coronal_reference_has_no_axial_slice():
    rows = verify.rows_from_report("Pleural thickening at the right base (coronal image 30).", 100, True)
    assert len(rows) == 1 and rows[0].mined_slice is None and rows[0].problem == "coronal image"
