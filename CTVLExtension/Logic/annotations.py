"""Snippet-verification annotations: an append-only, crash-safe JSON Lines store.

One record per decision (schema in DESIGN.md "Annotations")::

    {"volume", "report_id", "snippet", "series", "image", "mined_slice", "verified_slice",
     "status": "accepted|rejected|corrected", "model_slice", "annotator", "time"}  (+ optional "comment")

- **Append**: one ``os.write`` of a complete line (``O_APPEND``), then ``fsync``; a crash loses at most the
  decision being written, never an earlier one.
- **Read**: a torn last line (no newline, not valid JSON) is ignored; `AnnotationStore` repairs it on open by
  moving the torn bytes to ``<file>.torn-<time>`` and truncating, so later appends start on a clean line.
- **State**: the log is never rewritten; the current decision for a pair is its last record (file order), the
  earlier ones are its history. Pair key = (volume, report_id, series, image, snippet).
- **One writer**: a session holds ``<file>.lock`` (``fcntl.flock``, released by the OS if the process dies);
  a second session is refused with an error naming the holder, or waits up to ``wait_s`` (serialized).
- **Export**: the current accepted/corrected records (same schema, one per pair), written atomically; this is
  what `training.data` reads through `load_verified_pairs`.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import time
from collections.abc import Iterable, Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from ctvl.atomic import atomic_file, fsync_dir
from ctvl.errors import CTVLInputError

try:  # POSIX; Windows falls back to an O_EXCL lock file
    import fcntl
except ImportError:  # pragma: no cover - exercised only on Windows
    fcntl = None  # type: ignore[assignment]

log = logging.getLogger(__name__)

STATUSES = ("accepted", "rejected", "corrected")
FIELDS = (
    "volume",
    "report_id",
    "snippet",
    "series",
    "image",
    "mined_slice",
    "verified_slice",
    "status",
    "model_slice",
    "annotator",
    "time",
)
OPTIONAL_FIELDS = ("comment",)
KEY_FIELDS = ("volume", "report_id", "series", "image", "snippet")

PairKey = tuple


def now_iso() -> str:
    """UTC time stamp, ISO 8601 with milliseconds (``2024-05-01T12:00:00.123+00:00``)."""
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


def pair_key(record: dict[str, Any]) -> PairKey:
    """The identity of a snippet-slice pair: (volume, report_id, series, image, snippet)."""
    return tuple(record.get(name) for name in KEY_FIELDS)


def make_record(
    *,
    volume: str,
    report_id: str,
    snippet: str,
    series: int | None,
    image: int,
    mined_slice: int | None,
    status: str,
    verified_slice: int | None = None,
    model_slice: int | None = None,
    annotator: str = "",
    time: str | None = None,
    comment: str | None = None,
) -> dict[str, Any]:
    """A validated decision record. ``verified_slice`` defaults to the mined slice when accepted, None if rejected."""
    if status == "accepted" and verified_slice is None:
        verified_slice = mined_slice
    if status == "rejected":
        verified_slice = None
    record: dict[str, Any] = {
        "volume": volume,
        "report_id": report_id,
        "snippet": snippet,
        "series": series,
        "image": image,
        "mined_slice": mined_slice,
        "verified_slice": verified_slice,
        "status": status,
        "model_slice": model_slice,
        "annotator": annotator,
        "time": time or now_iso(),
    }
    if comment:
        record["comment"] = comment
    validate_record(record)
    return record


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def validate_record(record: dict[str, Any], source: str | Path | None = None) -> None:
    """Raise `CTVLInputError` unless ``record`` follows the annotation schema."""
    where = source or "annotation record"
    missing = [name for name in FIELDS if name not in record]
    if missing:
        raise CTVLInputError(where, f"missing field(s) {', '.join(missing)}", "see DESIGN.md 'Annotations'")
    if record["status"] not in STATUSES:
        raise CTVLInputError(where, f"status {record['status']!r} is not one of {', '.join(STATUSES)}")
    for name in ("volume", "report_id", "snippet"):
        if not isinstance(record[name], str) or not record[name]:
            raise CTVLInputError(where, f"{name} must be a non-empty string")
    if not _is_int(record["image"]):
        raise CTVLInputError(where, f"image must be an integer, got {record['image']!r}")
    for name in ("series", "mined_slice", "model_slice"):
        if record[name] is not None and not _is_int(record[name]):
            raise CTVLInputError(where, f"{name} must be an integer or null, got {record[name]!r}")
    verified = record["verified_slice"]
    if record["status"] == "rejected":
        if verified is not None:
            raise CTVLInputError(where, "a rejected pair has no verified_slice", "set it to null")
    elif not _is_int(verified) or verified < 0:
        raise CTVLInputError(where, f"{record['status']} needs a verified_slice >= 0, got {verified!r}")


# --------------------------------------------------------------------------------------------------- reading


def _parse_lines(data: bytes, source: Path) -> tuple[list[dict[str, Any]], int]:
    """Records in ``data`` and the byte length of its clean part (up to the last good line).

    A final line without newline that does not parse is a torn write: it is left out. A bad line in the
    middle (not ours; e.g. an editor) is skipped with a warning so that later records still count.
    """
    records: list[dict[str, Any]] = []
    offset = 0
    clean_end = 0
    for raw in data.splitlines(keepends=True):
        offset += len(raw)
        complete = raw.endswith(b"\n")
        text = raw.strip()
        if not text:
            if complete:
                clean_end = offset
            continue
        try:
            record = json.loads(text.decode("utf-8"))
            if not isinstance(record, dict):
                raise ValueError("not an object")
        except (ValueError, UnicodeDecodeError):
            if complete:
                log.warning("%s: skipping malformed line at byte %d", source, offset - len(raw))
                clean_end = offset
            else:
                log.warning("%s: ignoring torn last line (%d bytes, no newline)", source, len(raw))
            continue
        records.append(record)
        clean_end = offset
    return records, clean_end


def read_records(path: str | Path) -> list[dict[str, Any]]:
    """All decision records of an annotation file in file order; a missing file is an empty log."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return []
    except OSError as exc:
        raise CTVLInputError(path, f"cannot read annotations ({exc.strerror})", "check the path and permissions") \
            from exc
    records, _ = _parse_lines(data, path)
    return records


def current_state(records: Iterable[dict[str, Any]]) -> dict[PairKey, dict[str, Any]]:
    """The last record per pair key (later records override earlier ones; history stays in the log)."""
    state: dict[PairKey, dict[str, Any]] = {}
    for record in records:
        key = pair_key(record)
        state.pop(key, None)  # keep dict order = order of the latest decision
        state[key] = record
    return state


def history(records: Iterable[dict[str, Any]], key: PairKey) -> list[dict[str, Any]]:
    """Every decision ever recorded for one pair, oldest first."""
    return [r for r in records if pair_key(r) == key]


def _read_many(paths: str | Path | Iterable[str | Path]) -> list[dict[str, Any]]:
    if isinstance(paths, (str, Path)):
        return read_records(paths)
    records: list[dict[str, Any]] = []
    for path in paths:
        records.extend(read_records(path))
    # several files (annotators): order by time, stable, so each file's own order breaks ties
    records.sort(key=lambda r: str(r.get("time", "")))
    return records


def load_verified_pairs(path: str | Path | Iterable[str | Path]) -> list[dict[str, Any]]:
    """Training-ready pairs from an annotation log or an export (same schema), or several of them.

    Returns the current accepted/corrected records (rejected pairs dropped), one per pair key, each with
    ``verified_slice`` (int, 0-based input slice) and an added ``slice`` (= verified_slice) for convenience.
    Records that do not follow the schema are skipped with a warning.
    """
    pairs = []
    for key, record in current_state(_read_many(path)).items():
        try:
            validate_record(record)
        except CTVLInputError as exc:
            log.warning("skipping invalid annotation %s: %s", key, exc)
            continue
        if record["status"] == "rejected":
            continue
        pairs.append({**record, "slice": record["verified_slice"]})
    return pairs


def apply_verified(
    candidates: Iterable[dict[str, Any]], verified: str | Path | Iterable[dict[str, Any]]
) -> list[dict[str, Any]]:
    """Merge mined candidate pairs with verification decisions (for training data).

    ``candidates`` are mined records with the key fields and ``mined_slice`` (or ``slice``). A candidate whose
    pair was rejected is dropped; accepted/corrected ones take ``verified_slice``; unverified ones keep the mined
    slice. Each output has ``slice`` and ``status`` ("mined" when nobody checked it). Pairs verified but not
    among the candidates are appended.
    """
    decisions = current_state(read_records(verified) if isinstance(verified, (str, Path)) else verified)
    out = []
    seen = set()
    for candidate in candidates:
        key = pair_key(candidate)
        seen.add(key)
        decision = decisions.get(key)
        if decision is None:
            mined = candidate.get("mined_slice", candidate.get("slice"))
            if mined is None:
                continue
            out.append({**candidate, "slice": mined, "status": candidate.get("status", "mined")})
        elif decision["status"] != "rejected":
            out.append({**candidate, **decision, "slice": decision["verified_slice"]})
    for key, decision in decisions.items():
        if key not in seen and decision["status"] != "rejected" and decision.get("verified_slice") is not None:
            out.append({**decision, "slice": decision["verified_slice"]})
    return out


# --------------------------------------------------------------------------------------------------- writing


def write_jsonl_atomic(path: str | Path, records: Iterable[dict[str, Any]]) -> int:
    """Write records as JSON Lines to ``path`` atomically (temp in same dir + fsync + rename). Returns count."""
    count = 0
    with atomic_file(path, "w", encoding="utf-8", newline="\n") as handle:
        for record in records:
            handle.write(json.dumps(record, ensure_ascii=False) + "\n")
            count += 1
    return count


def export_verified(annotations: str | Path | Iterable[str | Path], out_path: str | Path) -> int:
    """Export the current verified pairs (accepted/corrected) as JSON Lines, atomically. Returns the count."""
    pairs = [{k: v for k, v in p.items() if k != "slice"} for p in load_verified_pairs(annotations)]
    return write_jsonl_atomic(out_path, pairs)


class AnnotationLockedError(CTVLInputError):
    """Another session holds the annotation file's lock."""


class AnnotationStore:
    """An open annotation log: holds the lock, repairs a torn tail, appends decisions durably.

    Use as a context manager, or call `close()`. ``wait_s`` > 0 waits that long for another writer to finish
    (serialized); 0 refuses at once with `AnnotationLockedError` naming the holder.
    """

    def __init__(self, path: str | Path, annotator: str = "", wait_s: float = 0.0) -> None:
        self.path = Path(path)
        self.annotator = annotator
        self.lock_path = self.path.with_name(self.path.name + ".lock")
        self._lock_fd: int | None = None
        self._fd: int | None = None
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._acquire_lock(wait_s)
        try:
            self.repaired = self._repair()
            created = not self.path.exists()
            self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | getattr(os, "O_BINARY", 0), 0o644)
            if created:
                fsync_dir(self.path.parent)
            self.records = read_records(self.path)
        except BaseException:
            self.close()
            raise

    # -- lock
    def _holder_text(self) -> str:
        try:
            info = json.loads(self.lock_path.read_text(encoding="utf-8"))
            return f"{info.get('annotator') or 'unknown annotator'} (pid {info.get('pid')} on {info.get('host')}, " \
                   f"since {info.get('since')})"
        except (OSError, ValueError):
            return "another process"

    def _lock_info(self) -> bytes:
        info = {"pid": os.getpid(), "host": socket.gethostname(), "annotator": self.annotator, "since": now_iso()}
        return json.dumps(info).encode("utf-8")

    def _acquire_lock(self, wait_s: float) -> None:
        deadline = time.monotonic() + max(0.0, wait_s)
        while True:
            if self._try_lock():
                return
            if time.monotonic() >= deadline:
                raise AnnotationLockedError(
                    self.path,
                    f"in use by {self._holder_text()}",
                    "finish or close that session first (one writer per annotation file)",
                )
            time.sleep(0.05)

    def _try_lock(self) -> bool:
        if fcntl is not None:
            fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                os.close(fd)
                return False
            os.ftruncate(fd, 0)
            os.write(fd, self._lock_info())
            self._lock_fd = fd
            return True
        try:  # pragma: no cover - Windows
            fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:  # pragma: no cover
            return False
        os.write(fd, self._lock_info())  # pragma: no cover
        self._lock_fd = fd  # pragma: no cover
        return True  # pragma: no cover

    def _release_lock(self) -> None:
        if self._lock_fd is None:
            return
        fd, self._lock_fd = self._lock_fd, None
        with contextlib.suppress(OSError):
            os.ftruncate(fd, 0)
        if fcntl is not None:
            with contextlib.suppress(OSError):
                fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)
        else:  # pragma: no cover - Windows: the lock is the file itself
            os.close(fd)
            with contextlib.suppress(OSError):
                os.unlink(self.lock_path)

    # -- repair
    def _repair(self) -> bool:
        """Cut a torn last line (saved aside to ``<file>.torn-<time>``); terminate a complete unterminated one."""
        try:
            data = self.path.read_bytes()
        except FileNotFoundError:
            return False
        if not data or data.endswith(b"\n"):
            return False
        _, clean_end = _parse_lines(data, self.path)
        with open(self.path, "r+b") as handle:
            if clean_end == len(data):  # last line is a complete record that only lacks its newline
                handle.seek(0, os.SEEK_END)
                handle.write(b"\n")
            else:
                torn = data[clean_end:]
                stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S%f")
                aside = self.path.with_name(f"{self.path.name}.torn-{stamp}")
                aside.write_bytes(torn)
                log.warning("%s: removed a torn last line (%d bytes), kept in %s", self.path, len(torn), aside)
                handle.truncate(clean_end)
            handle.flush()
            os.fsync(handle.fileno())
        return True

    # -- API
    def append(self, record: dict[str, Any]) -> dict[str, Any]:
        """Validate and durably append one decision (single write + fsync). Returns the record."""
        if self._fd is None:
            raise CTVLInputError(self.path, "annotation store is closed", "open it again")
        if not record.get("annotator") and self.annotator:
            record = {**record, "annotator": self.annotator}
        validate_record(record)
        line = (json.dumps(record, ensure_ascii=False) + "\n").encode("utf-8")
        size_before = os.fstat(self._fd).st_size
        written = os.write(self._fd, line)
        if written != len(line):  # should not happen for regular files; never leave a torn line behind
            os.ftruncate(self._fd, size_before)
            raise CTVLInputError(self.path, f"short write ({written} of {len(line)} bytes)", "check the disk space")
        os.fsync(self._fd)
        self.records.append(record)
        return record

    def decide(self, **fields: Any) -> dict[str, Any]:
        """`make_record` with this store's annotator, then `append`."""
        fields.setdefault("annotator", self.annotator)
        return self.append(make_record(**fields))

    def state(self) -> dict[PairKey, dict[str, Any]]:
        return current_state(self.records)

    def close(self) -> None:
        if self._fd is not None:
            fd, self._fd = self._fd, None
            os.close(fd)
        self._release_lock()

    @property
    def closed(self) -> bool:
        return self._fd is None

    def __enter__(self) -> AnnotationStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:  # pragma: no cover - safety net
        with contextlib.suppress(Exception):
            self.close()


def iter_report_records(records: Iterable[dict[str, Any]], volume: str, report_id: str) -> Iterator[dict[str, Any]]:
    """Records of one volume + report, in file order."""
    for record in records:
        if record.get("volume") == volume and record.get("report_id") == report_id:
            yield record
