"""`ctvl analyze VOLUME`: disease probabilities, heatmaps, query -> slices; writes result.json + overview.png."""

from __future__ import annotations

import argparse
import contextlib
import sys
from pathlib import Path

from ctvl.commands._common import add_model_options, progress_bar


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("analyze", help="analyze a chest CT (NIfTI, NRRD, MHA or DICOM folder)",
                              description=__doc__)
    p.add_argument("volume", help="CT file (.nii/.nii.gz/.nrrd/.mha) or DICOM series folder")
    add_model_options(p)
    p.add_argument("--query", action="append", default=[], metavar="TEXT", help="free-text finding to locate "
                   "(repeatable)")
    p.add_argument("--labels", nargs="+", default=None, metavar="LABEL", help="only these labels (default: all)")
    p.add_argument("--out", default="ctvl_out", help="output directory (default: ./ctvl_out)")
    p.add_argument("--heatmap-grid", choices=("model", "input"), default="model",
                   help="write heatmaps on the model grid (small, fast) or resampled to the input grid")
    p.add_argument("--no-heatmaps", action="store_true", help="do not write heatmap volumes")
    p.add_argument("--top-k", type=int, default=5, help="slices per query (default 5)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from ctvl.atomic import ensure_writable_dir
    from ctvl.errors import CTVLInputError
    from ctvl.inference import check_text

    queries = [check_text(q, "--query") for q in args.query]  # fail fast, before loading anything
    if args.top_k < 1:
        raise CTVLInputError(None, f"--top-k {args.top_k}: need at least one slice", "use --top-k 1 or more")
    created = not Path(args.out).exists()
    ensure_writable_dir(args.out)  # an unwritable --out fails now, not after the analysis
    try:
        result = _analyze(args, queries)
    except BaseException:
        if created:  # a run that failed before writing anything leaves no empty folder behind
            with contextlib.suppress(OSError):
                Path(args.out).rmdir()
        raise
    top = sorted(result["diseases"], key=lambda d: -d["probability"])
    print(f"{args.volume}: model {result['model']['name']} {result['model']['version']}")
    for d in top[:5]:
        print(f"  {d['probability']:.3f}  {d['name']}")
    for q in result["queries"]:
        best = q["slices"][0] if q["slices"] else None
        where = f"slice {best['slice']} ({best['position_mm']:.1f} mm, score {best['score']:.3f})" if best else "-"
        print(f"  query {q['text']!r}: {where}")
    print(f"wrote {args.out}/result.json" + (f", {args.out}/overview.png" if result.get("overview") else ""))
    sys.stdout.flush()
    return 0


def _analyze(args: argparse.Namespace, queries: list[str]) -> dict:
    import time

    from ctvl.inference import load_model
    from ctvl.io import read_volume
    from ctvl.results import analyze

    with progress_bar(not args.no_progress) as progress:
        progress(0.0, "reading volume")
        t0 = time.perf_counter()
        volume = read_volume(args.volume)  # bad input fails before the model loads
        load_s = time.perf_counter() - t0
        progress(0.05, "loading model")
        model = load_model(args.model, device=args.device)
        result = analyze(volume, model, args.out, queries=queries, labels=args.labels,
                         heatmap_grid=args.heatmap_grid, heatmaps=not args.no_heatmaps, top_k=args.top_k,
                         progress=lambda f, m: progress(0.1 + 0.9 * f, m), source=str(args.volume),
                         load_s=load_s)
    return result
