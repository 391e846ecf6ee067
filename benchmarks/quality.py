"""Quality of the embedded demo model on a held-out phantom split, next to trivial baselines.

    python -m benchmarks.quality [--weights demo] [--data data/phantom] [--split test] [--val-split valid]

The held-out split is generated with a seed never used for training (train: seed 1, valid: seed 2, test: seed 3)
when it is missing. Thresholds for F1/accuracy/precision are reported two ways: picked on the evaluation split
itself (CT-CLIP's rule, flatters F1) and fixed on ``--val-split``. Beside the trivial baselines, ``mask`` is no model:
the phantom masks averaged onto the heatmap grid of ``--weights`` (its tokens, or the stitched grid of its
``heatmap_subdivision``) as heatmaps, what a heatmap that knows the answer scores at that resolution. Prints a
table and writes benchmarks/results/quality.json.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from benchmarks.common import RESULTS, ensure_split, headline, write_json

TARGETS = {"auroc": 0.90, "R@10": 0.5, "loc_median_mm": 10.0, "loc_within_pct": 70.0, "pointing_game": 0.7}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--weights", default="demo")
    ap.add_argument("--data", default="data/phantom")
    ap.add_argument("--split", default="test")
    ap.add_argument("--val-split", default="valid")
    ap.add_argument("--n", type=int, default=100, help="volumes per generated split")
    ap.add_argument("--baselines", nargs="*", default=["random", "prevalence", "mask"])
    ap.add_argument("--out", default=str(RESULTS / "quality.json"))
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    from training.evaluate import evaluate, format_table

    data = Path(args.data)
    ensure_split(data, args.split, n=args.n, seed=3)
    ensure_split(data, args.val_split, n=args.n, seed=2)
    runs = {"model": evaluate(args.weights, data, split=args.split, val_split=args.val_split)}
    print(format_table(runs["model"]))
    for kind in args.baselines:
        grid_of = args.weights if kind == "mask" else None  # the mask baseline needs the model's heatmap grid
        runs[kind] = evaluate(grid_of, data, split=args.split, val_split=args.val_split, baseline=kind,
                              bootstrap=0)  # intervals only for the model (the README shows no others)
    rows = {name: headline(rep) for name, rep in runs.items()}
    print(f"\n{'':12s} " + " ".join(f"{k:>14s}" for k in TARGETS))
    for name, row in rows.items():
        print(f"{name:12s} " + " ".join(f"{_fmt(row.get(k)):>14s}" for k in TARGETS))
    print(f"{'target':12s} " + " ".join(f"{('>= ' if k != 'loc_median_mm' else '<= ') + str(v):>14s}"
                                       for k, v in TARGETS.items()))
    write_json(args.out, {"weights": args.weights, "data": str(data), "split": args.split,
                          "val_split": args.val_split, "targets": TARGETS, "headline": rows, "reports": runs})
    return 0


def _fmt(v: float | None) -> str:
    return "-" if v is None else f"{v:.3f}"


if __name__ == "__main__":
    raise SystemExit(main())
