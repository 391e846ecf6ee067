"""The CT-RATE evaluation protocol (+ localization and heatmap checks against phantom ground truth).

- Zero-shot classification with the positive/negative prompt pair: per-label and mean AUROC, F1, accuracy,
  precision. Thresholds: (a) ``eval_set``: picked per class on the evaluation set itself (CT-CLIP's Youden rule;
  flatters F1), (b) ``fixed_on_valid``: picked the same way on ``--val-split`` and applied unchanged.
- ``score_branches``: the mean and per-label AUROC of each score the shipped probability averages, on its own:
  the strict zero-shot prompt pair on the pooled embedding, and (config.mil_disease) the token-level MIL score.
- Report -> volume retrieval Recall@1/5/10/50 inside pools of ``pool_size`` volumes (CT-CLIP's "R@10 among 100").
- Snippet localization: predicted slice = the best depth bin's centre mapped to the input slice; error |delta| in
  slices and mm, % inside the finding's slice range (phantom ``ground_truth.jsonl``; else the cited slice).
- Heatmaps (phantom masks), focal findings: pointing game per (volume, label) with Zhang et al.'s hit rule (a hit
  when the argmax of the label-prompt heatmap (on the model's `heatmap_subdivision` grid, or on the model grid when
  its `heatmap_guidance` sharpens it: the map the product shows, `ctvl.model.guidance`), resampled to the input
  grid, lies on any of the label's instance masks) but without their 15-pixel tolerance (stricter; this is the
  target's figure), also per finding (stricter still: one maximum can hit only one of two nodules), and
  mass-in-mask (share of the heatmap mass above its mean inside the label's masks). Reported beside it, not
  instead: the peak's distance to the nearest mask voxel (mm) and the share of peaks within
  ``POINTING_TOLERANCE_MM`` of it, which tells a near miss from a wrong organ.
- Intervals: 95% percentile-bootstrap intervals over volumes for mean AUROC, localization (median mm, % inside)
  and the pointing game (``bootstrap`` draws; `intervals`): 100 phantom scans leave room for chance.
- ``baseline``: ``random`` (random scores/embeddings/heatmaps) or ``prevalence`` (label prevalence as the score,
  centre slice, flat heatmap), so the benchmark shows what a trivial model gets; ``mask`` is the prevalence baseline
  with oracle heatmaps: each token's share of voxels on the label's phantom masks
  (`mask_occupancy`), an oracle that tells what the pointing game can reach at that grid (the heatmap grid of
  ``--weights``' config: tokens, or the stitched grid with ``heatmap_subdivision``).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from ctvl.model.guidance import guided_heatmap, label_attribution, to_model_grid
from ctvl.model.stitch import stitched, stitched_ijk_to_ras
from ctvl.prompts import LABELS, snippet_labels
from ctvl.tokengrid import refine_peak

from training import metrics as M
from training.data import CTRateDataset, Preprocess, collate

log = logging.getLogger(__name__)

POINTING_TOLERANCE_MM = 10.0  # about one small nodule's diameter
FOCAL_LABELS = {"Lung nodule", "Consolidation", "Lung opacity", "Atelectasis", "Lymphadenopathy", "Hiatal hernia",
                "Pericardial effusion", "Pleural effusion", "Bronchiectasis"}


# ------------------------------------------------------------------------------------------- predictors


class ModelPredictor:
    def __init__(self, model, device: torch.device) -> None:
        self.model = model.eval().to(device)
        self.device = device
        self.bin_size = int(model.config.downsample()[0])
        self.guided = model.config.heatmap_guidance != "none"  # its heatmaps lie on the model grid
        with torch.no_grad():
            self.pos, self.neg = model.prompt_embeddings()

    @torch.no_grad()
    def __call__(self, batch: dict, heat_labels: list[list[int]]) -> dict:
        m = self.model
        emb = m.encode_image(batch["image"].to(self.device, torch.float32))
        valid = batch["bin_valid"].to(self.device)
        logits = m.final_disease_logits(emb.pooled, self.pos, self.neg, tokens=m.label_tokens(emb), mask=valid,
                                        evidence=emb.evidence)
        probs = torch.sigmoid(logits).float().cpu().numpy()
        # the two scores the shipped one averages (config.mil_disease), each on its own (`score_branches`)
        branches = {"pooled": m.disease_logits(emb.pooled, self.pos, self.neg).float().cpu().numpy()}
        if m.config.mil_disease:
            branches["mil"] = m.mil_logits(m.label_tokens(emb), self.pos, self.neg, LABELS, mask=valid,
                                           evidence=emb.evidence).float().cpu().numpy()
        reports = m.encode_reports(batch["text"]).float().cpu().numpy()
        bins = []
        if batch["snippets"]:
            snip = m.encode_text(batch["snippets"])
            owner = batch["snippet_owner"].to(self.device)
            named = [snippet_labels(t) for t in batch["snippets"]]  # label-grounded depth scores (if calibrated)
            sides = m.side_columns(batch["snippets"], batch["image"], batch["snippet_owner"])
            logits = m.pair_bin_logits(emb, snip, owner, named, (self.pos, self.neg), sides)
            valid = batch["bin_valid"].to(self.device)[owner]
            bins = list(logits.masked_fill(~valid, float("-inf")).float().cpu().numpy())  # argmax over the scan
        heats, label_tokens = [], m.label_tokens(emb)
        sub = tuple(m.config.heatmap_subdivision)
        for i, labs in enumerate(heat_labels):
            if not labs:
                heats.append({})
                continue
            x = batch["image"][i : i + 1].to(self.device, torch.float32)
            names = [LABELS[lab] for lab in labs]
            if sub != (1, 1, 1):  # the finer heatmaps the product shows (shift-and-stitch, config.heatmap_subdivision)
                z = m.stitched_heatmap_logits(x, names, self.pos[labs], self.neg[labs])[0]
            else:
                ev = emb.evidence[i : i + 1] if emb.evidence is not None else None
                z = m.disease_heatmap_logits(label_tokens[i : i + 1], names, self.pos[labs], self.neg[labs], ev)[0]
            if self.guided:  # on the model grid, sharpened by the input x gradient (config.heatmap_guidance)
                coarse = to_model_grid(z, tuple(m.config.downsample()), sub, tuple(x.shape[-3:]))
                attribution = label_attribution(m, x, names, self.pos[labs], self.neg[labs])
                z = torch.stack([guided_heatmap(c, a) for c, a in zip(coarse, attribution)])
            heats.append({lab: z[j].float().cpu().numpy() for j, lab in enumerate(labs)})
        return {"probs": probs, "image": emb.pooled.float().cpu().numpy(), "report": reports, "bins": bins,
                "heat": heats, "branches": branches}


BASELINES = ("random", "prevalence", "mask")


class BaselinePredictor:
    """``random``: random everything; ``prevalence``: label prevalence, centre slice, flat heatmap; ``mask``: as
    ``prevalence`` but its heatmaps are None, for `evaluate` to fill with the masks' token occupancy."""

    def __init__(self, kind: str, token_grid: tuple[int, int, int], bin_size: int, prevalence: np.ndarray,
                 seed: int = 0) -> None:
        if kind not in BASELINES:
            raise ValueError(f"unknown baseline {kind!r} ({' | '.join(BASELINES)})")
        self.kind, self.grid, self.bin_size, self.prev = kind, token_grid, bin_size, prevalence
        self.rng = np.random.default_rng(seed)

    def __call__(self, batch: dict, heat_labels: list[list[int]]) -> dict:
        n, s, d = len(batch["text"]), len(batch["snippets"]), self.grid[0]
        if self.kind == "random":
            probs = self.rng.random((n, len(LABELS)))
            bins = list(self.rng.random((s, d)))
            heats = [{lab: self.rng.random(self.grid) for lab in labs} for labs in heat_labels]
        else:
            probs = np.tile(np.nan_to_num(self.prev, nan=0.0), (n, 1))
            centre = np.zeros(d)
            centre[d // 2] = 1.0
            bins = [centre.copy() for _ in range(s)]
            flat = None if self.kind == "mask" else np.ones(self.grid)
            heats = [{lab: flat for lab in labs} for labs in heat_labels]
        return {"probs": probs, "image": self.rng.normal(size=(n, 32)), "report": self.rng.normal(size=(n, 32)),
                "bins": bins, "heat": heats}


# ------------------------------------------------------------------------------------------- ground truth


def load_ground_truth(root: Path, split: str) -> dict[str, dict]:
    """Phantom ``ground_truth.jsonl`` records keyed by volume name (empty when absent)."""
    out: dict[str, dict] = {}
    candidates = (root / "ground_truth.jsonl", root / split / "ground_truth.jsonl")
    for path in candidates:
        if not path.is_file():
            continue
        for line in path.read_text().splitlines():
            if line.strip():
                rec = json.loads(line)
                name = rec.get("volume_name") or rec.get("volume") or rec.get("VolumeName")
                if name and rec.get("split", split) == split:
                    out[Path(name).name] = rec
    return out


def _norm(text: str) -> str:
    return " ".join("".join(c.lower() if c.isalnum() else " " for c in text).split())


def match_finding(findings: list[dict], snippet: str, cited: int) -> dict | None:
    """The ground-truth finding a mined snippet talks about: sentence overlap first, then the cited slice."""
    sn = _norm(snippet)
    for f in findings:
        sent = _norm(f.get("sentence", ""))
        if sent and (sn in sent or sent in sn):
            return f
    inside = [f for f in findings if f.get("slice_range") and f["slice_range"][0] <= cited <= f["slice_range"][1]]
    if inside:
        return inside[0]
    return None


def snippet_truth(findings: list[dict], snippet: str, cited: int) -> tuple[str, int, tuple[int, int] | None]:
    """(label, target slice, slice range or None) of a mined snippet: its ground-truth finding's label, centre and
    range when `match_finding` finds one, else ("unmatched", the cited slice, None)."""
    f = match_finding(findings, snippet, cited) if findings else None
    target = int(f["centre_slice"]) if f and "centre_slice" in f else int(cited)
    rng = (int(f["slice_range"][0]), int(f["slice_range"][1])) if f and f.get("slice_range") else None
    return (f or {}).get("label", "unmatched"), target, rng


def slice_step_mm(info: dict) -> float:
    """Distance (mm) between neighbouring input slices of a dataset record's info (0 for one slice)."""
    pos = info["slice_positions_mm"]
    return float(abs(pos[1] - pos[0])) if info["n_slices"] > 1 else 0.0


def _mask_path(root: Path, split: str, name: str, rec: dict) -> Path | None:
    for key in ("mask", "mask_path"):
        if rec.get(key):
            p = Path(rec[key])
            return p if p.is_absolute() else root / p
    for p in (root / "masks" / split / name, root / "masks" / name):
        if p.is_file():
            return p
    hits = list((root / "masks").rglob(name)) if (root / "masks").is_dir() else []
    return hits[0] if hits else None


# ------------------------------------------------------------------------------------------- evaluation


def mask_occupancy(mask, values: list[int], model_affine: np.ndarray, model_shape: tuple[int, int, int],
                   token_size: tuple[int, int, int], subdivision: tuple[int, int, int] = (1, 1, 1)) -> np.ndarray:
    """Share of each token's model voxels that lie on the instances ``values`` of ``mask`` (a `Volume`): an oracle
    heatmap on this token grid, whose pointing game tells what the metric can reach at that resolution; with
    ``subdivision`` on the grid of the model's stitched heatmaps (the token-sized box at every cell)."""
    from ctvl.geometry import Volume, resample

    on = Volume(np.isin(mask.array, values).astype(np.float32), mask.ijk_to_ras)
    model = resample(on, model_affine, tuple(model_shape), order=0, fill=0.0).array
    box = tuple(int(p) for p in token_size)
    occ = stitched(lambda t: F.avg_pool3d(t, box, box), torch.from_numpy(np.ascontiguousarray(model))[None, None],
                   box, subdivision)
    return occ[0, 0].numpy()


def _dataset(root, split, pre, bin_size, max_volumes, cache_dir, workers) -> CTRateDataset:
    ds = CTRateDataset(root, split, pre, cache_dir=cache_dir, bin_depth=bin_size, augment=None,
                       max_volumes=max_volumes, max_snippets=1000)
    ds.prepare(workers=workers, progress=True)
    return ds


def classification_scores(ds: CTRateDataset, predictor, batch_size: int) -> tuple[np.ndarray, np.ndarray]:
    probs, labels = [], []
    for batch in _batches(ds, batch_size):
        probs.append(predictor(batch, [[] for _ in batch["names"]])["probs"])
        labels.append(batch["labels"].numpy())
    return np.concatenate(probs), np.concatenate(labels)


def _batches(ds: CTRateDataset, batch_size: int):
    loader = torch.utils.data.DataLoader(ds, batch_size=batch_size, shuffle=False, collate_fn=collate)
    for batch in loader:
        if batch is not None:
            yield batch


def classification_report(probs: np.ndarray, labels: np.ndarray, thresholds: dict[str, np.ndarray]) -> dict:
    out: dict[str, Any] = {"per_label": {}, "mean": {}}
    rows = []
    for j, name in enumerate(LABELS):
        ok = ~np.isnan(labels[:, j])
        y, s = labels[ok, j] > 0.5, probs[ok, j]
        row: dict[str, Any] = {"n": int(ok.sum()), "positives": int(y.sum()), "auroc": M.auroc(y, s)}
        for rule, th in thresholds.items():
            row[rule] = {"threshold": float(th[j]), **M.binary_metrics(y, s >= th[j])}
        out["per_label"][name] = row
        rows.append(row)
    # means over labels with both classes present (AUROC is undefined otherwise; F1 would be a meaningless 0)
    both = [r for r in rows if 0 < r["positives"] < r["n"]]
    out["mean"]["n_labels"] = len(both)
    out["mean"]["auroc"] = M.mean_auroc(labels, probs)  # the same labels as `both`
    for rule in thresholds:
        out["mean"][rule] = {k: float(np.mean([r[rule][k] for r in both])) if both else float("nan")
                             for k in ("f1", "accuracy", "precision", "recall")}
    return out


BRANCHES = {"pooled": "zero-shot prompt pair on the pooled embedding alone",
            "mil": "token-level (MIL) score alone: LSE pooling of the label heatmap"}


def score_branches(branches: dict[str, np.ndarray], labels: np.ndarray) -> dict:
    """AUROC of each score the shipped probability averages (`CTVLModel.final_disease_logits`), on its own: which
    carries the reading, and whether the strict zero-shot (pooled) score generalises as the token-level one does."""
    return {name: {"what": BRANCHES[name], "mean_auroc": M.mean_auroc(labels, s),
                   "per_label_auroc": {lab: M.auroc(labels[~np.isnan(labels[:, j]), j] > 0.5,
                                                    s[~np.isnan(labels[:, j]), j]) for j, lab in enumerate(LABELS)}}
            for name, s in branches.items()}


def pick_thresholds(probs: np.ndarray, labels: np.ndarray, rule: str) -> np.ndarray:
    th = np.full(len(LABELS), 0.5)
    for j in range(len(LABELS)):
        ok = ~np.isnan(labels[:, j])
        y = labels[ok, j] > 0.5
        if 0 < y.sum() < y.size:
            th[j] = M.pick_threshold(y, probs[ok, j], rule)
    return th


def evaluate(
    weights: str | None, data: str | Path, split: str = "valid", val_split: str | None = None,
    baseline: str | None = None, batch_size: int = 4, pool_size: int = 100, max_volumes: int | None = None,
    threshold_rule: str = "youden", device: str = "auto", cache_dir: str | None = None, workers: int = 1,
    heatmaps: bool = True, seed: int = 0, bootstrap: int = 1000,
) -> dict:
    """Run the protocol on ``data/split``; returns the report dict (see module docstring). ``bootstrap``: draws
    for the 95% intervals of the headline figures (0: none)."""
    from ctvl.geometry import Volume, resample
    from ctvl.io import read_volume
    from ctvl.model import ModelConfig

    root = Path(data)
    model = None
    if weights:
        from ctvl.model import load_weights
        from ctvl.runtime import resolve_device

        run_on = resolve_device(device)  # a missing GPU fails here, before any data work

        model = load_weights(weights, device="cpu")
        mc = model.config
    else:
        if not baseline:
            raise ValueError("give --weights or --baseline")
        mc = ModelConfig()
    pre = Preprocess.from_model_config(mc)
    bsize = tuple(int(x) for x in mc.downsample())
    ds = _dataset(root, split, pre, bsize[0], max_volumes, cache_dir, workers)
    val_ds = None
    if val_split and (root / "radiology_text_reports" / f"{val_split}_reports.csv").is_file():
        val_ds = _dataset(root, val_split, pre, bsize[0], max_volumes, cache_dir, workers)
    if baseline:
        prev = np.nanmean(np.stack([r.labels for r in (val_ds or ds).records]), axis=0)
        heat_grid = tuple(g * int(n) for g, n in zip(mc.token_grid(), mc.heatmap_subdivision))
        predictor = BaselinePredictor(baseline, heat_grid, bsize[0], prev, seed)
    else:
        predictor = ModelPredictor(model, run_on)

    gt = load_ground_truth(root, split)
    radius = int(mc.locate_peak_radius) if model is not None else 0
    probs, labels, img_emb, rep_emb, names = [], [], [], [], []
    branches: dict[str, list[np.ndarray]] = {}
    loc_rows, point_rows, finding_rows = [], [], []
    for batch in _batches(ds, batch_size):
        recs = [ds.records[int(i)] for i in batch["index"]]
        names += [r.name for r in recs]
        heat_labels = []
        for r in recs:
            fs = gt.get(r.name, {}).get("findings", []) if heatmaps else []
            heat_labels.append(sorted({LABELS.index(f["label"]) for f in fs if f.get("label") in LABELS
                                       and f.get("mask_value") and (f.get("focal", f["label"] in FOCAL_LABELS))}))
        out = predictor(batch, heat_labels)
        probs.append(out["probs"])
        labels.append(batch["labels"].numpy())
        for name, scores in out.get("branches", {}).items():
            branches.setdefault(name, []).append(scores)
        img_emb.append(out["image"])
        rep_emb.append(out["report"])
        # localization
        s_i = 0
        for b, r in enumerate(recs):
            info = ds._info(r)
            findings = gt.get(r.name, {}).get("findings", [])
            for snippet, _depth, _bin, cited in _item_snippets(batch, b, r):
                logits = out["bins"][s_i]
                s_i += 1
                best = refine_peak(logits, radius)  # sub-bin position of the best bin (locate does the same)
                pred = _depth_to_slice(info, best * bsize[0] + (bsize[0] - 1) / 2)
                label, target, rng = snippet_truth(findings, snippet, cited)
                loc_rows.append({"volume": r.name, "label": label, "pred": pred, "target": target,
                                 "err": abs(pred - target), "err_mm": abs(pred - target) * slice_step_mm(info),
                                 "within": (rng[0] <= pred <= rng[1]) if rng else None})
            # heatmaps
            if not heat_labels[b]:
                continue
            mpath = _mask_path(root, split, r.name, gt[r.name])
            if mpath is None:
                continue
            mask = read_volume(mpath, validate=False)
            heat_aff = np.asarray(info["model_ijk_to_ras"]) if getattr(predictor, "guided", False) else \
                stitched_ijk_to_ras(np.asarray(info["model_ijk_to_ras"]), bsize, mc.heatmap_subdivision)
            instances: dict[str, list[int]] = {}  # label -> mask values of its focal findings in this volume
            for f in findings:
                if f.get("label") in LABELS and LABELS.index(f["label"]) in out["heat"][b] and f.get("mask_value") \
                        and f.get("focal", f["label"] in FOCAL_LABELS):
                    instances.setdefault(f["label"], []).append(int(f["mask_value"]))
            for label, values in instances.items():
                heat = out["heat"][b][LABELS.index(label)]
                if heat is None:  # the mask baseline
                    heat = mask_occupancy(mask, values, np.asarray(info["model_ijk_to_ras"]), mc.input_shape, bsize,
                                          mc.heatmap_subdivision)
                on_input = resample(Volume(heat.astype(np.float32), heat_aff), mask.ijk_to_ras, mask.array.shape,
                                    order=1, fill=float(heat.min())).array
                row, hits = pointing(on_input, mask.array, values, spacing=mask.spacing[::-1])
                finding_rows += [{"volume": r.name, "label": label, "hit": h} for h in hits]
                if row is not None:
                    row["peak_offset_ras_mm"] = offset_ras_mm(row.pop("peak_offset_vox"), mask.ijk_to_ras)
                    point_rows.append({"volume": r.name, "label": label, **row})

    probs, labels = np.concatenate(probs), np.concatenate(labels)
    thresholds = {"eval_set": pick_thresholds(probs, labels, threshold_rule)}
    if val_ds is not None:
        vp, vl = classification_scores(val_ds, predictor, batch_size)
        thresholds["fixed_on_valid"] = pick_thresholds(vp, vl, threshold_rule)
    report: dict[str, Any] = {
        "weights": weights, "baseline": baseline, "data": str(root), "split": split, "val_split": val_split,
        "n_volumes": int(probs.shape[0]), "skipped_volumes": sorted(ds.bad),
        "threshold_rule": {
            "rule": threshold_rule,
            "eval_set": "thresholds picked per class on the evaluation set itself (CT-CLIP protocol; flatters F1)",
            "fixed_on_valid": (f"thresholds picked per class on split '{val_split}', applied unchanged"
                               if "fixed_on_valid" in thresholds else "not computed (no validation split)"),
        },
        "classification": classification_report(probs, labels, thresholds),
        "score_branches": score_branches({k: np.concatenate(v) for k, v in branches.items()}, labels),
        "retrieval": M.pooled_recall_at_k(np.concatenate(rep_emb), np.concatenate(img_emb), pool_size, seed=seed),
        "localization": _summarise_loc(loc_rows, ds.snippet_stats, bool(gt)),
        "heatmaps": _summarise_points(point_rows, finding_rows),
    }
    if bootstrap:
        report["intervals"] = intervals(names, probs, labels, loc_rows, point_rows, bootstrap, seed)
    return report


def intervals(names: list[str], probs: np.ndarray, labels: np.ndarray, loc_rows: list[dict],
              point_rows: list[dict], n_boot: int = 1000, seed: int = 0) -> dict:
    """95% percentile-bootstrap intervals of the headline figures over the evaluated volumes (`metrics.
    bootstrap_interval`): how far the figures could move on another draw of as many scans. Retrieval has none (its
    pools of 100 would hold repeated volumes)."""
    where = {name: i for i, name in enumerate(names)}

    def per_volume(rows: list[dict], key: str) -> list[np.ndarray]:
        out: list[list[float]] = [[] for _ in names]
        for r in rows:
            if r[key] is not None:
                out[where[r["volume"]]].append(float(r[key]))
        return [np.asarray(v, dtype=np.float64) for v in out]

    def interval(values: list[np.ndarray], reduce, scale: float = 1.0) -> list[float] | None:
        def stat(idx: np.ndarray) -> float:
            v = M.pick_units(values, idx)
            return float(reduce(v)) * scale if v.size else float("nan")

        found = M.bootstrap_interval(len(names), stat, n_boot, seed=seed)
        return list(found) if found else None

    auroc = M.bootstrap_interval(len(names), lambda idx: M.mean_auroc(labels[idx], probs[idx]), n_boot, seed=seed)
    return {
        "method": f"percentile bootstrap over the {len(names)} volumes, {n_boot} draws, 95%",
        "auroc": list(auroc) if auroc else None,
        "loc_median_mm": interval(per_volume(loc_rows, "err_mm"), np.median),
        "loc_within_pct": interval(per_volume(loc_rows, "within"), np.mean, 100.0),
        "pointing_game": interval(per_volume(point_rows, "hit"), np.mean),
    }


def pointing(heat: np.ndarray, mask: np.ndarray, values: list[int], spacing=(1.0, 1.0, 1.0)
             ) -> tuple[dict | None, list[bool]]:
    """Pointing game of one label's heatmap (on the mask's grid) against its instances (mask values).

    Returns ({hit, peak_distance_mm, peak_offset_vox, mass_in_mask, mask_fraction} for the union of the instances,
    or None when none is in the mask; one hit per instance present). hit: the heatmap's argmax lies on the
    instance(s); peak_distance_mm: from the argmax to the nearest instance voxel (0 on a hit; `spacing` = mm per
    array axis); peak_offset_vox: that step in array axes (voxels; zeros on a hit), whose direction tells a
    systematic miss from a scattered one; mass_in_mask: share of the heatmap above its mean that lies inside.
    """
    peak = int(np.argmax(heat))
    per_instance = [bool(mask.flat[peak] == v) for v in values if (mask == v).any()]
    union = np.isin(mask, values)
    if not union.any():
        return None, per_instance
    steps = np.array(np.unravel_index(peak, heat.shape)) - np.argwhere(union)  # instance voxel -> argmax
    mm = np.sqrt(((steps * np.asarray(spacing, dtype=float)) ** 2).sum(1))
    nearest = int(np.argmin(mm))
    pos = np.maximum(heat - heat.mean(), 0)
    mass = float(pos[union].sum() / pos.sum()) if pos.sum() > 0 else 0.0
    return {"hit": bool(union.flat[peak]), "peak_distance_mm": float(mm[nearest]),
            "peak_offset_vox": [int(v) for v in steps[nearest]], "mass_in_mask": mass,
            "mask_fraction": float(union.mean())}, per_instance


def _item_snippets(batch: dict, b: int, r) -> list[tuple]:
    n = int((batch["snippet_owner"] == b).sum())  # evaluation keeps every pair, in the record's order
    return r.snippets[:n]


def _depth_to_slice(info: dict, depth: float) -> int:
    """The input slice nearest to model depth ``depth`` (model voxels along d, fractional)."""
    pos = np.asarray(info["slice_positions_mm"])
    if len(pos) < 2:
        return 0
    return int(np.clip(round(_depth_to_slice_coord(info, depth)), 0, len(pos) - 1))


def _depth_to_slice_coord(info: dict, depth: float) -> float:
    """Model depth -> continuous input-slice coordinate (linear; 0 for a single slice)."""
    a = np.asarray(info["model_ijk_to_ras"])
    z = a[2, 3] + a[2, 2] * depth
    pos = np.asarray(info["slice_positions_mm"])
    if len(pos) < 2:
        return 0.0
    return float((z - pos[0]) / (pos[1] - pos[0]))


def _summarise_loc(rows: list[dict], stats: dict, has_gt: bool) -> dict:
    out: dict[str, Any] = {"n_pairs": len(rows), "pairs": stats,
                           "ground_truth": "phantom slice ranges" if has_gt else "cited slice"}
    if rows:
        err = np.array([r["err"] for r in rows], dtype=float)
        out["median_abs_error_slices"] = float(np.median(err))
        out["median_abs_error_mm"] = float(np.median([r["err_mm"] for r in rows]))
        within = [r["within"] for r in rows if r["within"] is not None]
        out["within_range_pct"] = float(100 * np.mean(within)) if within else None
        out["per_label"] = {}
        for lab, group in sorted(_group(rows, "label", "err_mm").items()):
            inside = [r["within"] for r in rows if r["label"] == lab and r["within"] is not None]
            out["per_label"][lab] = {"n": len(group), "median_abs_error_mm": float(np.median(group)),
                                     "within_range_pct": float(100 * np.mean(inside)) if inside else None}
    return out


def _summarise_points(rows: list[dict], finding_rows: list[dict]) -> dict:
    """rows: one per (volume, label) with the union of that label's instance masks (the pointing game of Zhang et
    al.: a hit when the heatmap's maximum lies on any instance of the category); finding_rows: one per finding
    (stricter: a volume with two nodules can score at most one hit with one maximum)."""
    if not rows:
        return {"n_findings": 0}
    distances = _group(rows, "label", "peak_distance_mm")
    return {
        "n_findings": len(finding_rows),
        "n_volume_labels": len(rows),
        "pointing_game": float(np.mean([r["hit"] for r in rows])),
        "pointing_game_per_finding": float(np.mean([r["hit"] for r in finding_rows])) if finding_rows else None,
        "tolerance_mm": POINTING_TOLERANCE_MM,
        "pointing_game_within_tolerance": float(np.mean([r["peak_distance_mm"] <= POINTING_TOLERANCE_MM
                                                         for r in rows])),
        "median_peak_distance_mm": float(np.median([r["peak_distance_mm"] for r in rows])),
        "mass_in_mask": float(np.mean([r["mass_in_mask"] for r in rows])),
        "mask_fraction": float(np.mean([r["mask_fraction"] for r in rows])),
        "per_label": {lab: {"n": len(hits), "pointing_game": float(np.mean(hits)),
                            "median_peak_distance_mm": float(np.median(distances[lab])),
                            **_miss_direction([r for r in rows if r["label"] == lab])}
                      for lab, hits in sorted(_group(rows, "label", "hit").items())},
    }


def offset_ras_mm(step_array_axes, ijk_to_ras: np.ndarray) -> list[float]:
    """A voxel step in a volume's array axes (k, j, i, as `Volume.array` holds them) -> the same step in RAS mm."""
    step_ijk = np.asarray(step_array_axes, dtype=float)[::-1]
    return [float(v) for v in np.asarray(ijk_to_ras, dtype=float)[:3, :3] @ step_ijk]


def _miss_direction(rows: list[dict]) -> dict:
    """Where a label's misses lie: the per-axis median of the step from the nearest finding voxel to the heatmap
    peak, in patient RAS mm (+R, +A, +S), over the missed (volume, label) rows, and their count. A median far from
    0 on an axis with a small spread is a systematic offset (e.g. peaks above the finding), not scatter."""
    misses = [r["peak_offset_ras_mm"] for r in rows if not r["hit"] and "peak_offset_ras_mm" in r]
    if not misses:
        return {"misses": 0}
    return {"misses": len(misses), "miss_offset_ras_mm": [float(v) for v in np.median(np.asarray(misses), axis=0)]}


def _group(rows: list[dict], key: str, value: str) -> dict[str, list]:
    out: dict[str, list] = {}
    for r in rows:
        out.setdefault(r[key], []).append(r[value])
    return out


def format_table(report: dict) -> str:
    """A plain-text table of the headline numbers (printed by the CLI)."""
    c = report["classification"]
    rules = [k for k in ("eval_set", "fixed_on_valid") if k in c["mean"]]
    lines = [f"{'label':36s} {'AUROC':>6s} " + " ".join(f"{'F1/acc/prec (' + r + ')':>30s}" for r in rules)]
    for name, row in c["per_label"].items():
        cells = " ".join(f"{row[r]['f1']:>8.3f}/{row[r]['accuracy']:.3f}/{row[r]['precision']:.3f}".rjust(30)
                         for r in rules)
        lines.append(f"{name:36s} {row['auroc']:>6.3f} {cells}")
    cells = " ".join(f"{c['mean'][r]['f1']:>8.3f}/{c['mean'][r]['accuracy']:.3f}/{c['mean'][r]['precision']:.3f}"
                     .rjust(30) for r in rules)
    lines.append(f"{'MEAN':36s} {c['mean']['auroc']:>6.3f} {cells}")
    if report.get("score_branches"):
        lines.append("mean AUROC of each score alone: " + ", ".join(
            f"{b['what']} {b['mean_auroc']:.3f}" for b in report["score_branches"].values()))
    r = report["retrieval"]
    lines.append(f"retrieval (pool {r['pool_size']} x {r['n_pools']}): "
                 + ", ".join(f"{k} {v:.3f}" for k, v in r.items() if k.startswith("R@")))
    loc = report["localization"]
    if loc.get("n_pairs"):
        w = loc.get("within_range_pct")
        lines.append(f"localization ({loc['n_pairs']} pairs, GT {loc['ground_truth']}): median |d| "
                     f"{loc['median_abs_error_slices']:.1f} slices / {loc['median_abs_error_mm']:.1f} mm"
                     + (f", within range {w:.1f}%" if w is not None else ""))
    h = report["heatmaps"]
    if h.get("n_findings"):
        lines.append(f"heatmaps ({h['n_volume_labels']} volume-label pairs, {h['n_findings']} focal findings): "
                     f"pointing game {h['pointing_game']:.3f} (per finding {h['pointing_game_per_finding']:.3f}; "
                     f"peak within {h['tolerance_mm']:.0f} mm {h['pointing_game_within_tolerance']:.3f}, median "
                     f"peak distance {h['median_peak_distance_mm']:.1f} mm), mass in mask {h['mass_in_mask']:.3f} "
                     f"(mask fraction {h['mask_fraction']:.4f})")
        for name, row in h["per_label"].items():
            miss = row.get("miss_offset_ras_mm")
            where = (" (R, A, S) " + ", ".join(f"{v:+.1f}" for v in miss) + " mm from the finding") if miss else ""
            lines.append(f"  {name:34s} pointing {row['pointing_game']:.2f} of {row['n']}; "
                         f"{row.get('misses', 0)} misses{where}")
    ci = report.get("intervals")
    if ci:
        shown = {"AUROC": ("auroc", 3), "localization mm": ("loc_median_mm", 1),
                 "within %": ("loc_within_pct", 1), "pointing game": ("pointing_game", 3)}
        cells = [f"{name} {ci[key][0]:.{d}f}-{ci[key][1]:.{d}f}" for name, (key, d) in shown.items() if ci.get(key)]
        lines.append(f"95% intervals ({ci['method']}): " + ", ".join(cells))
    return "\n".join(lines)
