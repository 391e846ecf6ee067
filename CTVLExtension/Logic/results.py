"""The `ctvl analyze` pipeline: volume + model -> result.json, heatmaps/<label>.nii.gz, overview.png.

``result.json`` follows DESIGN.md: volume, model {name, version}, diseases [{name, probability, heatmap}],
queries [{text, slices: [{slice, position_mm, score}]}], timing_s.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any, Callable

from ctvl.atomic import atomic_file
from ctvl.errors import CTVLCancelled, CTVLInputError
from ctvl.geometry import Volume
from ctvl.inference import CancelLike, cancel_fn, check_text, encode

log = logging.getLogger(__name__)

TOP_FINDINGS_IN_OVERVIEW = 4


def write_json_atomic(data: Any, path: str | Path) -> Path:
    with atomic_file(path, "w", encoding="utf-8") as fh:
        json.dump(data, fh, indent=2)
        fh.write("\n")
    return Path(path)


def model_identity(model: Any) -> dict[str, str]:
    cfg = getattr(model, "config", None)
    return {"name": str(getattr(cfg, "name", "unknown")), "version": str(getattr(cfg, "version", "unknown"))}


def analyze(volume: str | Path | Volume, model: Any, out_dir: str | Path, queries: list[str] | None = None,
            labels: list[str] | None = None, heatmap_grid: str = "model", heatmaps: bool = True,
            overview: bool = True, top_k: int = 5, progress: Callable[[float, str], None] | None = None,
            cancel: CancelLike = None, source: str | None = None, load_s: float = 0.0) -> dict[str, Any]:
    """Run the whole analysis and write its outputs under ``out_dir``; returns the result dict.

    ``volume``: a path (read here, timed as ``load``) or an already read `Volume` (then ``source`` names it in
    result.json and ``load_s`` is the reading time to report).
    """
    from ctvl.io import read_volume, write_volume
    from ctvl.prompts import LABELS, label_slug

    queries = [check_text(q, "--query") for q in (queries or [])]
    if labels is not None:
        labels = [check_text(lbl, "--labels") for lbl in labels]
        known = set(getattr(model.config, "labels", None) or LABELS)
        unknown = [lbl for lbl in labels if lbl not in known]
        if unknown:
            raise CTVLInputError("--labels", f"unknown label(s) {unknown}", "use names from `ctvl info`")
    if heatmap_grid not in ("model", "input"):
        raise CTVLInputError("--heatmap-grid", f"unknown grid {heatmap_grid!r}", "use model or input")

    def report(lo: float, hi: float) -> Callable[[float, str], None]:
        return lambda f, msg: progress(lo + (hi - lo) * f, msg) if progress else None

    is_cancelled = cancel_fn(cancel)
    out_dir = Path(out_dir)
    timing: dict[str, float] = {}
    t = time.perf_counter()
    report(0, 1)(0.0, "reading volume")
    volume_path = source or "<memory>"
    if not isinstance(volume, Volume):
        volume_path, volume = source or str(volume), read_volume(volume)
        load_s = time.perf_counter() - t
    timing["load"] = load_s

    enc = encode(volume, model, progress=report(0.05, 0.6), cancel=cancel)
    timing["encode"] = enc.timing.get("preprocess", 0.0) + enc.timing.get("encode", 0.0)

    t = time.perf_counter()
    probs = enc.disease_probabilities(labels)
    timing["probabilities"] = time.perf_counter() - t

    diseases: list[dict[str, Any]] = []
    t = time.perf_counter()
    if heatmaps and hasattr(enc, "prepare_heatmaps"):  # label heatmaps: their encoder passes, cancellable
        enc.prepare_heatmaps(progress=report(0.6, 0.7), cancel=cancel, labels=list(probs))
    for n, (label, p) in enumerate(probs.items()):
        entry: dict[str, Any] = {"name": label, "probability": round(p, 6)}
        if heatmaps:
            if is_cancelled():
                raise CTVLCancelled("analysis cancelled")
            report(0.7, 0.85)(n / max(1, len(probs)), f"heatmap {label}")
            rel = f"heatmaps/{label_slug(label)}.nii.gz"
            write_volume(enc.heatmap(label, grid=heatmap_grid), out_dir / rel)  # float32 array
            entry["heatmap"] = rel
        diseases.append(entry)
    timing["heatmaps"] = time.perf_counter() - t

    t = time.perf_counter()
    query_results = [{"text": q, "slices": [h.as_dict() for h in enc.locate(q, top_k=top_k)]} for q in queries]
    timing["queries"] = time.perf_counter() - t

    result: dict[str, Any] = {
        "volume": str(volume_path),
        "model": model_identity(model),
        "diseases": diseases,
        "queries": query_results,
        "heatmap_grid": heatmap_grid if heatmaps else None,
        "timing_s": timing,
    }
    if overview:
        t = time.perf_counter()
        report(0.85, 1.0)(0.0, "overview")
        result["overview"] = "overview.png"
        write_overview_for(enc, probs, query_results, out_dir / "overview.png", str(volume_path))
        timing["overview"] = time.perf_counter() - t
    timing.update({k: round(v, 4) for k, v in timing.items()})
    write_json_atomic(result, out_dir / "result.json")
    report(0, 1)(1.0, "done")
    return result


def write_overview_for(enc: Any, probs: dict[str, float], query_results: list[dict[str, Any]], path: Path,
                       title: str = "") -> Path:
    from ctvl.overview import Panel, best_z_for, nearest_slice, write_overview

    panels = []
    for label, p in sorted(probs.items(), key=lambda kv: -kv[1])[:TOP_FINDINGS_IN_OVERVIEW]:
        z = best_z_for(enc, label)
        panels.append(Panel(f"{label}: p={p:.2f}\nslice {nearest_slice(enc, z)} ({z:.0f} mm)", z, label))
    for q in query_results:
        if not q["slices"]:
            continue
        best = q["slices"][0]
        text = q["text"] if len(q["text"]) <= 40 else q["text"][:37] + "..."
        panels.append(Panel(f'"{text}"\nslice {best["slice"]} ({best["position_mm"]:.0f} mm)',
                            float(best["position_mm"]), q["text"]))
    return write_overview(enc, panels, path, suptitle=Path(title).name if title else "")
