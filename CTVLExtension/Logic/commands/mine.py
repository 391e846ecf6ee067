"""`ctvl mine REPORTS.csv|report.txt|- [--out pairs.jsonl] [--volumes-root DIR | --volume FILE]`.

One JSON line per image reference: {volume, report_id, row, column, snippet, series, image, image_end, plane,
span, slice, slice_end} (``slice`` is null when it cannot be computed; ``problem`` says why when the image does
not fit the volume). Records come from `candidate_records` (a generator, separate from output) so later options
(``--model`` scoring and ``--sort disagreement`` from `ctvl.commands._mine_model`, when present) wrap it without
touching input or output handling.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path

from ctvl.errors import CTVLInputError

log = logging.getLogger(__name__)


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "mine",
        help="mine image references (series/image) and their snippets from reports",
        description="Mine 'series 3, image 45'-style references from a CT-RATE reports CSV, a text report, or stdin.",
    )
    p.add_argument("input", help="reports CSV (VolumeName, Findings_EN, Impressions_EN), a .txt report, or - (stdin)")
    p.add_argument("--out", type=Path, default=None, help="JSON Lines output (atomic); default: stdout")
    p.add_argument("--volumes-root", type=Path, default=None,
                   help="dataset folder holding the CSV's volumes: fills 'slice' from each NIfTI header")
    p.add_argument("--volume", type=Path, default=None,
                   help="the volume of a single text report (fills 'slice' from its header)")
    p.add_argument("--convention", default="superior_first", choices=["superior_first", "inferior_first", "file_order"],
                   help="how report image numbers map to slices (default: image 1 = most superior slice)")
    p.add_argument("--columns", nargs="+", default=["Findings_EN", "Impressions_EN"],
                   help="CSV report columns to mine")
    hooks = _model_hooks()
    if hooks is not None:
        hooks.add_arguments(p)  # --model, --device, --sort disagreement, --tolerance-mm
    p.set_defaults(run=run)
    return p


def _model_hooks():
    """`ctvl.commands._mine_model` (model agreement options) when present, else None."""
    try:
        from ctvl.commands import _mine_model
    except ImportError:
        return None
    return _mine_model


def _text_records(text: str, source: str, args: argparse.Namespace) -> Iterator[dict]:
    from ctvl.snippets import image_to_slice, mine_references, record_slices, volume_header

    if not text.strip():
        raise CTVLInputError(source, "the report is empty", "Give a report with text")
    volume_name = args.volume.name if args.volume is not None else None
    slice_fn = None
    if args.volume is not None:
        if not args.volume.is_file():
            raise CTVLInputError(args.volume, "volume not found", "Check the --volume path")
        info = volume_header(args.volume)

        def slice_fn(_volume, ref):
            if ref.plane in ("coronal", "sagittal"):
                return None
            return image_to_slice(ref.image, info["n_slices"], info["slices_toward_superior"], args.convention)

    for ref in mine_references(text):
        yield {"volume": volume_name, "report_id": None if source == "-" else Path(source).stem, "row": None,
               "column": None, **ref.as_dict(), **record_slices(volume_name or "", ref, slice_fn)}


def candidate_records(args: argparse.Namespace) -> Iterator[dict]:
    """Every mined reference of ``args.input`` as a record (validates the input; raises CTVLInputError)."""
    from ctvl.snippets import MineStats, mine_reports_csv

    source = str(args.input)
    if source == "-":
        yield from _text_records(sys.stdin.read(), "-", args)
        return
    path = Path(source)
    if not path.is_file():
        raise CTVLInputError(path, "file not found", "Give a reports CSV, a text report, or - for stdin")
    if path.suffix.lower() == ".csv":
        stats = MineStats()
        yield from mine_reports_csv(path, columns=tuple(args.columns), volumes_root=args.volumes_root,
                                    convention=args.convention, stats=stats)
        log.info("%s: %d rows, %d references (%d with a slice), %d malformed rows skipped", path, stats.rows,
                 stats.references, stats.with_slice, stats.skipped_rows)
        return
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError as exc:
        raise CTVLInputError(path, f"cannot read the report ({exc.strerror})", "Check the file") from exc
    yield from _text_records(text, source, args)


def write_jsonl(records: Iterable[dict], out: Path | None) -> int:
    """Write records as JSON Lines to ``out`` atomically (temp file + fsync + replace), or to stdout."""
    if out is None:
        n = 0
        for rec in records:
            sys.stdout.write(json.dumps(rec, ensure_ascii=False) + "\n")
            n += 1
        sys.stdout.flush()
        return n
    out = Path(out)
    if out.parent and not out.parent.is_dir():
        raise CTVLInputError(out, "output folder does not exist", "Create it or choose another --out")
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)
    n = 0
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            for rec in records:
                f.write(json.dumps(rec, ensure_ascii=False) + "\n")
                n += 1
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, out)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return n


def run(args: argparse.Namespace) -> int:
    if args.volumes_root is not None and not Path(args.volumes_root).is_dir():
        raise CTVLInputError(args.volumes_root, "volumes root is not a folder", "Give the dataset folder")
    records: Iterable[dict] = candidate_records(args)
    hooks = _model_hooks()
    if hooks is not None:
        records = hooks.apply(records, args)
    n = write_jsonl(records, args.out)
    log.info("%d reference(s)%s", n, f" written to {args.out}" if args.out else "")
    line = hooks.summary(args) if hooks is not None else ""
    if line:
        log.info("%s", line)
    return 0
