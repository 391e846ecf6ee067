"""Snippet mining benchmark: throughput (reports/s) and, on the phantom corpus, agreement with the true slices.

    .venv/bin/python benchmarks/mining_agreement.py [--n 6] [--seed 0] [--data DIR] [--csv REPORTS.csv]
        [--model demo|PATH|none] [--tolerance-mm 10]

- Throughput: `ctvl.snippets.mine_references` + CSV parsing (`mine_reports_csv`) over the phantom reports CSV
  (rows repeated to ``--repeat`` reports), or over ``--csv`` (e.g. a real CT-RATE reports CSV) when given.
- Mined vs true: each mined reference is matched to the phantom finding that cites the same image; the mined
  slice is *correct* when it lies in that finding's true slice range (ground_truth.jsonl). Also the mean
  |mined - centre| in mm, and recall = findings with a cited image that were mined.
- Model vs true: the same with the model's top slice (``ctvl.verify.with_model_predictions``), with the demo
  model if ``ctvl/weights/demo`` exists (else reported as skipped), and model-vs-mined agreement.

Prints the figures and writes ``benchmarks/results/mining_agreement.json``.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import io
import json
import logging
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

RESULTS = Path(__file__).resolve().parent / "results" / "mining_agreement.json"


def throughput(csv_path: Path, repeat: int) -> dict:
    from ctvl.snippets import MineStats, mine_reports_csv

    text = csv_path.read_text(encoding="utf-8")
    header, *rows = text.splitlines(keepends=True)
    reader_rows = list(csv.reader(io.StringIO("".join(rows))))
    n_base = len(reader_rows)
    with tempfile.TemporaryDirectory() as tmp:
        big = Path(tmp) / "reports.csv"
        if repeat > n_base and n_base:
            with open(big, "w", newline="", encoding="utf-8") as handle:
                writer = csv.writer(handle)
                writer.writerow(next(csv.reader(io.StringIO(header))))
                for i in range(repeat):
                    writer.writerow(reader_rows[i % n_base])
        else:
            big.write_text(text, encoding="utf-8")
        stats = MineStats()
        t0 = time.perf_counter()
        n_refs = sum(1 for _ in mine_reports_csv(big, stats=stats))
        elapsed = time.perf_counter() - t0
    reports = stats.rows - stats.skipped_rows
    return {"reports": reports, "references": n_refs, "seconds": round(elapsed, 4),
            "reports_per_s": round(reports / elapsed, 1) if elapsed > 0 else None,
            "references_per_s": round(n_refs / elapsed, 1) if elapsed > 0 else None}


def load_truth(data: Path) -> dict[str, dict]:
    truth = {}
    for line in (data / "ground_truth.jsonl").read_text(encoding="utf-8").splitlines():
        if line.strip():
            record = json.loads(line)
            truth[record["VolumeName"]] = record
    return truth


def match_finding(record: dict, truth: dict[str, dict]) -> dict | None:
    """The phantom finding that cites the record's image: the exact (image, image_end) citation, else the narrowest
    cited range containing the image (None if no finding cites it)."""
    case = truth.get(record["volume"])
    if case is None:
        return None
    cited = [f for f in case["findings"] if f.get("images")]
    end = record.get("image_end", record["image"])
    exact = [f for f in cited if list(f["images"]) == [record["image"], end]]
    if exact:
        return exact[0]
    containing = [f for f in cited if f["images"][0] <= record["image"] <= f["images"][1]]
    return min(containing, key=lambda f: f["images"][1] - f["images"][0]) if containing else None


def score(records: list[dict], truth: dict[str, dict], field: str, spacing_mm: dict[str, float]) -> dict:
    """Fraction of records whose ``field`` slice lies in the true slice range, and mean |slice - centre| in mm."""
    hits, errors, n, unmatched = 0, [], 0, 0
    for record in records:
        value = record.get(field)
        finding = match_finding(record, truth)
        if finding is None:
            unmatched += 1
            continue
        if value is None:
            n += 1
            continue
        n += 1
        lo, hi = finding["slice_range"]
        hits += int(lo <= value <= hi)
        errors.append(abs(value - finding["centre_slice"]) * spacing_mm.get(record["volume"], 1.0))
    return {"n": n, "in_true_range": round(hits / n, 4) if n else None,
            "mean_abs_error_mm": round(float(np.mean(errors)), 2) if errors else None,
            "median_abs_error_mm": round(float(np.median(errors)), 2) if errors else None,
            "not_matching_any_finding": unmatched}


def z_spacing(data: Path) -> dict[str, float]:
    out = {}
    for split_csv in (data / "metadata").glob("*_metadata.csv"):
        with open(split_csv, newline="", encoding="utf-8") as handle:
            for row in csv.DictReader(handle):
                with contextlib.suppress(KeyError, ValueError):
                    out[row["VolumeName"]] = float(row["ZSpacing"])
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=6, help="phantom volumes to generate (when --data is not given)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--data", type=Path, help="an existing phantom dataset (with ground_truth.jsonl)")
    parser.add_argument("--csv", type=Path, help="reports CSV for throughput (default: the phantom's)")
    parser.add_argument("--repeat", type=int, default=2000, help="reports to mine for throughput")
    parser.add_argument("--model", default="demo", help="'demo', a weights directory, or 'none'")
    parser.add_argument("--tolerance-mm", type=float, default=10.0)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")

    import ctvl
    from ctvl.snippets import mine_reports_csv
    from ctvl.verify import AgreementStats, with_model_predictions

    tmp = None
    data = args.data
    if data is None:
        from ctvl.phantom import write_dataset

        tmp = tempfile.TemporaryDirectory()
        data = Path(tmp.name)
        t0 = time.perf_counter()
        write_dataset(data, n=args.n, seed=args.seed, split="valid", progress=False)
        print(f"phantom corpus: {args.n} volumes generated in {time.perf_counter() - t0:.1f} s")
    reports = sorted((data / "radiology_text_reports").glob("*_reports.csv"))
    if not reports:
        print(f"{data}: no radiology_text_reports/*_reports.csv", file=sys.stderr)
        return 2
    result: dict = {"data": str(args.data or f"phantom n={args.n} seed={args.seed}")}

    result["throughput"] = throughput(args.csv or reports[0], args.repeat)
    t = result["throughput"]
    print(f"mining throughput: {t['reports_per_s']} reports/s, {t['references_per_s']} references/s "
          f"({t['reports']} reports, {t['references']} references in {t['seconds']} s)")

    truth = load_truth(data)
    spacing = z_spacing(data)
    records = [r for csv_path in reports for r in mine_reports_csv(csv_path, volumes_root=data)]
    cited = sum(1 for case in truth.values() for f in case["findings"] if f.get("images"))
    matched = {(r["volume"], tuple(f["images"])) for r in records if (f := match_finding(r, truth))}
    mined = score(records, truth, "slice", spacing)
    mined["recall_of_cited_findings"] = round(len(matched) / cited, 4) if cited else None
    result["mined_vs_true"] = mined
    print(f"mined vs true: {mined['in_true_range']} in the true slice range (n={mined['n']}), mean |error| "
          f"{mined['mean_abs_error_mm']} mm, recall of cited findings {mined['recall_of_cited_findings']}, "
          f"{mined['not_matching_any_finding']} references match no finding")

    weights = Path(ctvl.__file__).resolve().parent / "weights" / "demo" / "config.json"
    if args.model == "none" or (args.model == "demo" and not weights.is_file()):
        why = "--model none" if args.model == "none" else "no ctvl/weights/demo"
        result["model_vs_true"] = {"skipped": why}
        print(f"model vs true: skipped ({why})")
    else:
        from ctvl.inference import encode, load_model

        model = load_model(args.model, device="cpu")
        stats = AgreementStats()
        predicted = list(with_model_predictions(records, data, lambda v: encode(v, model),
                                                tolerance_mm=args.tolerance_mm, stats=stats))
        model_scores = score(predicted, truth, "model_slice", spacing)
        model_scores["agreement_with_mined"] = stats.as_dict()["agreement"]
        model_scores["encode_s_per_volume"] = round(stats.encode_s / max(1, stats.volumes_encoded), 3)
        result["model_vs_true"] = {"model": args.model, **model_scores}
        print(f"model vs true ({args.model}): {model_scores['in_true_range']} in the true slice range, mean "
              f"|error| {model_scores['mean_abs_error_mm']} mm; agrees with mined (<= {args.tolerance_mm} mm) "
              f"{model_scores['agreement_with_mined']}")
    if tmp is not None:
        tmp.cleanup()
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    print(f"wrote {RESULTS}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
