"""Shared helpers for the benchmark scripts: result files, phantom splits, headline numbers."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"


def write_json(path: str | Path, data: Any) -> None:
    """Atomically write `data` as indented JSON."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "w") as f:
        json.dump(data, f, indent=2, default=float)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def ensure_split(root: Path, split: str, n: int, seed: int) -> None:
    """Generate the phantom `split` under `root` (CT-RATE layout) if its reports CSV is missing."""
    if (root / "radiology_text_reports" / f"{split}_reports.csv").is_file():
        return
    from ctvl.phantom import write_dataset

    write_dataset(root, n, seed=seed, split=split, workers=max(1, (os.cpu_count() or 1)), progress=True)


def headline(report: dict) -> dict[str, float | None]:
    """The numbers the issue's targets name, from a training.evaluate report."""
    c, r = report["classification"], report["retrieval"]
    loc, h = report.get("localization", {}), report.get("heatmaps", {})
    return {
        "auroc": c["mean"]["auroc"],
        # each score the shipped probability averages, alone (training.evaluate.score_branches)
        "auroc_pooled": report.get("score_branches", {}).get("pooled", {}).get("mean_auroc"),
        "auroc_mil": report.get("score_branches", {}).get("mil", {}).get("mean_auroc"),
        "f1_fixed_on_valid": c["mean"].get("fixed_on_valid", {}).get("f1"),
        "f1_eval_set": c["mean"].get("eval_set", {}).get("f1"),
        "R@1": r.get("R@1"), "R@5": r.get("R@5"), "R@10": r.get("R@10"), "R@50": r.get("R@50"),
        "loc_median_mm": loc.get("median_abs_error_mm"),
        "loc_within_pct": loc.get("within_range_pct"),
        "pointing_game": h.get("pointing_game"),
        "pointing_game_per_finding": h.get("pointing_game_per_finding"),
        "pointing_within_tolerance": h.get("pointing_game_within_tolerance"),
        "median_peak_distance_mm": h.get("median_peak_distance_mm"),
        "mass_in_mask": h.get("mass_in_mask"),
        "intervals": report.get("intervals"),
    }
