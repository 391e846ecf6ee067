"""Fit a model's label-grounded depth scores (`ModelConfig.locate_label_weight`) on a validation split.

``python -m training calibrate --weights W --data D --split valid [--out calibration.json] [--write]``

For every mined (snippet, slice) pair of the split it scores the depth bins twice, once as the model does without
labels (`pair_bin_logits`) and once by the heatmap peaks of the CT-RATE labels the snippet names
(`label_depth_evidence`), then tries each weight w of a grid on ``text + w * labels``. The rule: the largest mean
log-probability mass, under a softmax over the scan's depth bins, inside the finding's slice range (phantom ground
truth; on other data the bin of the cited slice), a smooth form of the localization loss. The argmax figures that
`training evaluate` reports (median error, % inside) are printed beside it. Like thresholds fixed on `valid`, the
weight must come from a split other than the one reported.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from ctvl.prompts import snippet_labels
from ctvl.tokengrid import refine_peak

from training import evaluate as E
from training.utils import atomic_write_bytes

log = logging.getLogger(__name__)

GRID = (0.0, 0.05, 0.1, 0.15, 0.2, 0.3, 0.4, 0.6, 0.8, 1.0)
RULE = "largest mean log-probability mass (softmax over the scan's depth bins) inside the finding's slice range"


@dataclass
class SnippetScores:
    """One mined pair: depth-bin scores without labels (`text`) and the named labels' evidence (`labels`, 0 when
    it names none), the scan's valid bins, the continuous input-slice coordinate of each bin's centre
    (`bin_coord`, of `n_slices`) and the ground truth."""

    label: str
    text: np.ndarray
    labels: np.ndarray
    valid: np.ndarray
    bin_coord: np.ndarray
    n_slices: int
    target: int
    slice_range: tuple[int, int] | None  # None without ground truth (the pair's mass is then the target's bin)
    slice_mm: float

    def slice_at(self, position: float) -> int:
        """The input slice at a (fractional) bin position, as `training evaluate` maps it."""
        coord = np.interp(position, np.arange(len(self.bin_coord)), self.bin_coord)
        return int(np.clip(round(coord), 0, max(self.n_slices - 1, 0)))


def collect(weights: str, data: str | Path, split: str = "valid", batch_size: int = 4, device: str = "auto",
            max_volumes: int | None = None, workers: int = 1) -> tuple[list[SnippetScores], Any]:
    """Score every mined pair of ``data/split`` with the model at ``weights`` (see the module docstring); returns
    the pairs and the model's config."""
    from ctvl.model import load_weights
    from ctvl.runtime import resolve_device

    run_on = resolve_device(device)
    model = load_weights(weights, device="cpu").eval().to(run_on)
    mc = model.config
    root = Path(data)
    bs = int(mc.downsample()[0])
    ds = E._dataset(root, split, E.Preprocess.from_model_config(mc), bs, max_volumes, None, workers)
    gt = E.load_ground_truth(root, split)
    out: list[SnippetScores] = []
    with torch.no_grad():
        pos, neg = model.prompt_embeddings()
        for batch in E._batches(ds, batch_size):
            if not batch["snippets"]:
                continue
            emb = model.encode_image(batch["image"].to(run_on, torch.float32))
            owner = batch["snippet_owner"].to(run_on)
            text = model.pair_bin_logits(emb, model.encode_text(batch["snippets"]), owner).float().cpu()
            named = [snippet_labels(t) for t in batch["snippets"]]
            sides = model.side_columns(batch["snippets"], batch["image"], batch["snippet_owner"])
            evidence = model.label_bin_logits(emb, named, owner, pos, neg, weight=1.0,  # None: no text names one
                                              columns=sides)
            valid = batch["bin_valid"][batch["snippet_owner"]].numpy()
            if evidence is None:
                evidence = torch.zeros(valid.shape)
            evidence = evidence.float().cpu().numpy()
            s_i = 0
            for b, i in enumerate(batch["index"]):
                rec = ds.records[int(i)]
                info = ds._info(rec)
                findings = gt.get(rec.name, {}).get("findings", [])
                coord = np.array([E._depth_to_slice_coord(info, k * bs + (bs - 1) / 2) for k in range(valid.shape[1])])
                for snippet, _depth, _bin, cited in E._item_snippets(batch, b, rec):
                    label, target, rng = E.snippet_truth(findings, snippet, cited)
                    out.append(SnippetScores(
                        label=label, text=text[s_i].numpy(), labels=evidence[s_i], valid=valid[s_i], bin_coord=coord,
                        n_slices=int(info["n_slices"]), target=target, slice_range=rng,
                        slice_mm=E.slice_step_mm(info)))
                    s_i += 1
    return out, mc


def score_weight(rows: list[SnippetScores], weight: float, radius: int = 0) -> dict[str, float]:
    """Mean log-mass inside the slice range, median |error| (mm) and % of located slices inside, for one weight
    (located as `training evaluate` does: `refine_peak` with ``radius``, the model's `locate_peak_radius`)."""
    mass, err, inside = [], [], []
    for r in rows:
        s = np.where(r.valid, r.text.astype(np.float64) + weight * r.labels, -np.inf)
        bin_slice = np.array([r.slice_at(k) for k in range(len(s))])
        lo, hi = r.slice_range or (r.target, r.target)
        hit = r.valid & (bin_slice >= lo) & (bin_slice <= hi)
        if hit.any():
            mass.append(np.logaddexp.reduce(s[hit]) - np.logaddexp.reduce(s[r.valid]))
        pred = r.slice_at(refine_peak(s, radius))
        err.append(abs(pred - r.target) * r.slice_mm)
        if r.slice_range is not None:  # as `training evaluate`: only pairs with a known range
            inside.append(r.slice_range[0] <= pred <= r.slice_range[1])
    return {"weight": float(weight), "log_mass_in_range": float(np.mean(mass)) if mass else float("nan"),
            "median_abs_error_mm": float(np.median(err)) if err else float("nan"),
            "within_range_pct": float(100 * np.mean(inside)) if inside else float("nan")}


def fit(rows: list[SnippetScores], grid: tuple[float, ...] = GRID, radius: int = 0) -> dict[str, Any]:
    """The grid's figures and the weight the rule picks (the first of equals; 0 when no pair has a range)."""
    table = [score_weight(rows, w, radius) for w in grid]
    scored = [t for t in table if np.isfinite(t["log_mass_in_range"])]
    best = max(scored, key=lambda t: t["log_mass_in_range"])["weight"] if scored else 0.0
    return {"rule": RULE, "n_pairs": len(rows), "named_pairs": int(sum(bool(r.labels.any()) for r in rows)),
            "grid": table, "locate_label_weight": float(best)}


def calibrate(weights: str, data: str | Path, split: str = "valid", grid: tuple[float, ...] = GRID,
              **kw: Any) -> dict[str, Any]:
    rows, mc = collect(weights, data, split, **kw)
    report = fit(rows, grid, int(mc.locate_peak_radius))
    # the weight goes with the laterality it was fitted under (config.locate_laterality): both are written
    report.update({"weights": str(weights), "data": str(data), "split": split,
                   "config": {"locate_label_weight": report["locate_label_weight"],
                              "locate_laterality": bool(mc.locate_laterality)}})
    return report


def write_into(weights_dir: str | Path, values: dict[str, Any]) -> Path:
    """Set ``values`` in a weights directory's config.json (validated, atomic); returns its path."""
    from ctvl.model import ModelConfig
    from ctvl.model.weights import CONFIG_FILE, resolve_weights_dir

    path = resolve_weights_dir(weights_dir) / CONFIG_FILE
    cfg = ModelConfig.from_dict({**json.loads(path.read_text()), **values}, source=str(path)).validate(path)
    atomic_write_bytes(path, cfg.to_json().encode("utf-8"))
    return path


def format_fit(report: dict[str, Any]) -> str:
    lines = [f"label-grounded depth scores on split '{report.get('split')}': {report['n_pairs']} pairs, "
             f"{report['named_pairs']} naming a CT-RATE label", "weight  log-mass in range  median mm  within %"]
    for t in report["grid"]:
        mark = "  <- " if t["weight"] == report["locate_label_weight"] else ""
        lines.append(f"{t['weight']:6.2f}  {t['log_mass_in_range']:17.4f}  {t['median_abs_error_mm']:9.2f}  "
                     f"{t['within_range_pct']:8.1f}{mark}")
    lines.append(f"rule: {report['rule']}")
    return "\n".join(lines)
