"""Reference mining, image -> slice mapping, CT-RATE CSV mining and `ctvl mine` (all CPU, fast)."""

from __future__ import annotations

import io
import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from ctvl import cli
from ctvl.errors import CTVLInputError
from ctvl.snippets import (
    ImageReference,
    MineStats,
    image_to_slice,
    image_to_slice_dicom,
    mine_references,
    mine_reports_csv,
    volume_header,
)

DATA = Path(__file__).parent / "data" / "reference_sentences.jsonl"


def refs_of(text: str) -> list[tuple]:
    return [(r.series, r.image, r.image_end) for r in mine_references(text)]


# --- formats -------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize(
    "text, expected",
    [
        ("Nodule (series 3, image 45).", [(3, 45, 45)]),
        ("Nodule (se 3 im 45).", [(3, 45, 45)]),
        ("Nodule, image 45 of series 3.", [(3, 45, 45)]),
        ("Nodule (3:45).", [(3, 45, 45)]),
        ("Opacities (images 20-60).", [(None, 20, 60)]),
        ("Opacities, images 20 through 60.", [(None, 20, 60)]),
        ("Opacities, image 20 to 60.", [(None, 20, 60)]),
        ("Opacities (series 3, images 20-25).", [(3, 20, 25)]),
        ("Se 4 Im 112: nodule.", [(4, 112, 112)]),
        ("Granuloma, ser 2 img 64.", [(2, 64, 64)]),
        ("Nodule on image #155.", [(None, 155, 155)]),
        ("Nodule, image 34, series 5.", [(5, 34, 34)]),
        ("Mass (3/102).", [(3, 102, 102)]),
        ("Nodule series 3 image 45.", [(3, 45, 45)]),
        ("Nodule (image 45).", [(None, 45, 45)]),
        ("Thickening seen on image 45.", [(None, 45, 45)]),
        ("Nodule (SE3, IM45).", [(3, 45, 45)]),
        ("Node (IMG 45).", [(None, 45, 45)]),
        ("Bullae, axial image 45.", [(None, 45, 45)]),
        ("Nodule S3 I45.", [(3, 45, 45)]),
        ("Nodule (Se 3/Im 45).", [(3, 45, 45)]),
        ("Nodule (series/image 4/112).", [(4, 112, 112)]),
        ("Nodule (IM 45, SE 3).", [(3, 45, 45)]),
        ("Nodule, image 45 (series 3).", [(3, 45, 45)]),
        ("Nodule (image no. 45).", [(None, 45, 45)]),
        ("Nodule (slice 45).", [(None, 45, 45)]),
        ("Nodule (series 601, image 45).", [(601, 45, 45)]),
        ("Nodule (image 45 of 300).", [(None, 45, 45)]),
        ("Nodule (image 112/300).", [(None, 112, 112)]),
        ("Nodules (series 3, images 45/67/89).", [(3, 45, 45), (3, 67, 67), (3, 89, 89)]),
        ("Nodules (series 3, images 45, 52 and 67).", [(3, 45, 45), (3, 52, 52), (3, 67, 67)]),
        ("Bronchiectasis (images 145-52).", [(None, 145, 152)]),
        ("Nodules (3/45, 3/210).", [(3, 45, 45), (3, 210, 210)]),
        ("On series 3, there is a nodule at image 45.", [(3, 45, 45)]),
    ],
)
def test_formats(text, expected):
    assert refs_of(text) == expected


@pytest.mark.parametrize(
    "text",
    [
        "A 3 x 4 mm nodule.",
        "Nodule measuring 3/4 cm.",
        "The examination was performed at 10:30.",
        "Scanned (10:30) after contrast.",
        "Prior CT dated 03/12/2021.",
        "Compared to the CT of (3/12), stable.",
        "Blood pressure 120/80.",
        "Blood pressure (120/80).",
        "Fracture of T3; disc disease at L1-L2.",
        "Nodule in segment 6 (S6).",
        "A series of nodules.",
        "Prior images were reviewed; images were obtained after contrast.",
        "Lung-RADS 3. BI-RADS 4. Category 4A.",
        "Grade 2/4 regurgitation (2/4).",
        "Atelectasis in 1/3 of the lung.",
        "Slices 5 mm thick; image 3 mm.",
        "Breast mass at the (2:00) position.",
        "Ratio (1:1).",
        "Prior exam (2/2020).",
        "Series 2 was degraded by motion.",
    ],
)
def test_negatives(text):
    assert mine_references(text) == []


def test_bare_forms_need_brackets_and_plausible_numbers():
    assert refs_of("Nodule 3/102 in the RUL.") == []  # not parenthesised
    assert refs_of("Nodule (25/102).") == []  # series above MAX_BARE_SERIES
    assert refs_of("Nodule (3/4500).") == []  # image above MAX_IMAGE
    assert refs_of("Nodule (3:08).") == []  # leading zero: a clock time
    assert refs_of("Nodule (3:45 pm).") == []


# --- spans and snippets --------------------------------------------------------------------------------------------

def test_span_points_at_reference_and_snippet_excludes_it():
    text = "Small hiatal hernia. Stable 6 mm left lower lobe nodule (series 4, image 112), previously 6 mm."
    (ref,) = mine_references(text)
    assert text[ref.span[0]:ref.span[1]] == "series 4, image 112"
    assert ref.snippet == "Stable 6 mm left lower lobe nodule, previously 6 mm"
    assert "112" not in ref.snippet and "(" not in ref.snippet and "hernia" not in ref.snippet


@pytest.mark.parametrize(
    "text, span_text",
    [
        ("Nodule (3:45).", "3:45"),
        ("Nodule, image 45 of series 3, stable.", "image 45 of series 3"),
        ("Opacities (images 20-60).", "images 20-60"),
        ("Bullae, axial image 45.", "axial image 45"),
        ("Nodule S3 I45.", "S3 I45"),
    ],
)
def test_span_text(text, span_text):
    (ref,) = mine_references(text)
    assert text[ref.span[0]:ref.span[1]] == span_text


def test_two_references_in_one_sentence_get_their_own_clauses():
    text = "A 5 mm nodule in the RUL (series 3, image 45) and a 7 mm nodule in the LLL (series 3, image 88)."
    a, b = mine_references(text)
    assert (a.series, a.image, b.series, b.image) == (3, 45, 3, 88)
    assert a.snippet == "A 5 mm nodule in the RUL"
    assert b.snippet == "a 7 mm nodule in the LLL"
    assert text[a.span[0]:a.span[1]] == "series 3, image 45"
    assert text[b.span[0]:b.span[1]] == "series 3, image 88"


def test_references_sharing_a_clause_share_the_sentence():
    refs = mine_references("Two nodules in the left upper lobe (series 3, image 45; series 4, image 50).")
    assert [r.snippet for r in refs] == ["Two nodules in the left upper lobe"] * 2
    refs = mine_references("Nodules are seen on series 5 image 33 and series 6 image 40.")
    assert [r.snippet for r in refs] == ["Nodules are seen"] * 2


def test_snippet_is_the_sentence_of_the_reference():
    text = ("Trachea and both main bronchi are open. A 4 mm nodule is observed in the superior segment of the lower "
            "lobe of the left lung (image 78). No pleural effusion.")
    (ref,) = mine_references(text)
    assert ref.snippet == "A 4 mm nodule is observed in the superior segment of the lower lobe of the left lung"
    assert ref.series is None and ref.image == ref.image_end == 78


def test_snippet_cleans_dangling_words_and_punctuation():
    assert mine_references("Series 2, image 45: ground-glass nodule.")[0].snippet == "ground-glass nodule"
    assert mine_references("Tiny effusion on the right (see image 150).")[0].snippet == "Tiny effusion on the right"
    assert mine_references("Emphysema (e.g., image 30) in the apices.")[0].snippet == "Emphysema in the apices"


def test_snippet_drops_commas_left_inside_brackets():
    (ref,) = mine_references("The nodule measures 5 mm (previously 4 mm, image 45).")
    assert ref.snippet == "The nodule measures 5 mm (previously 4 mm)"


def test_plane_is_recorded():
    (ref,) = mine_references("Stable nodule (coronal image 30).")
    assert ref.plane == "coronal"
    assert mine_references("Nodule (image 30).")[0].plane is None


def test_empty_and_non_text():
    assert mine_references("") == []
    assert mine_references(None) == []  # type: ignore[arg-type]


def test_pathological_inputs_finish():
    # each would take minutes with catastrophic backtracking; no timing asserted, the test just has to end
    for text in ("images " + ", ".join(["12"] * 400), "image 45" + " " * 3000 + "x", "(" * 500 + "3/45" + ")" * 500,
                 "(se 3, im 45-" * 200):
        mine_references(text)


# --- image -> slice ------------------------------------------------------------------------------------------------

def test_image_to_slice_conventions():
    # 100 slices stored inferior->superior (k increases toward the head): image 1 = most superior = slice 99
    assert image_to_slice(1, 100, True) == 99
    assert image_to_slice(100, 100, True) == 0
    assert image_to_slice(1, 100, False) == 0
    assert image_to_slice(10, 100, False) == 9
    assert image_to_slice(1, 100, True, convention="inferior_first") == 0
    assert image_to_slice(1, 100, False, convention="inferior_first") == 99
    assert image_to_slice(7, 100, True, convention="file_order") == 6
    assert image_to_slice(7, 100, False, convention="file_order") == 6


@pytest.mark.parametrize("image", [0, 101, -3])
def test_image_to_slice_out_of_range(image):
    with pytest.raises(CTVLInputError, match="outside"):
        image_to_slice(image, 100, True)


def test_image_to_slice_bad_convention():
    with pytest.raises(CTVLInputError, match="convention"):
        image_to_slice(1, 100, True, convention="head_first")


def test_image_to_slice_dicom():
    numbers = [5, 4, 3, 2, 1, 7, 8]  # instance numbers per slice, 6 missing
    assert image_to_slice_dicom(1, numbers) == 4
    assert image_to_slice_dicom(7, numbers) == 5
    assert image_to_slice_dicom(6, numbers) in (0, 5)  # nearest (5 or 7)
    with pytest.raises(CTVLInputError):
        image_to_slice_dicom(6, numbers, nearest=False)
    with pytest.raises(CTVLInputError):
        image_to_slice_dicom(50, numbers)
    with pytest.raises(CTVLInputError):
        image_to_slice_dicom(1, [None, None])


# --- CT-RATE CSV ---------------------------------------------------------------------------------------------------

HEADER = "VolumeName,ClinicalInformation_EN,Technique_EN,Findings_EN,Impressions_EN\n"


def write_csv(path: Path, body: str) -> Path:
    path.write_text(HEADER + body, encoding="utf-8")
    return path


def test_mine_reports_csv_records_and_malformed_rows(tmp_path, caplog):
    csv_path = write_csv(
        tmp_path / "train_reports.csv",
        'train_1_a_1.nii.gz,Cough.,CT.,"Nodule in the RUL (series 3, image 45). No effusion.","Nodule (image 45)."\n'
        ',x,y,"Nodule (image 10).",z\n'  # no VolumeName
        'train_2_a_1.nii.gz,only,three\n'  # too few fields
        'train_3_a_1.nii.gz,a,b,"Mass (4/112).",c,EXTRA\n'  # too many fields
        'train_4_a_1.nii.gz,a,b,"Normal lungs.","Normal."\n',
    )
    stats = MineStats()
    with caplog.at_level("WARNING"):
        recs = list(mine_reports_csv(csv_path, stats=stats))
    assert [(r["volume"], r["column"], r["series"], r["image"]) for r in recs] == [
        ("train_1_a_1.nii.gz", "Findings_EN", 3, 45), ("train_1_a_1.nii.gz", "Impressions_EN", None, 45)]
    assert recs[0]["report_id"] == "train_1_a_1" and recs[0]["row"] == 0 and recs[0]["slice"] is None
    assert recs[0]["snippet"] == "Nodule in the RUL"
    assert stats.skipped_rows == 3 and stats.rows == 5 and stats.references == 2
    assert "skipped" in caplog.text


def test_mine_reports_csv_bad_files(tmp_path):
    with pytest.raises(CTVLInputError, match="not found"):
        list(mine_reports_csv(tmp_path / "missing.csv"))
    bad = tmp_path / "bad.csv"
    bad.write_text("a,b\n1,2\n")
    with pytest.raises(CTVLInputError, match="VolumeName"):
        list(mine_reports_csv(bad))


def write_nifti(path: Path, n_slices: int, flip: bool) -> None:
    import SimpleITK as sitk

    image = sitk.GetImageFromArray(np.zeros((n_slices, 4, 5), dtype=np.int16))
    if flip:  # k toward inferior
        image.SetDirection((1, 0, 0, 0, 1, 0, 0, 0, -1))
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(image, str(path))


def test_volume_header_and_slices_from_volumes_root(tmp_path):
    root = tmp_path / "data"
    write_nifti(root / "train" / "train_1" / "train_1_a" / "train_1_a_1.nii.gz", 40, flip=False)
    write_nifti(root / "elsewhere" / "train_2_a_1.nii.gz", 40, flip=True)
    info = volume_header(root / "elsewhere" / "train_2_a_1.nii.gz")
    assert info == {"n_slices": 40, "slices_toward_superior": False, "slice_axis_ijk": 2}
    csv_path = write_csv(
        tmp_path / "r.csv",
        'train_1_a_1.nii.gz,a,b,"Nodule (image 1). Mass (images 10-12).",c\n'
        'train_2_a_1.nii.gz,a,b,"Nodule (image 1). Far (image 400). Cor (coronal image 5).",c\n'
        'valid_9_a_1.nii.gz,a,b,"Nodule (image 3).",c\n',
    )
    stats = MineStats()
    recs = list(mine_reports_csv(csv_path, columns=("Findings_EN",), volumes_root=root, stats=stats))
    got = [(r["volume"][:7], r["image"], r["slice"], r["slice_end"]) for r in recs]
    assert got == [("train_1", 1, 39, 39), ("train_1", 10, 30, 28), ("train_2", 1, 0, 0), ("train_2", 400, None, None),
                   ("train_2", 5, None, None), ("valid_9", 3, None, None)]
    assert "outside" in recs[3]["problem"]
    assert stats.with_slice == 3 and stats.unmappable == 1


def test_mine_reports_csv_custom_slice_fn(tmp_path):
    csv_path = write_csv(tmp_path / "r.csv", 'v1.nii.gz,a,b,"Nodule (series 3, image 7).",c\n')

    def slice_fn(volume: str, ref: ImageReference) -> int:
        return image_to_slice_dicom(ref.image, list(range(1, 21)))

    (rec,) = mine_reports_csv(csv_path, slice_fn=slice_fn)
    assert rec["slice"] == 6


# --- CLI -----------------------------------------------------------------------------------------------------------

def test_cli_mine_csv_to_file(tmp_path, capsys):
    csv_path = write_csv(tmp_path / "r.csv", 'v1.nii.gz,a,b,"Nodule (3:45) and mass (3:88).",c\n,,,,\n')
    out = tmp_path / "pairs.jsonl"
    assert cli.main(["mine", str(csv_path), "--out", str(out)]) == 0
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(d["volume"], d["series"], d["image"], d["snippet"]) for d in lines] == [
        ("v1.nii.gz", 3, 45, "Nodule"), ("v1.nii.gz", 3, 88, "mass")]
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_cli_mine_stdin(monkeypatch, capsys):
    monkeypatch.setattr("sys.stdin", io.StringIO("Nodule (series 3, image 45)."))
    assert cli.main(["mine", "-"]) == 0
    (line,) = capsys.readouterr().out.splitlines()
    assert json.loads(line)["image"] == 45


def test_cli_mine_text_file_with_volume(tmp_path, capsys):
    report = tmp_path / "report.txt"
    report.write_text("Nodule (image 2).")
    vol = tmp_path / "v.nii.gz"
    write_nifti(vol, 20, flip=False)
    assert cli.main(["mine", str(report), "--volume", str(vol), "--convention", "inferior_first"]) == 0
    rec = json.loads(capsys.readouterr().out)
    assert (rec["volume"], rec["report_id"], rec["slice"]) == ("v.nii.gz", "report", 1)


@pytest.mark.parametrize("case", ["missing", "no_columns", "empty_text", "empty_stdin"])
def test_cli_mine_bad_input_exit_2(case, tmp_path, capsys, monkeypatch):
    if case == "missing":
        argv = ["mine", str(tmp_path / "nope.csv")]
    elif case == "no_columns":
        bad = tmp_path / "bad.csv"
        bad.write_text("VolumeName,Other\nv,x\n")
        argv = ["mine", str(bad), "--out", str(tmp_path / "o.jsonl")]
    elif case == "empty_text":
        (tmp_path / "r.txt").write_text("  \n")
        argv = ["mine", str(tmp_path / "r.txt")]
    else:
        monkeypatch.setattr("sys.stdin", io.StringIO(""))
        argv = ["mine", "-"]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "error" in err[0]
    assert not (tmp_path / "o.jsonl").exists()


# --- regression guard on the labelled set --------------------------------------------------------------------------

def test_labelled_set_precision_recall():
    rows = [json.loads(line) for line in DATA.read_text().splitlines() if line.strip()]
    assert len(rows) >= 150
    assert sum(1 for r in rows if not r["expected"]) >= 40  # near-miss negatives
    tp = fp = fn = 0
    for row in rows:
        expected = Counter((e["series"], e["image"], e["image_end"]) for e in row["expected"])
        found = Counter(refs_of(row["text"]))
        hit = sum((expected & found).values())
        tp, fp, fn = tp + hit, fp + sum(found.values()) - hit, fn + sum(expected.values()) - hit
    precision, recall = tp / (tp + fp), tp / (tp + fn)
    assert precision >= 0.95 and recall >= 0.95, (precision, recall)


@pytest.mark.parametrize(("text", "want"), [
    ("There is a 13 mm solid pulmonary nodule in the right upper lobe", ("Lung nodule",)),
    ("Ground-glass nodule measuring 15 mm in the left upper lobe", ("Lung nodule",)),
    ("A nodule and a ground-glass opacity in the right lower lobe", ("Lung nodule", "Lung opacity")),
    ("Increased density consistent with ground-glass opacity", ("Lung opacity",)),  # 'consistent' is no stent
    ("Calcific plaques in the coronary arteries", ("Coronary artery wall calcification",)),
    ("Calcified plaques in the coronary arteries and the aorta",
     ("Arterial wall calcification", "Coronary artery wall calcification")),
    ("Paraseptal emphysematous changes in both lungs", ("Emphysema",)),
    ("Smooth interlobular septal thickening", ("Interlobular septal thickening",)),
    ("Enlarged right paratracheal lymph node with a short axis of 26 mm", ("Lymphadenopathy",)),
    ("There is a moderate left pleural effusion", ("Pleural effusion",)),
    ("Pericardial effusion measuring 12 mm", ("Pericardial effusion",)),
    ("A central venous catheter tip in the SVC", ("Medical material",)),
    ("The trachea is midline", ()),
])
def test_snippet_labels_name_the_ct_rate_labels(text, want):
    from ctvl.prompts import snippet_labels

    assert snippet_labels(text) == want
