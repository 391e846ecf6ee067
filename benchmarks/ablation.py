"""Ablation of the training objectives at an equal, reduced budget (which objective buys what).

    python -m benchmarks.ablation [--steps 160] [--data data/phantom] [--only VARIANT ...] [--eval-only]

Trains phantom-demo three times with the same seed, data and step budget — SigLIP only; + disease prompts
(pooled and token-level MIL); + snippet-slice localization, on the bin embeddings and the tokens (the full recipe)
— then evaluates each on the held-out split exactly as benchmarks/quality.py does. Costs about
3 x (steps x 1.9 s + 3 min) on 2 CPU cores with the recipe's bf16 CPU autocast (160 steps: about 17 min
measured; the embedded model's full recipe runs 1700).
Prints a table and writes benchmarks/results/ablation.json; `--only` re-runs some variants and keeps the other
rows, `--eval-only` re-evaluates the exported weights of earlier runs (after a change of the metrics).
"""

from __future__ import annotations

import argparse
import json
import logging
import subprocess
import sys
from pathlib import Path

from benchmarks.common import RESULTS, ensure_split, headline, write_json

VARIANTS = {
    "siglip": ["loss.disease.enabled=false", "loss.mil.enabled=false", "loss.localization.enabled=false",
               "loss.token_localization.enabled=false", "model.token_localization=false"],
    "siglip+disease": ["loss.localization.enabled=false", "loss.token_localization.enabled=false",
                       "model.token_localization=false"],
    "siglip+disease+loc": [],
}
COLUMNS = ("auroc", "R@10", "loc_median_mm", "loc_within_pct", "pointing_game")


def _run(cmd: list[str]) -> None:
    logging.info("$ %s", " ".join(cmd))
    subprocess.run(cmd, check=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=160)
    ap.add_argument("--data", default="data/phantom")
    ap.add_argument("--split", default="test")
    ap.add_argument("--val-split", default="valid")
    ap.add_argument("--runs", default="runs/ablation")
    ap.add_argument("--only", nargs="*", choices=list(VARIANTS), help="train/evaluate only these variants")
    ap.add_argument("--eval-only", action="store_true",
                    help="re-evaluate the variants' exported weights in --runs without training (new metrics)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    from training.evaluate import evaluate

    data = Path(args.data)
    ensure_split(data, args.split, n=100, seed=3)
    ensure_split(data, args.val_split, n=100, seed=2)
    out = RESULTS / "ablation.json"
    rows: dict[str, dict] = {}
    if args.only and out.is_file():  # re-run some variants: keep the others' rows from the same budget and split
        old = json.loads(out.read_text())
        if old.get("steps") == args.steps and old.get("split") == args.split:
            rows = {k: v for k, v in old.get("headline", {}).items() if k in VARIANTS}
    for name, overrides in VARIANTS.items():
        if args.only and name not in args.only:
            continue
        run = Path(args.runs) / name
        train = [sys.executable, "-m", "training", "train", "--config", "training/configs/phantom-demo.yaml",
                 "--data", str(data), "--out", str(run), "--no-progress",
                 "--override", f"train.max_steps={args.steps}", "--override", f"optim.warmup_steps={args.steps // 10}"]
        for o in overrides:
            train += ["--override", o]
        if not args.eval_only:
            _run(train)
            _run([sys.executable, "-m", "training", "export", str(run), "--out", str(run / "weights")])
        elif not (run / "weights" / "config.json").is_file():
            raise SystemExit(f"--eval-only: no exported weights in {run / 'weights'}")
        rows[name] = headline(evaluate(str(run / "weights"), data, split=args.split, val_split=args.val_split))
        write_json(out, {"steps": args.steps, "split": args.split, "variants": VARIANTS,
                         "headline": {k: rows[k] for k in VARIANTS if k in rows}})
    print(f"{'objectives':22s} " + " ".join(f"{c:>14s}" for c in COLUMNS))
    for name, row in rows.items():
        print(f"{name:22s} " + " ".join(f"{'-' if row.get(c) is None else format(row[c], '.3f'):>14s}"
                                        for c in COLUMNS))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
