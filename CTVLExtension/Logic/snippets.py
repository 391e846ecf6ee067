"""Mine image references ("series 3, image 45") from radiology reports and map image numbers to slices.

`mine_references(text)` finds every reference with the clause it belongs to (the *snippet*, with the reference
removed). Formats handled (case-insensitive, punctuation-tolerant):

- series then image: "(series 3, image 45)", "(se 3 im 45)", "Se 4 Im 112", "ser 2 img 64", "sr 3 im 50", "(SE3, IM45)",
  "(Se 3/Im 45)", "(Ser. 3/Img. 45)", "(Series:3, Image:45)", "series #3, image #45", "series 3 / image 45",
  "(series/image 4/112)", "(s3 i45)", "S3 I45", "S3/I45";
- image then series: "image 45 of series 3", "image 34, series 5", "(im 45, se 3)", "image 45 (series 3)";
- image only: "(image 45)", "on image 45", "image #155", "image no. 45", "image number 210", "(IMG 45)",
  "(im. 45)", "slice 45", "axial image 45", "coronal image 30" (plane kept in ``plane``);
- ranges and lists: "images 20-60", "images 20 through 60", "image 20 to 60", "from image 100 to image 140",
  "(series 3, images 20-25)", "images 145-52" (= 145-152), "images 45 and 67", "images 45, 52 and 67",
  "images 45/67/89" (one record per listed image);
- totals are ignored: "image 45 of 300", "image 112/300" (singular "image" + one slash), "series 3 image 45 of 340";
- bare "(3:45)" and "(3/102)": only inside brackets, alone or as a ";"/","-separated item, with series 1..20
  (`MAX_BARE_SERIES`), image 10..2000, and not a clock time (colon, two-digit series >= 10 with a two-digit
  image < 60, leading zeros, or am/pm/"at"/"time" around it) nor a date/fraction (slash, series <= 12 and
  image <= 31 after a date or score word such as "prior", "dated", "on", "from", "CT", "score", "grade"; image < 10
  is always taken as a ratio/fraction, a year-like image (1900-2099) after a month as a date);
- a bare "series N" mention earlier in the sentence ("On series 3, ... at image 45") gives its series to later
  image-only references of that sentence.

Not references: sizes ("3 x 4 mm", "3/4 cm"), times, dates, "120/80", vertebrae ("T3", "L1-L2"), segments
("segment 6", "S6"), "series of nodules", "prior images", "images were obtained", "Lung-RADS 3", "BI-RADS 4",
"category 4A", "grade 2/4", "1/3 of the lung", numbers followed by a unit ("slice 5 mm").

Image -> slice: `image_to_slice` (DESIGN convention: image 1 = most superior slice) and the DICOM-aware
`image_to_slice_dicom`. `mine_reports_csv` turns a CT-RATE reports CSV into candidate records.
"""

from __future__ import annotations

import csv
import logging
import os
import re
import sys
from bisect import bisect_left, bisect_right
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Optional

from ctvl.errors import CTVLInputError

log = logging.getLogger(__name__)

MAX_BARE_SERIES = 20
MAX_IMAGE = 2000
MIN_BARE_IMAGE = 10
CONVENTIONS = ("superior_first", "inferior_first", "file_order")
REPORT_COLUMNS = ("Findings_EN", "Impressions_EN")


@dataclass(frozen=True)
class ImageReference:
    """One image reference: ``span`` = (start, end) character offsets of the reference in the text."""

    snippet: str
    series: Optional[int]
    image: int
    image_end: int
    span: tuple[int, int]
    plane: Optional[str] = None  # "axial" | "coronal" | "sagittal" when the report names it

    def as_dict(self) -> dict:
        d = asdict(self)
        d["span"] = list(self.span)
        return d


# --- patterns ------------------------------------------------------------------------------------------------------

_S = r"\s{0,4}"  # bounded whitespace: no quadratic scans over long runs of spaces
_S1 = r"\s{1,4}"
_UNIT = (rf"(?!\d|[.,]\d|{_S}(?:[%×°]|x{_S}\d|(?:mm|cm|ml|cc|mgy|hu|kvp?|mas|years?|yrs?|months?|weeks?|days?"
         r"|hours?|hrs?|min|sec|bpm)\b))")
_NUM = r"\d{1,4}" + _UNIT
_RANGE_SEP = r"(?:-|–|—|to|through|thru|until)"
_IMG_WORD = r"(?:images?|imgs?|ima|ims?|slices?)"
_ITEM = rf"{_NUM}(?:{_S}{_RANGE_SEP}{_S}(?:{_IMG_WORD}\.?{_S})?{_NUM})?"
_HASH = rf"(?:#{_S})?"
# list continuations: ", 52" (must end at a delimiter), " and 67", "& 67", "/67" (separators never overlap)
_SPEC = (rf"{_HASH}{_ITEM}(?:{_S},(?:{_S}and)?{_S}{_HASH}{_ITEM}(?={_S}(?:[),;.\]]|and\b|&|$))"
         rf"|{_S1}and{_S1}{_HASH}{_ITEM}|{_S}&{_S}{_HASH}{_ITEM}|{_S}/{_S}{_HASH}{_ITEM})*")


def _plane_re(name: str) -> str:
    return rf"(?:(?P<{name}>axial|coronal|sagittal|ax|cor|sag)\.?{_S1})?"



_SER = rf"\b(?:series|ser|se|sr)\.?{_S}(?:(?:no\.?|number|nr\.?){_S})?:?{_S}#?{_S}"
_IMG = rf"\b(?P<kw>{_IMG_WORD})\.?{_S}(?:(?:no\.?|nr\.?|number|num\.?){_S})?:?{_S}"
_TOTAL = rf"(?:{_S}/{_S}\d{{1,4}}(?![\d/])|{_S1}of{_S1}\d{{1,4}}\b(?!{_S}[:/]))?"
_NOT_IMAGE_NEXT = rf"(?!{_S}[,/]?{_S}{_plane_re('p3')}{_IMG_WORD}\b)"

_P_SERIES_IMAGE = re.compile(
    _plane_re("plane") + _SER + rf"(?P<series>\d{{1,4}})(?!\d){_S}[,;:/]?{_S}(?:(?:on|at){_S1})?"
    + _plane_re("plane2") + _IMG + rf"(?P<spec>{_SPEC}){_TOTAL}",
    re.IGNORECASE,
)
_P_IMAGE_SERIES = re.compile(
    _plane_re("plane") + _IMG + rf"(?P<spec>{_SPEC}){_TOTAL}"
    + rf"{_S}(?:,|;|/|\bof\b|\bon\b|\bin\b|\bfrom\b)?{_S}(?:the{_S1})?(?P<paren>\({_S})?"
    + _plane_re("plane2") + _SER + rf"(?P<series>\d{{1,4}})(?!\d)(?(paren){_S}\))" + _NOT_IMAGE_NEXT,
    re.IGNORECASE,
)
_P_IMAGE = re.compile(_plane_re("plane") + _IMG + rf"(?P<spec>{_SPEC}){_TOTAL}", re.IGNORECASE)
_P_SLASH_PAIR = re.compile(  # "(series/image 4/112)"
    rf"\b(?:series|ser|se)\.?{_S}/{_S}(?:images?|imgs?|im)\.?{_S}:?{_S}(?P<series>\d{{1,4}}){_S}/{_S}"
    rf"(?P<spec>\d{{1,4}}){_UNIT}", re.IGNORECASE,
)
_P_COMPACT = re.compile(rf"\bS\s?(?P<series>\d{{1,3}}){_S}[,/]?{_S}I\s?(?P<spec>\d{{1,4}})\b{_UNIT}", re.IGNORECASE)
_P_BARE = re.compile(rf"(?<![\w.,/:\-])(?P<series>\d{{1,2}}){_S}(?P<sep>[:/]){_S}(?P<spec>\d{{1,4}})(?![\w/:]|[.,]\d)")
_P_SERIES_ALONE = re.compile(rf"\b(?:series|ser|se|sr)\.?{_S}:?{_S}#?{_S}(\d{{1,4}})\b(?!{_S}[:/]{_S}\d)",
                             re.IGNORECASE)
_P_ITEM = re.compile(rf"(\d{{1,4}})(?:{_S}{_RANGE_SEP}{_S}(?:{_IMG_WORD}\.?{_S})?(\d{{1,4}}))?", re.IGNORECASE)

_DATE_CUE = re.compile(
    r"\b(?:dated?|on|from|since|of|prior|previous(?:ly)?|compar\w*|study|exam\w*|radiograph|scan|until|before|after"
    r"|in|ct|chest|score|scale|grade|class|ratio|index|stage|level|rate|range|fraction)\W*$", re.IGNORECASE)
_TIME_CUE_BEFORE = re.compile(r"\b(?:at|time|scanned|performed|started|injected|hrs?|hours?)\W*$", re.IGNORECASE)
_TIME_CUE_AFTER = re.compile(r"^\W*(?:am|pm|a\.m\.|p\.m\.|h|hrs?|hours?|o'?clock)\b", re.IGNORECASE)

# Ordered by priority: at equal start, the earlier pattern wins; otherwise the leftmost, longest match wins.
_PATTERNS = (
    ("slash_pair", _P_SLASH_PAIR),
    ("series_image", _P_SERIES_IMAGE),
    ("image_series", _P_IMAGE_SERIES),
    ("image", _P_IMAGE),
    ("compact", _P_COMPACT),
    ("bare", _P_BARE),
)


@dataclass
class _Match:
    start: int
    end: int
    kind: str
    series: Optional[int]
    items: list  # [(image, image_end, start, end)]
    plane: Optional[str] = None
    refs: list = field(default_factory=list)


def _plane(m: re.Match) -> Optional[str]:
    for name in ("plane", "plane2"):
        value = m.groupdict().get(name)
        if value:
            v = value.lower()
            return {"ax": "axial", "cor": "coronal", "sag": "sagittal"}.get(v, v)
    return None


def _expand_end(start: int, end_text: str) -> int:
    """The end of a range; "145-52" is shorthand for 145-152."""
    end = int(end_text)
    if end < start:
        s = str(start)
        if len(end_text) < len(s):
            candidate = int(s[: len(s) - len(end_text)] + end_text)
            if candidate >= start:
                return candidate
        return -1
    return end


def _items(m: re.Match) -> list:
    """(image, image_end, start, end) per listed image/range of a match's ``spec`` group."""
    offset = m.start("spec")
    out = []
    spec = m.group("spec")
    found = list(_P_ITEM.finditer(spec))
    keyword = (m.groupdict().get("kw") or "").lower()
    if len(found) == 2 and "/" in spec[found[0].end(): found[1].start()] and not keyword.endswith("s"):
        found = found[:1]  # "image 112/300": image 112 of 300
    for item in found:
        image = int(item.group(1))
        image_end = _expand_end(image, item.group(2)) if item.group(2) else image
        if image < 1 or image > MAX_IMAGE or image_end < image or image_end > MAX_IMAGE:
            continue
        out.append((image, image_end, offset + item.start(), offset + item.end()))
    return out


def _inside_brackets(text: str, pos: int) -> bool:
    before = text[max(0, pos - 200): pos]
    return max(before.rfind("("), before.rfind("[")) > max(before.rfind(")"), before.rfind("]"))


def _bare_ok(text: str, m: re.Match) -> bool:
    """Plausibility of a bare "(3:45)" / "(3/102)" reference (see module docstring)."""
    s_text, i_text, sep = m.group("series"), m.group("spec"), m.group("sep")
    series, image = int(s_text), int(i_text)
    before = text[: m.start()].rstrip()
    after = text[m.end():].lstrip()
    prev_ok = before.endswith(("(", "[")) or (before.endswith((",", ";")) and _inside_brackets(text, m.start()))
    next_ok = after.startswith((")", "]")) or (after.startswith((",", ";")) and _inside_brackets(text, m.start()))
    if not (prev_ok and next_ok):
        return False
    if not (1 <= series <= MAX_BARE_SERIES and MIN_BARE_IMAGE <= image <= MAX_IMAGE):
        return False
    if s_text.startswith("0") or i_text.startswith("0"):
        return False
    context_before = text[max(0, m.start() - 30): m.start()].rstrip(" ([")
    if sep == ":":
        if series >= 10 and len(i_text) == 2 and image < 60:
            return False  # "(10:30)": a clock time
        if _TIME_CUE_BEFORE.search(context_before) or _TIME_CUE_AFTER.search(text[m.end(): m.end() + 12]):
            return False
    else:
        if 1900 <= image <= 2099 and series <= 12:
            return False  # "(3/2021)": month/year
        if series <= 12 and image <= 31 and _DATE_CUE.search(context_before):
            return False  # "compared with CT (3/12)": a date
    return True


# Cheap gate: only sentences with a keyword, an "S3"-like token or a bracketed number are scanned by the patterns.
_TRIGGER = re.compile(r"\b(?:series|ser|se|sr|images?|imgs?|ima|ims?|slices?)(?![a-z])|\bS\s?\d|[(\[,;]\s*\d",
                      re.IGNORECASE)
_WINDOW_OVERHANG = 80  # a reference may run past a (mis-detected) sentence end


def _candidates(text: str, sentences: list[tuple[int, int]]) -> list[_Match]:
    """Non-overlapping reference matches (leftmost, then longest, then pattern priority)."""
    found: list[tuple[int, int, int, _Match]] = []
    seen: set[tuple[int, int, int]] = set()
    ends = [e for _, e in sentences]
    active = sorted({bisect_right(ends, t.start()) for t in _TRIGGER.finditer(text)})
    for index in active:
        if index >= len(sentences):
            continue
        s0, s1 = sentences[index]
        stop = min(len(text), s1 + _WINDOW_OVERHANG)
        for priority, (kind, pattern) in enumerate(_PATTERNS):
            for m in pattern.finditer(text, s0, stop):
                if m.start() >= s1:
                    break
                key = (m.start(), m.end(), priority)
                if key in seen or (kind == "bare" and not _bare_ok(text, m)):
                    continue
                seen.add(key)
                items = _items(m)
                if not items:
                    continue
                series_text = m.groupdict().get("series")
                series = int(series_text) if series_text else None
                found.append((m.start(), -(m.end() - m.start()), priority,
                              _Match(m.start(), m.end(), kind, series, items, _plane(m))))
    found.sort(key=lambda t: (t[0], t[1], t[2]))
    chosen: list[_Match] = []
    last_end = -1
    for start, _neg_len, _prio, match in found:
        if start >= last_end:
            chosen.append(match)
            last_end = match.end
    return chosen


# --- sentences, clauses and snippets -------------------------------------------------------------------------------

_ABBREV = re.compile(
    r"(?:\b(?:e\.g|i\.e|no|nr|ser|se|img|im|ima|approx|vs|dr|fig|cf|incl|max|min|ca|resp|pt|sr|st|num|etc)"
    r"|\b[A-Za-z])$", re.IGNORECASE)


_BOUNDARY_CHARS = re.compile(r"[()\[\]\n;.!?]")


def _sentences(text: str) -> list[tuple[int, int]]:
    """(start, end) of sentences; "." "!" "?" + space, ";" (outside brackets) and newlines end one."""
    bounds, start, depth, n = [], 0, 0, len(text)
    for m in _BOUNDARY_CHARS.finditer(text):
        i, c = m.start(), m.group()
        if c in "([":
            depth += 1
            continue
        if c in ")]":
            depth = max(0, depth - 1)
            continue
        end = None
        if c == "\n":
            end = i
        elif c == ";":
            if depth == 0:
                end = i + 1
        elif (i + 1 == n or text[i + 1].isspace()) and (c != "." or not _ABBREV.search(text, max(start, i - 8), i)):
            end = i + 1
            depth = 0
        if end is not None:
            if start < end and not text[start:end].isspace():
                bounds.append((start, end))
            start = i + 1
    if start < n and not text[start:].isspace():
        bounds.append((start, n))
    return bounds


_FILLER = r"(?:[\s,;:/&\-]|\b(?:and|or|see|also|e\.g\.|eg|i\.e\.|cf\.?|on|at|in|previously|prior|for example|of)\b)"
_RE_EMPTY_PAREN = re.compile(rf"[(\[]{_FILLER}*[)\]]", re.IGNORECASE)
_RE_JOINED = re.compile(r"\x00(?:\s*(?:,|;|/|&|\band\b|\bor\b)\s*\x00)+", re.IGNORECASE)
_RE_LEAD_PREP = re.compile(
    r"(?:\b(?:on|at|see|in|from|of)|\be\.g\.,?|\bfor example,?(?:\s+on)?)\s*(?=\x00)", re.IGNORECASE)
_LEAD_WORDS = re.compile(r"^(?:and|or|while|whereas|but|with)\b", re.IGNORECASE)
_TRAIL_WORDS = re.compile(r"\b(?:and|or|with)$", re.IGNORECASE)
_STRIP_LEAD = " \t\n,;:.)]-–"
_STRIP_TRAIL = " \t\n,;:.([-–"


def _strip_ends(s: str) -> str:
    """Drop leading/trailing punctuation, brackets and dangling conjunctions."""
    while True:
        before = s
        s = s.lstrip(_STRIP_LEAD).rstrip(_STRIP_TRAIL)
        s = _LEAD_WORDS.sub("", s)
        s = _TRAIL_WORDS.sub("", s)
        if s == before:
            return s


def _balance(s: str) -> str:
    """Drop unmatched brackets."""
    keep, stack = list(s), []
    for i, c in enumerate(s):
        if c in "([":
            stack.append(i)
        elif c in ")]":
            if stack:
                stack.pop()
            else:
                keep[i] = ""
    for i in stack:
        keep[i] = ""
    return "".join(keep)


def _clean(s: str) -> str:
    s = _RE_JOINED.sub("\x00", s)
    s = _RE_LEAD_PREP.sub("", s)
    s = s.replace("\x00", "")
    for _ in range(2):
        s = _RE_EMPTY_PAREN.sub("", s)
    s = re.sub(r"\s+", " ", s)
    s = re.sub(r"\s+([,.;:)\]])", r"\1", s)
    s = re.sub(r"([(\[])\s+", r"\1", s)
    s = re.sub(r"[,;:]+\s*([.,;:)\]])", r"\1", s)
    s = _balance(s)
    return _strip_ends(s)


def _remove(text: str, start: int, spans: list[tuple[int, int]], end: int) -> str:
    """``text[start:end]`` with every span replaced by a marker (cleaned later)."""
    out, pos = [], start
    for s, e in spans:
        if e <= start or s >= end:
            continue
        out.append(text[pos:max(pos, s)])
        out.append("\x00")
        pos = max(pos, e)
    out.append(text[pos:end])
    return "".join(out)


_GROUP_GAP = re.compile(
    r"^(?:[\s,;:/&()\[\]]|\b(?:and|or|previously|prior|vs\.?|versus|also|see|e\.g\.|on)\b)*$", re.IGNORECASE)
_MIN_CLAUSE_WORDS = 1


def _snippets(text: str, sent: tuple[int, int], matches: list[_Match]) -> list[str]:
    """One snippet per match: its own clause when the sentence has several reference groups, else the sentence."""
    s0, s1 = sent
    spans = [(m.start, m.end) for m in matches]
    whole = _clean(_remove(text, s0, spans, s1))
    groups: list[list[int]] = []
    for idx, m in enumerate(matches):
        if groups and _GROUP_GAP.match(text[matches[groups[-1][-1]].end: m.start]):
            groups[-1].append(idx)
        else:
            groups.append([idx])
    result = [whole] * len(matches)
    if len(groups) < 2:
        return result
    prev_end = s0
    for g in groups:
        g_start, g_end = matches[g[0]].start, matches[g[-1]].end
        clause = _clean(_remove(text, prev_end, spans, g_start))
        if len(re.findall(r"[A-Za-z]{2,}", clause)) >= _MIN_CLAUSE_WORDS:
            for idx in g:
                result[idx] = clause
        prev_end = g_end
    return result


def mine_references(text: str) -> list[ImageReference]:
    """Every image reference in ``text`` (in text order), each with its snippet, series, image range and span."""
    if not isinstance(text, str) or not text.strip():
        return []
    sentences = _sentences(text)
    matches = _candidates(text, sentences)
    if not matches:
        return []
    starts = [m.start for m in matches]
    refs: list[ImageReference] = []
    for s0, s1 in sentences:
        in_sent = matches[bisect_left(starts, s0): bisect_left(starts, s1)]
        if not in_sent:
            continue
        snippets = _snippets(text, (s0, s1), in_sent)
        used = [(m.start, m.end) for m in in_sent]
        series_alone = [
            (a.start(), int(a.group(1))) for a in _P_SERIES_ALONE.finditer(text, s0, s1)
            if not any(s <= a.start() < e for s, e in used)
        ]
        for m, snippet in zip(in_sent, snippets):
            series = m.series
            if series is None:
                earlier = [v for pos, v in series_alone if pos < m.start]
                series = earlier[-1] if earlier else None
            for n, (image, image_end, i0, i1) in enumerate(m.items):
                span = (m.start, i1) if n == 0 else (i0, i1)
                if n == 0 and len(m.items) == 1:
                    span = (m.start, m.end)
                refs.append(ImageReference(snippet, series, image, image_end, span, m.plane))
    return refs


# --- image number -> slice index -----------------------------------------------------------------------------------


def image_to_slice(image: int, n_slices: int, slices_toward_superior: bool, convention: str = "superior_first") -> int:
    """0-based slice index (file voxel order) of report image number ``image`` (1-based).

    ``superior_first`` (DESIGN default): image 1 is the most superior slice; ``inferior_first``: image 1 is the
    most inferior; ``file_order``: image 1 is slice 0 of the file.
    """
    if convention not in CONVENTIONS:
        raise CTVLInputError(None, f"unknown image convention {convention!r}", f"Use one of {', '.join(CONVENTIONS)}")
    if n_slices < 1:
        raise CTVLInputError(None, f"volume has {n_slices} slices", "Give a volume with at least one slice")
    if not 1 <= int(image) <= n_slices:
        raise CTVLInputError(None, f"image {image} is outside the volume's 1..{n_slices} images",
                             "Check the series/convention, or verify the reference by hand")
    image = int(image)
    if convention == "file_order":
        return image - 1
    superior_at_end = bool(slices_toward_superior) == (convention == "superior_first")
    return n_slices - image if superior_at_end else image - 1


def image_to_slice_dicom(image: int, instance_numbers: Sequence[Optional[int]], nearest: bool = True,
                         max_gap: Optional[int] = None) -> int:
    """Slice k whose DICOM InstanceNumber (``instance_numbers[k]``) equals ``image``.

    When no slice has that number and ``nearest`` is true, the slice with the closest number is used provided
    ``image`` lies within the series' number range (and within ``max_gap`` of it if given); otherwise
    CTVLInputError.
    """
    known = [(k, int(n)) for k, n in enumerate(instance_numbers) if n is not None]
    if not known:
        raise CTVLInputError(None, "the series has no InstanceNumber", "Use image_to_slice with a convention")
    image = int(image)
    exact = [k for k, n in known if n == image]
    if exact:
        if len(exact) > 1:
            log.warning("InstanceNumber %d occurs on %d slices; using slice %d", image, len(exact), exact[0])
        return exact[0]
    lo, hi = min(n for _, n in known), max(n for _, n in known)
    if not nearest or not lo <= image <= hi:
        raise CTVLInputError(None, f"image {image} is not an InstanceNumber of this series ({lo}..{hi})",
                             "Check the series number of the reference")
    k, n = min(known, key=lambda kn: (abs(kn[1] - image), kn[0]))
    if max_gap is not None and abs(n - image) > max_gap:
        raise CTVLInputError(None, f"image {image} is {abs(n - image)} numbers from the nearest InstanceNumber",
                             "Check the series number of the reference")
    return k


# --- CT-RATE reports CSV -------------------------------------------------------------------------------------------

SliceFn = Callable[[str, ImageReference], Optional[int]]


@dataclass
class MineStats:
    """Counts filled while `mine_reports_csv` iterates."""

    rows: int = 0
    skipped_rows: int = 0
    references: int = 0
    with_slice: int = 0
    unmappable: int = 0


def volume_header(path: str | Path) -> dict:
    """n_slices / slices_toward_superior of an image file from its header only (SimpleITK ReadImageInformation)."""
    import SimpleITK as sitk

    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        reader.ReadImageInformation()
    except RuntimeError as exc:
        raise CTVLInputError(path, "cannot read the image header", "Check that the file is a readable image") \
            from exc
    size = reader.GetSize()
    if len(size) != 3:
        raise CTVLInputError(path, f"expected a 3D image, got {len(size)}D", "Give a 3D CT volume")
    direction = reader.GetDirection()
    si_row = [direction[6], direction[7], direction[8]]  # LPS z (superior) component of the i, j, k axes
    axis = max(range(3), key=lambda a: abs(si_row[a]))
    return {"n_slices": int(size[axis]), "slices_toward_superior": bool(si_row[axis] > 0), "slice_axis_ijk": axis}


class VolumeSliceMapper:
    """Slice function for `mine_reports_csv` that finds each volume under a CT-RATE-style root (header only).

    Looks in ``<root>/<split>/<patient>/<scan>/<VolumeName>`` (CT-RATE), ``<root>/<VolumeName>``, then an index of
    every file under the root (built once on the first miss). Coronal/sagittal references get no slice.
    """

    def __init__(self, root: str | Path, convention: str = "superior_first") -> None:
        self.root = Path(root)
        if not self.root.is_dir():
            raise CTVLInputError(root, "volumes root is not a folder", "Give the dataset folder")
        if convention not in CONVENTIONS:
            raise CTVLInputError(None, f"unknown image convention {convention!r}",
                                 f"Use one of {', '.join(CONVENTIONS)}")
        self.convention = convention
        self._headers: dict[str, Optional[dict]] = {}
        self._index: Optional[dict[str, Path]] = None

    def find(self, volume: str) -> Optional[Path]:
        name = Path(volume).name
        parts = name.split(".")[0].split("_")
        candidates = [self.root / name]
        if len(parts) >= 3:
            split, patient, scan = parts[0], "_".join(parts[:2]), "_".join(parts[:3])
            candidates.insert(0, self.root / split / patient / scan / name)
            candidates.insert(1, self.root / "dataset" / split / patient / scan / name)
        for c in candidates:
            if c.is_file():
                return c
        if self._index is None:
            self._index = {}
            for dirpath, _dirs, files in os.walk(self.root):
                for f in files:
                    self._index.setdefault(f, Path(dirpath) / f)
        return self._index.get(name)

    def header(self, volume: str) -> Optional[dict]:
        if volume not in self._headers:
            path = self.find(volume)
            info = None
            if path is not None:
                try:
                    info = volume_header(path)
                except CTVLInputError as exc:
                    log.warning("%s", exc)
            self._headers[volume] = info
        return self._headers[volume]

    def __call__(self, volume: str, ref: ImageReference) -> Optional[int]:
        if ref.plane in ("coronal", "sagittal"):
            return None
        info = self.header(volume)
        if info is None:
            return None
        return image_to_slice(ref.image, info["n_slices"], info["slices_toward_superior"], self.convention)


def _read_csv_rows(path: Path) -> Iterator[tuple[int, Optional[dict]]]:
    """(row number, row dict or None if its field count is wrong) for a CSV file."""
    csv.field_size_limit(min(sys.maxsize, 2**31 - 1))
    with open(path, newline="", encoding="utf-8-sig", errors="replace") as f:
        reader = csv.DictReader(f)
        yield -1, {"__header__": reader.fieldnames or []}
        for row_no, row in enumerate(reader):
            if None in row or any(v is None for v in row.values()):
                yield row_no, None
            else:
                yield row_no, row


def record_slices(volume: str, ref: ImageReference, slice_fn: Optional[SliceFn]) -> dict:
    """``slice``/``slice_end`` (or None) of one reference, with ``problem`` when the image does not fit."""
    out = {"slice": None, "slice_end": None}
    if slice_fn is None:
        return out
    try:
        first = slice_fn(volume, ref)
        last = slice_fn(volume, ImageReference(ref.snippet, ref.series, ref.image_end, ref.image_end, ref.span,
                                               ref.plane)) if ref.image_end != ref.image else first
    except CTVLInputError as exc:
        return {**out, "problem": exc.problem}
    return {"slice": first, "slice_end": last}


def mine_reports_csv(
    path: str | Path,
    columns: Sequence[str] = REPORT_COLUMNS,
    slice_fn: Optional[SliceFn] = None,
    volumes_root: str | Path | None = None,
    convention: str = "superior_first",
    stats: Optional[MineStats] = None,
) -> Iterator[dict]:
    """Candidate records from a CT-RATE reports CSV, one per image reference.

    Record: {volume, report_id, row, column, snippet, series, image, image_end, plane, span, slice, slice_end}
    (+ ``problem`` when the image number does not fit the volume). ``slice`` is filled when ``slice_fn(volume,
    ref)`` or ``volumes_root`` (volume header via `VolumeSliceMapper`) is given, else None. Malformed rows (no
    VolumeName, wrong field count, non-text cells) are skipped with a warning and counted in ``stats``.
    Raises CTVLInputError for a missing/unreadable file or a CSV without VolumeName or any of ``columns``.
    """
    path = Path(path)
    stats = stats if stats is not None else MineStats()
    if not path.is_file():
        raise CTVLInputError(path, "reports CSV not found", "Check the path")
    if slice_fn is None and volumes_root is not None:
        slice_fn = VolumeSliceMapper(volumes_root, convention)
    rows = _read_csv_rows(path)
    try:
        _, header_row = next(rows)
    except (OSError, csv.Error) as exc:
        raise CTVLInputError(path, f"cannot read the CSV ({exc})", "Give a CT-RATE reports CSV") from exc
    header = header_row["__header__"] if header_row else []
    present = [c for c in columns if c in header]
    if "VolumeName" not in header or not present:
        raise CTVLInputError(path, f"CSV lacks the VolumeName column or all of {', '.join(columns)}",
                             "Give a CT-RATE reports CSV (VolumeName, Findings_EN, Impressions_EN)")
    missing = [c for c in columns if c not in header]
    if missing:
        log.warning("%s: no column %s; mining %s only", path, ", ".join(missing), ", ".join(present))
    try:
        for row_no, row in rows:
            stats.rows += 1
            volume = (row or {}).get("VolumeName")
            if row is None or not isinstance(volume, str) or not volume.strip():
                stats.skipped_rows += 1
                log.warning("%s: row %d skipped (%s)", path, row_no + 1,
                            "wrong number of fields" if row is None else "no VolumeName")
                continue
            volume = volume.strip()
            report_id = volume.split(".")[0]
            for column in present:
                cell = row.get(column)
                if not isinstance(cell, str):
                    stats.skipped_rows += 1
                    log.warning("%s: row %d column %s is not text; skipped", path, row_no + 1, column)
                    continue
                for ref in mine_references(cell):
                    stats.references += 1
                    rec = {"volume": volume, "report_id": report_id, "row": row_no, "column": column,
                           **ref.as_dict(), **record_slices(volume, ref, slice_fn)}
                    if rec["slice"] is not None:
                        stats.with_slice += 1
                    elif "problem" in rec:
                        stats.unmappable += 1
                    yield rec
    except csv.Error as exc:
        stats.skipped_rows += 1
        log.warning("%s: CSV parsing stopped at a malformed line (%s)", path, exc)
    if stats.skipped_rows:
        log.warning("%s: %d malformed row(s) skipped", path, stats.skipped_rows)
