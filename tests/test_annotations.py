"""The annotation store: append, state/history, torn lines, killed writers, locking, export."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
from ctvl import annotations as ann
from ctvl.errors import CTVLInputError


def rec(image: int = 10, status: str = "accepted", **kw) -> dict:
    fields = dict(volume="train_1_a_1.nii.gz", report_id="train_1_a_1.nii.gz", snippet=f"nodule (image {image})",
                  series=3, image=image, mined_slice=50, status=status, model_slice=48, annotator="ann")
    fields.update(kw)
    return ann.make_record(**fields)


def test_make_record_schema_and_validation():
    r = rec()
    assert set(ann.FIELDS) <= set(r) and r["verified_slice"] == 50
    assert rec(status="rejected")["verified_slice"] is None
    assert rec(status="corrected", verified_slice=7, comment="lower")["comment"] == "lower"
    with pytest.raises(CTVLInputError, match="status"):
        rec(status="maybe")
    with pytest.raises(CTVLInputError, match="verified_slice"):
        rec(status="corrected")
    with pytest.raises(CTVLInputError, match="image"):
        rec(image="5")  # type: ignore[arg-type]


def test_append_state_history(tmp_path):
    path = tmp_path / "a.jsonl"
    with ann.AnnotationStore(path, annotator="ann") as store:
        store.append(rec(10))
        store.append(rec(11, status="rejected"))
        store.append(rec(10, status="corrected", verified_slice=52))  # changes its mind: latest wins
    lines = path.read_bytes().splitlines()
    assert len(lines) == 3 and all(json.loads(x) for x in lines)
    records = ann.read_records(path)
    state = ann.current_state(records)
    assert len(state) == 2
    key = ann.pair_key(rec(10))
    assert state[key]["status"] == "corrected" and state[key]["verified_slice"] == 52
    assert [r["status"] for r in ann.history(records, key)] == ["accepted", "corrected"]
    # reopening appends, never rewrites
    with ann.AnnotationStore(path) as store:
        assert len(store.records) == 3
        store.append(rec(12))
    assert path.read_bytes().startswith(b"\n".join(lines))


def test_torn_last_line_is_ignored_then_repaired(tmp_path):
    path = tmp_path / "a.jsonl"
    with ann.AnnotationStore(path) as store:
        store.append(rec(10))
        store.append(rec(11))
    good = path.read_bytes()
    torn = json.dumps(rec(12)).encode()[:37]
    path.write_bytes(good + torn)  # crash in the middle of a write
    assert [r["image"] for r in ann.read_records(path)] == [10, 11]
    r13 = rec(13)
    with ann.AnnotationStore(path) as store:
        assert store.repaired
        store.append(r13)
    assert [r["image"] for r in ann.read_records(path)] == [10, 11, 13]
    assert path.read_bytes() == good + (json.dumps(r13, ensure_ascii=False) + "\n").encode()
    aside = list(tmp_path.glob("a.jsonl.torn-*"))
    assert len(aside) == 1 and aside[0].read_bytes() == torn


def test_complete_last_line_without_newline_is_kept(tmp_path):
    path = tmp_path / "a.jsonl"
    path.write_text(json.dumps(rec(10)) + "\n" + json.dumps(rec(11)))
    with ann.AnnotationStore(path) as store:
        store.append(rec(12))
    assert [r["image"] for r in ann.read_records(path)] == [10, 11, 12]


def test_malformed_middle_line_skipped(tmp_path):
    path = tmp_path / "a.jsonl"
    path.write_text(json.dumps(rec(10)) + "\n{oops\n\n" + json.dumps(rec(11)) + "\n")
    assert [r["image"] for r in ann.read_records(path)] == [10, 11]
    assert ann.read_records(tmp_path / "missing.jsonl") == []


WRITER = textwrap.dedent(
    """
    import sys, time
    from ctvl import annotations as ann
    store = ann.AnnotationStore(sys.argv[1], annotator="killed")
    i = 0
    while True:
        store.decide(volume="v.nii.gz", report_id="r", snippet="s" * 2000 + str(i), series=None, image=i + 1,
                     mined_slice=i, status="accepted")
        i += 1
        if i == 5:
            print("ready", flush=True)
    """
)


def test_process_killed_mid_append(tmp_path):
    path = tmp_path / "a.jsonl"
    proc = subprocess.Popen([sys.executable, "-c", WRITER, str(path)], stdout=subprocess.PIPE)
    try:
        assert proc.stdout.readline().strip() == b"ready"
        time.sleep(0.2)
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
    records = ann.read_records(path)
    assert len(records) >= 5
    assert [r["image"] for r in records] == list(range(1, len(records) + 1))
    # the kernel dropped the lock with the process: a new session opens, repairs if needed, and appends
    with ann.AnnotationStore(path, annotator="next") as store:
        store.append(rec(99))
    after = ann.read_records(path)
    assert after[:-1] == records and after[-1]["image"] == 99


def test_second_writer_refused_with_holder_named(tmp_path):
    path = tmp_path / "a.jsonl"
    with ann.AnnotationStore(path, annotator="alice"), \
            pytest.raises(ann.AnnotationLockedError, match=r"in use by alice \(pid \d+"):
        ann.AnnotationStore(path, annotator="bob")
    with ann.AnnotationStore(path, annotator="bob"):  # free again after close
        pass


def test_concurrent_writers_serialized(tmp_path):
    path = tmp_path / "a.jsonl"
    code = textwrap.dedent(
        """
        import sys
        from ctvl import annotations as ann
        who = sys.argv[2]
        for i in range(20):
            with ann.AnnotationStore(sys.argv[1], annotator=who, wait_s=30) as store:
                store.decide(volume="v", report_id=who, snippet="s", series=1, image=i + 1, mined_slice=i,
                             status="accepted")
        """
    )
    procs = [subprocess.Popen([sys.executable, "-c", code, str(path), who]) for who in ("a", "b")]
    assert [p.wait(timeout=60) for p in procs] == [0, 0]
    records = ann.read_records(path)
    assert len(records) == 40 and len(path.read_bytes().splitlines()) == 40


def test_export_and_load_verified_pairs(tmp_path):
    path = tmp_path / "a.jsonl"
    with ann.AnnotationStore(path) as store:
        store.append(rec(10))
        store.append(rec(11, status="corrected", verified_slice=30))
        store.append(rec(12, status="rejected"))
        store.append(rec(10, status="rejected"))  # 10 finally rejected
    out = tmp_path / "export" / "verified.jsonl"
    assert ann.export_verified(path, out) == 1
    exported = [json.loads(x) for x in out.read_text().splitlines()]
    assert exported[0]["image"] == 11 and exported[0]["verified_slice"] == 30
    ann.validate_record(exported[0])  # same schema as the log
    assert not list(out.parent.glob(".*tmp"))
    pairs = ann.load_verified_pairs(out)
    assert [(p["image"], p["slice"]) for p in pairs] == [(11, 30)]
    assert ann.load_verified_pairs(path) == pairs


def test_apply_verified_overrides_mined(tmp_path):
    path = tmp_path / "a.jsonl"
    with ann.AnnotationStore(path) as store:
        store.append(rec(10, status="corrected", verified_slice=5))
        store.append(rec(11, status="rejected"))
    base = {"volume": "train_1_a_1.nii.gz", "report_id": "train_1_a_1.nii.gz", "series": 3}
    mined = [dict(base, image=i, snippet=f"nodule (image {i})", mined_slice=50 + i) for i in (10, 11, 12)]
    merged = ann.apply_verified(mined, path)
    assert [(m["image"], m["slice"], m["status"]) for m in merged] == [(10, 5, "corrected"), (12, 62, "mined")]
