"""`ctvl locate VOLUME TEXT...`: the input slices that best match each text, ranked."""

from __future__ import annotations

import argparse
import json

from ctvl.commands._common import add_model_options, progress_bar


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("locate", help="find the slices that match a text", description=__doc__)
    p.add_argument("volume", help="CT file or DICOM series folder")
    p.add_argument("text", nargs="+", help="one or more finding descriptions")
    add_model_options(p)
    p.add_argument("--top-k", type=int, default=5, help="slices per text (default 5)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from ctvl.inference import check_text, encode, load_model
    from ctvl.io import read_volume

    texts = [check_text(t, "TEXT") for t in args.text]
    with progress_bar(not args.no_progress) as progress:
        progress(0.0, "loading model")
        model = load_model(args.model, device=args.device)
        progress(0.05, "reading volume")
        volume = read_volume(args.volume)
        enc = encode(volume, model, progress=lambda f, m: progress(0.1 + 0.9 * f, m))
    results = [{"text": t, "slices": [h.as_dict() for h in enc.locate(t, top_k=args.top_k)]} for t in texts]
    if args.json:
        print(json.dumps({"volume": str(args.volume), "queries": results}, indent=2))
        return 0
    for r in results:
        print(r["text"])
        for rank, s in enumerate(r["slices"], 1):
            print(f"  {rank}. slice {s['slice']:4d}  {s['position_mm']:8.1f} mm  score {s['score']:.4f}")
    return 0
