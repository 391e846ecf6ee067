"""`ctvl phantom --out DIR --n N --seed S [--split train|valid|test] [--workers W]`: a synthetic CT-RATE data set."""

from __future__ import annotations

import argparse
import os

from ctvl.errors import CTVLInputError


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("phantom", help="write a synthetic chest-CT data set in CT-RATE's layout",
                              description=__doc__)
    p.add_argument("--out", required=True, help="output directory (created if missing)")
    p.add_argument("--n", default="10", help="number of volumes (>= 1)")
    p.add_argument("--seed", default="0", help="data set seed (integer)")
    p.add_argument("--split", default="train", help="train, valid (CT-RATE's) or test (held out)")
    p.add_argument("--workers", default="1", help="worker processes (default 1)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(run=run)
    return p


def _int(value: str, name: str, minimum: int) -> int:
    try:
        v = int(value)
    except (TypeError, ValueError):
        raise CTVLInputError(None, f"--{name} must be an integer, got {value!r}", f"pass --{name} {minimum}") from None
    if v < minimum:
        raise CTVLInputError(None, f"--{name} must be at least {minimum}, got {v}", f"pass --{name} {minimum} or more")
    return v


def run(args: argparse.Namespace) -> int:
    from ctvl.phantom import write_dataset

    n = _int(args.n, "n", 1)
    seed = _int(args.seed, "seed", 0)
    workers = _int(args.workers, "workers", 1)
    workers = min(workers, os.cpu_count() or 1, n)
    if args.split not in ("train", "valid", "test"):
        raise CTVLInputError(None, f"--split must be train, valid or test, got {args.split!r}", "pass --split train")
    out = write_dataset(args.out, n, seed, split=args.split, workers=workers, progress=not args.no_progress)
    print(f"wrote {n} {args.split} volumes to {out}")
    return 0
