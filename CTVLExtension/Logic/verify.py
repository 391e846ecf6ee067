"""Snippet verification session (Qt-free): rows, navigation, key shortcuts, counters, decisions.

The Slicer widget shows `VerifySession.rows` in a table, forwards key presses to `VerifySession.handle_key`,
and moves the slice views with `ctvl.scene` when the current row changes. Every decision goes straight to an
`ctvl.annotations.AnnotationStore` (append + fsync), so closing Slicer at any time loses nothing; reopening the
same volume + report resumes at the first unverified row.
"""

from __future__ import annotations

import csv
import hashlib
import logging
import time
from collections import OrderedDict
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from ctvl.annotations import AnnotationStore, PairKey, make_record, pair_key
from ctvl.errors import CTVLInputError

log = logging.getLogger(__name__)

# Plain arrow keys already step slices in Slicer's slice views, so rows move with N/P (or Alt+arrows).
SHORTCUTS: dict[str, str] = {
    "A": "accept",
    "R": "reject",
    "C": "correct",
    "N": "next",
    "P": "previous",
    "Alt+Right": "next",
    "Alt+Left": "previous",
    "Alt+Down": "next",
    "Alt+Up": "previous",
}
TABLE_COLUMNS = ("Snippet", "Series", "Image", "Mined slice", "Model slice", "Model score", "Status")


@dataclass
class VerifyRow:
    """One mined reference of the report and its verification state."""

    snippet: str
    series: int | None
    image: int
    mined_slice: int | None  # None when the image number does not fit the volume (see ``problem``)
    model_slice: int | None = None
    model_score: float | None = None
    status: str | None = None  # None = not verified yet; else accepted | rejected | corrected
    verified_slice: int | None = None
    comment: str = ""
    problem: str = ""

    @property
    def done(self) -> bool:
        return self.status is not None

    @property
    def agrees(self) -> bool | None:
        """Whether the model's top slice equals the mined slice (None if either is unknown)."""
        if self.model_slice is None or self.mined_slice is None:
            return None
        return self.model_slice == self.mined_slice

    def table_values(self) -> tuple[str, ...]:
        """Display strings, in `TABLE_COLUMNS` order."""

        def show(value: Any) -> str:
            return "" if value is None else str(value)

        status = self.status or ("to do" if not self.problem else f"to do ({self.problem})")
        if self.status == "corrected":
            status = f"corrected -> {self.verified_slice}"
        score = "" if self.model_score is None else f"{self.model_score:.3f}"
        return (self.snippet, show(self.series), show(self.image), show(self.mined_slice), show(self.model_slice),
                score, status)


# --------------------------------------------------------------------------------------------------- reports


def report_id_for_text(text: str) -> str:
    """A stable id for pasted report text (``text-<sha1 prefix>``)."""
    digest = hashlib.sha1(" ".join(text.split()).encode("utf-8")).hexdigest()[:12]
    return f"text-{digest}"


def report_text_from_row(row: dict[str, Any]) -> str:
    """The mined text of a CT-RATE reports CSV row: the columns `ctvl mine` reads (Findings, Impressions)."""
    from ctvl.snippets import REPORT_COLUMNS

    parts = [str(row.get(column) or "").strip() for column in REPORT_COLUMNS]
    return "\n".join(p for p in parts if p and p.lower() != "nan")


def read_report(path: str | Path, volume_name: str | None = None) -> tuple[str, str]:
    """(report_id, text) from a .txt report (id = file stem) or a CT-RATE reports CSV row (id = VolumeName
    without extension, as `ctvl mine` writes it; the row whose VolumeName matches ``volume_name``, else the
    first). Raises `CTVLInputError` for a missing file or row.
    """
    path = Path(path)
    if not path.is_file():
        raise CTVLInputError(path, "report file not found", "choose a .txt report or a CT-RATE reports CSV")
    if path.suffix.lower() != ".csv":
        text = path.read_text(encoding="utf-8", errors="replace")
        if not text.strip():
            raise CTVLInputError(path, "report is empty", "choose a file with report text")
        return path.stem, text
    with open(path, newline="", encoding="utf-8", errors="replace") as handle:
        reader = csv.DictReader(handle)
        if not reader.fieldnames or "VolumeName" not in reader.fieldnames:
            raise CTVLInputError(path, "no VolumeName column", "expected a CT-RATE reports CSV")
        wanted = _volume_stem(volume_name) if volume_name else None
        for row in reader:
            name = (row.get("VolumeName") or "").strip()
            if name and (wanted is None or _volume_stem(name) == wanted):
                return _volume_stem(name), report_text_from_row(row)
    raise CTVLInputError(path, f"no report for volume {volume_name!r}", "pick the CSV row by its VolumeName")


def _volume_stem(name: str) -> str:
    name = Path(name).name
    for suffix in (".nii.gz", ".nii", ".nrrd", ".mha", ".mhd", ".nhdr"):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name


# --------------------------------------------------------------------------------------------------- rows


def rows_from_report(
    text: str,
    n_slices: int,
    slices_toward_superior: bool,
    *,
    instance_numbers: list[int] | None = None,
    convention: str = "superior_first",
) -> list[VerifyRow]:
    """Mine the report's image references and map each to a slice of the volume (one row per distinct pair).

    References whose image does not fit the volume keep ``mined_slice=None`` and a ``problem`` note: the
    annotator can still correct (pick the slice) or reject them.
    """
    from ctvl import snippets

    rows: list[VerifyRow] = []
    seen: set[tuple] = set()
    for ref in snippets.mine_references(text):
        key = (ref.series, ref.image, ref.snippet)
        if key in seen:
            continue
        seen.add(key)
        problem = ""
        if getattr(ref, "plane", None) in ("coronal", "sagittal"):
            rows.append(VerifyRow(snippet=ref.snippet, series=ref.series, image=ref.image, mined_slice=None,
                                  problem=f"{ref.plane} image"))
            continue
        try:
            if instance_numbers is not None:
                mined = snippets.image_to_slice_dicom(ref.image, instance_numbers)
            else:
                mined = snippets.image_to_slice(ref.image, n_slices, slices_toward_superior, convention=convention)
        except CTVLInputError as exc:
            mined, problem = None, exc.problem
        rows.append(VerifyRow(snippet=ref.snippet, series=ref.series, image=ref.image, mined_slice=mined,
                              problem=problem))
    return rows


def add_model_predictions(rows: list[VerifyRow], encoding: Any) -> None:
    """Fill ``model_slice``/``model_score`` from a `ctvl.inference.VolumeEncoding` (``locate(text, top_k=1)``)."""
    for row in rows:
        hits = encoding.locate(row.snippet, top_k=1)
        if hits:
            row.model_slice = int(hits[0].slice)
            row.model_score = float(hits[0].score)


# --------------------------------------------------------------------------------------------------- session


class VerifySession:
    """Rows of one volume + report, the current row, and decisions written through an `AnnotationStore`.

    ``on_change(session)`` (optional) is called after every navigation or decision, so a GUI can refresh.
    """

    def __init__(
        self,
        store: AnnotationStore | None,
        volume: str,
        report_id: str,
        rows: list[VerifyRow],
        *,
        n_slices: int | None = None,
        annotator: str | None = None,
        on_change: Callable[[VerifySession], None] | None = None,
    ) -> None:
        if not volume or not report_id:
            raise CTVLInputError(None, "verification needs a volume name and a report id")
        self.store = store
        self.volume = volume
        self.report_id = report_id
        self.rows = rows
        self.n_slices = n_slices
        self.annotator = annotator if annotator is not None else (store.annotator if store else "")
        self.on_change = on_change
        self.index = 0
        if store is not None:
            self.load_state(store.state())
        self.index = self.first_unverified()

    # -- state
    def row_key(self, row: VerifyRow) -> PairKey:
        return pair_key({"volume": self.volume, "report_id": self.report_id, "series": row.series,
                         "image": row.image, "snippet": row.snippet})

    def load_state(self, state: dict[PairKey, dict[str, Any]]) -> None:
        """Apply the latest decision per pair (from an annotation log) to the rows."""
        for row in self.rows:
            record = state.get(self.row_key(row))
            if record is not None:
                row.status = record["status"]
                row.verified_slice = record.get("verified_slice")
                row.comment = record.get("comment", "") or ""

    @property
    def total(self) -> int:
        return len(self.rows)

    @property
    def done(self) -> int:
        return sum(row.done for row in self.rows)

    @property
    def remaining(self) -> int:
        return self.total - self.done

    def counter_text(self) -> str:
        return f"{self.done} done, {self.remaining} remaining of {self.total}"

    @property
    def current(self) -> VerifyRow | None:
        return self.rows[self.index] if self.rows else None

    def first_unverified(self, start: int = 0) -> int:
        """Index of the first row without a decision at or after ``start`` (wrapping); last row if all done."""
        n = len(self.rows)
        for offset in range(n):
            i = (start + offset) % n
            if not self.rows[i].done:
                return i
        return max(0, min(start, n - 1))

    # -- navigation
    def _changed(self) -> None:
        if self.on_change is not None:
            self.on_change(self)

    def select(self, index: int) -> VerifyRow | None:
        if self.rows:
            self.index = max(0, min(int(index), len(self.rows) - 1))
        self._changed()
        return self.current

    def next(self) -> VerifyRow | None:
        return self.select(self.index + 1)

    def previous(self) -> VerifyRow | None:
        return self.select(self.index - 1)

    # -- decisions
    def _decide(self, status: str, verified_slice: int | None, comment: str | None, advance: bool) -> dict[str, Any]:
        row = self.current
        if row is None:
            raise CTVLInputError(None, "no snippet to verify", "load a report with image references first")
        record = make_record(
            volume=self.volume,
            report_id=self.report_id,
            snippet=row.snippet,
            series=row.series,
            image=row.image,
            mined_slice=row.mined_slice,
            verified_slice=verified_slice,
            status=status,
            model_slice=row.model_slice,
            annotator=self.annotator,
            comment=comment if comment is not None else (row.comment or None),
        )
        if self.store is not None:
            self.store.append(record)  # durable before the row changes state
        row.status = status
        row.verified_slice = record["verified_slice"]
        row.comment = record.get("comment", "")
        if advance and self.remaining:
            self.index = self.first_unverified(self.index + 1)
        self._changed()
        return record

    def accept(self, comment: str | None = None, advance: bool = True) -> dict[str, Any]:
        """The mined slice is right."""
        row = self.current
        if row is not None and row.mined_slice is None:
            raise CTVLInputError(None, f"image {row.image} has no mined slice ({row.problem or 'out of range'})",
                                 "use Correct at the right slice, or Reject")
        return self._decide("accepted", None if row is None else row.mined_slice, comment, advance)

    def reject(self, comment: str | None = None, advance: bool = True) -> dict[str, Any]:
        """The snippet does not describe any slice it could point to: drop the pair."""
        return self._decide("rejected", None, comment, advance)

    def correct(self, slice_index: int, comment: str | None = None, advance: bool = True) -> dict[str, Any]:
        """The snippet describes ``slice_index`` (the slice the annotator is looking at)."""
        slice_index = int(slice_index)
        if slice_index < 0 or (self.n_slices is not None and slice_index >= self.n_slices):
            raise CTVLInputError(None, f"slice {slice_index} is outside the volume (0..{(self.n_slices or 1) - 1})",
                                 "move the red slice view onto the volume")
        return self._decide("corrected", slice_index, comment, advance)

    def handle_key(
        self, key: str, current_slice: Callable[[], int] | int | None = None, comment: str | None = None
    ) -> str | None:
        """Run the action bound to ``key`` (see `SHORTCUTS`); returns its name, or None if the key is unbound.

        ``current_slice`` (int or callable) is needed only for "correct".
        """
        action = SHORTCUTS.get(key) or SHORTCUTS.get(key.upper())
        if action is None:
            return None
        if action == "accept":
            self.accept(comment)
        elif action == "reject":
            self.reject(comment)
        elif action == "correct":
            value = current_slice() if callable(current_slice) else current_slice
            if value is None:
                raise CTVLInputError(None, "no current slice to use", "show the volume in the red slice view")
            self.correct(int(value), comment)
        elif action == "next":
            self.next()
        else:
            self.previous()
        return action


# --------------------------------------------------------------------------------------------------- batch


@dataclass
class AgreementStats:
    """Counts of `with_model_predictions`."""

    volumes_encoded: int = 0
    volumes_missing: int = 0
    records: int = 0
    predicted: int = 0
    compared: int = 0
    agree: int = 0
    encode_s: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        out = dict(self.__dict__)
        out["agreement"] = round(self.agree / self.compared, 4) if self.compared else None
        return out


def with_model_predictions(
    records: Iterable[dict[str, Any]],
    volumes_root: str | Path,
    encode_fn: Callable[[Any], Any],
    *,
    tolerance_mm: float = 10.0,
    stats: AgreementStats | None = None,
    read_fn: Callable[[Path], Any] | None = None,
) -> Iterator[dict[str, Any]]:
    """Add the model's predicted slice to mined records (from `ctvl.snippets.mine_reports_csv`), streaming.

    Each volume is read and encoded once (``encode_fn(Volume) -> VolumeEncoding``; records of a CT-RATE CSV come
    grouped by volume, and a few recent encodings are kept). Adds ``model_slice``, ``model_score``,
    ``model_position_mm``, and when the record has a mined ``slice``: ``model_error_mm`` (|S difference|),
    ``model_error_slices`` and ``agree`` (error <= ``tolerance_mm``). A volume that cannot be found or read gets
    ``model_problem`` instead; the record is still yielded.
    """
    from ctvl.snippets import VolumeSliceMapper

    if read_fn is None:
        from ctvl.io import read_volume as read_fn
    mapper = VolumeSliceMapper(volumes_root)
    stats = stats if stats is not None else AgreementStats()
    cache: OrderedDict[str, tuple[Any, str]] = OrderedDict()  # volume -> (encoding or None, problem)

    def encoding_for(volume: str) -> tuple[Any, str]:
        if volume in cache:
            cache.move_to_end(volume)
            return cache[volume]
        path = mapper.find(volume)
        if path is None:
            stats.volumes_missing += 1
            log.warning("%s: volume not found under %s", volume, volumes_root)
            entry: tuple[Any, str] = (None, "volume not found")
        else:
            try:
                t0 = time.perf_counter()
                entry = (encode_fn(read_fn(path)), "")
                stats.encode_s += time.perf_counter() - t0
                stats.volumes_encoded += 1
            except CTVLInputError as exc:
                stats.volumes_missing += 1
                log.warning("%s", exc)
                entry = (None, exc.problem)
        cache[volume] = entry
        while len(cache) > 4:
            cache.popitem(last=False)
        return entry

    for record in records:
        stats.records += 1
        encoding, problem = encoding_for(record["volume"])
        if encoding is None:
            yield {**record, "model_slice": None, "model_score": None, "model_problem": problem}
            continue
        hits = encoding.locate(record["snippet"], top_k=1)
        if not hits:
            yield {**record, "model_slice": None, "model_score": None, "model_problem": "no prediction"}
            continue
        hit = hits[0]
        out = {**record, "model_slice": int(hit.slice), "model_score": round(float(hit.score), 6),
               "model_position_mm": round(float(hit.position_mm), 3)}
        stats.predicted += 1
        mined = record.get("slice")
        positions = encoding.volume.slice_positions_mm()
        if mined is not None and 0 <= int(mined) < len(positions):
            error = abs(float(positions[int(mined)]) - float(hit.position_mm))
            out["model_error_mm"] = round(error, 3)
            out["model_error_slices"] = abs(int(mined) - int(hit.slice))
            out["agree"] = bool(error <= tolerance_mm)
            stats.compared += 1
            stats.agree += int(out["agree"])
        yield out


def disagreement_key(record: dict[str, Any]) -> tuple[int, float]:
    """Sort key, most doubtful first: mined image outside the volume (but the model has a slice), then the
    largest model-vs-mined distance, then records without a model prediction."""
    if record.get("model_slice") is None:
        return (2, 0.0)
    if record.get("model_error_mm") is None:
        return (0, 0.0)
    return (1, -float(record["model_error_mm"]))


def sort_by_disagreement(records: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """Records ordered by `disagreement_key` (stable: ties keep CSV order)."""
    return sorted(records, key=disagreement_key)
