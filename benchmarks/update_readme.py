"""Regenerate README.md's results section from benchmarks/results/*.json (never edit those numbers by hand).

    python -m benchmarks.update_readme
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.common import RESULTS
from training.evaluate import POINTING_TOLERANCE_MM

README = Path(__file__).resolve().parents[1] / "README.md"
START, END = "<!-- results:start -->", "<!-- results:end -->"


def _load(name: str) -> dict | None:
    path = RESULTS / f"{name}.json"
    return json.loads(path.read_text()) if path.is_file() else None


def _f(v: Any, digits: int = 3, unit: str = "") -> str:
    if v is None:
        return "–"
    if isinstance(v, (int, float)):
        return f"{v:.{digits}f}{unit}"
    return str(v)


ORACLE_KEYS = ("pointing_game", "pointing_game_per_finding", "pointing_within_tolerance", "median_peak_distance_mm",
                "mass_in_mask")  # the rows the mask baseline speaks to; its other figures are the prevalence baseline's


def _cell(row: dict, key: str, digits: int, column: str) -> str:
    """A quality-table cell: the figure, and for the model its bootstrap interval where one was computed."""
    if column == "mask" and key not in ORACLE_KEYS:
        return _f(None)
    ci = (row.get("intervals") or {}).get(key) if column == "model" else None
    return _f(row.get(key), digits) + (f" [{ci[0]:.{digits}f}–{ci[1]:.{digits}f}]" if ci else "")


def quality_section(q: dict) -> list[str]:
    cols = [k for k in ("model", "random", "prevalence", "mask") if k in q["headline"]]
    names = {"model": "demo model", "random": "random baseline", "prevalence": "prevalence baseline",
             "mask": "oracle heatmaps (masks on the heatmap grid)"}
    rows = [("mean AUROC, positive vs negative prompt", "auroc", 3, "≥ 0.90"),
            ("… of the pooled zero-shot score alone (strict zero-shot)", "auroc_pooled", 3, ""),
            ("… of the token-level (MIL) score alone", "auroc_mil", 3, ""),
            ("mean F1, threshold fixed on valid", "f1_fixed_on_valid", 3, ""),
            ("mean F1, threshold picked on test (CT-CLIP rule)", "f1_eval_set", 3, ""),
            ("report→volume R@1 (pool of 100)", "R@1", 3, ""),
            ("report→volume R@10 (pool of 100)", "R@10", 3, "≥ 0.5"),
            ("snippet localization, median error (mm)", "loc_median_mm", 1, "≤ 10"),
            ("snippet localization, within finding's slices (%)", "loc_within_pct", 1, "≥ 70"),
            ("pointing game, focal findings (per volume and label)", "pointing_game", 3, "≥ 0.7"),
            ("pointing game, per finding (stricter)", "pointing_game_per_finding", 3, ""),
            (f"heatmap peak within {POINTING_TOLERANCE_MM:g} mm of the finding (per volume and label; not the target)",
             "pointing_within_tolerance", 3, ""),
            ("heatmap peak's distance to the finding, median (mm)", "median_peak_distance_mm", 1, ""),
            ("heatmap mass in mask", "mass_in_mask", 3, "")]
    out = [f"Held-out phantom split `{q['split']}` (seed never used in training), thresholds fixed on "
           f"`{q['val_split']}`; `python -m benchmarks.quality`:", "",
           "| metric | " + " | ".join(names[c] for c in cols) + " | target |",
           "|---|" + "---|" * (len(cols) + 1)]
    for title, key, digits, target in rows:
        out.append(f"| {title} | " + " | ".join(_cell(q["headline"][c], key, digits, c) for c in cols)
                   + f" | {target} |")
    method = (q["headline"].get("model", {}).get("intervals") or {}).get("method")
    if method:
        out += ["", f"Brackets: 95% intervals of the demo model's figures ({method}), how far they could move on "
                "another phantom split of the same size."]
    if "mask" in cols:
        out += ["", "The oracle column is no model: its heatmaps are the phantom masks averaged onto the demo "
                "model's heatmap grid (`--baseline mask`: each cell's token-sized box, on the stitched grid of "
                "`model.heatmap_subdivision`, the label maps' grid before `model.heatmap_guidance` sharpens them), "
                "what a heatmap that knows the answer scores at that resolution; its other figures are the "
                "prevalence baseline's."]
    per = q["reports"]["model"]["classification"]["per_label"]
    point = {c: q["reports"][c].get("heatmaps", {}).get("per_label", {}) for c in ("model", "mask") if c in cols}
    branch = {k: b["per_label_auroc"] for k, b in q["reports"]["model"].get("score_branches", {}).items()}
    out += ["", "<details><summary>Per-label AUROC and pointing game (demo model)</summary>", "",
            "| label | AUROC | AUROC, pooled score alone | AUROC, MIL score alone | pointing game "
            "| pointing game, oracle heatmaps |", "|---|---|---|---|---|---|"]
    out += [f"| {name} | {_f(row['auroc'])} | "
            + " | ".join(_f(branch.get(k, {}).get(name)) for k in ("pooled", "mil")) + " | "
            + " | ".join(_f(point.get(c, {}).get(name, {}).get("pointing_game")) for c in ("model", "mask")) + " |"
            for name, row in per.items()]
    out += ["", "</details>"]
    return out


def ablation_section(a: dict) -> list[str]:
    out = [f"Objectives ablation, each trained {a['steps']} steps (same seed, data and budget), same split; "
           "`python -m benchmarks.ablation`:", "",
           "| objectives | AUROC | R@10 | loc. median (mm) | loc. within (%) | pointing game |",
           "|---|---|---|---|---|---|"]
    for name, r in a["headline"].items():
        out.append(f"| {name} | {_f(r.get('auroc'))} | {_f(r.get('R@10'))} | {_f(r.get('loc_median_mm'), 1)} | "
                   f"{_f(r.get('loc_within_pct'), 1)} | {_f(r.get('pointing_game'))} |")
    h = a["headline"]
    steps = [("siglip", "siglip+disease", "adding the disease prompts (pooled + MIL)"),
             ("siglip+disease", "siglip+disease+loc", "adding snippet–slice localization")]
    said = []
    for before, after, what in steps:
        if before in h and after in h:
            b, c = h[before], h[after]
            said.append(f"{what} moves AUROC {b['auroc']:.3f} → {c['auroc']:.3f}, R@10 {b['R@10']:.2f} → "
                        f"{c['R@10']:.2f}, localization {b['loc_median_mm']:.1f} → {c['loc_median_mm']:.1f} mm and "
                        f"the pointing game {b['pointing_game']:.3f} → {c['pointing_game']:.3f}")
    if said:
        out += ["", "At this budget " + "; ".join(said) + "."]
    return out


def speed_section(s: dict) -> list[str]:
    m = s["main"]
    cold, warm = m["cold"], m["warm"]
    out = [f"Inference on this machine class ({s['threads']} CPU threads), model: {m['model']}; "
           "`python -m benchmarks.inference_speed`:", "",
           "| measurement | result | target |", "|---|---|---|",
           f"| 512×512×300 CT: load + encode + 18 probabilities + 18 heatmaps (first volume) | "
           f"{_f(cold['total_s'], 2, ' s')} | ≤ 15 s |",
           f"| same, next volume (prompt embeddings cached) | {_f(warm['total_s'], 2, ' s')} | |",
           f"| peak RSS | {_f(m['peak_rss_mb_end'] / 1024, 2, ' GB')} | ≤ 4 GB |",
           f"| `locate`, new free-text query | {_f(m['locate_new_ms'], 1, ' ms')} | ≤ 30 ms |",
           f"| `locate`, repeated query | {_f(m['locate_repeat_ms'], 2, ' ms')} | ≤ 2 ms |",
           f"| heatmap for a new query, model grid | {_f(m['heatmap_new_model_ms'], 0, ' ms')} | ≤ 100 ms |",
           f"| heatmap for a new query, input grid | {_f(m['heatmap_new_input_ms'], 0, ' ms')} | ≤ 1.5 s |"]
    for row in s.get("scaling", []):
        out.append(f"| scaling: {row['size']} pipeline | {_f(row['cold']['total_s'], 2, ' s')} | |")
    pre = s.get("preprocess")
    if pre:
        out += [f"| 512×512×300 CT onto the demo grid: plain / anti-aliased (one pass) / smoothing the whole scan "
                f"first (oblique scans) | {_f(pre['plain_s'], 2, ' s')} / {_f(pre['antialias_s'], 2, ' s')} / "
                f"{_f(pre['antialias_smoothing_first_s'], 2, ' s')} | |",
                f"| blobness, two scales, one thread: demo grid / 2.2 mm in-plane grid | "
                f"{_f(pre['blobness_demo_grid_s'], 2, ' s')} / {_f(pre['blobness_fine_grid_s'], 2, ' s')} | |"]
    col = s.get("colipri", {})
    out.append(f"| COLIPRI image encoder (192³, random weights) | "
               f"{col.get('skipped') or _f(col.get('ratio'), 1, '× our encode time')} | |")
    return out


def gpu_section(g: dict) -> list[str]:
    out = [f"Training on a lent GPU (`benchmarks/device_check.sh`, summarised by `benchmarks/device_summary.py`). "
           f"{g.get('note', '')}", "",
           "| run | s/step | peak GPU memory |", "|---|---|---|"]
    for r in g.get("compute_only", []):
        ck = "with" if r["grad_checkpointing"] else "without"
        out.append(f"| model compute, `{Path(r['config']).name}`, batch {r['batch']}, {ck} checkpointing | "
                   f"{_f(r['s_per_step_median'], 2, ' s')} | {_f(r.get('gpu_peak_gib'), 1, ' GiB')} |")
    for r in g.get("end_to_end", []):
        out.append(f"| `training train`: {r['run']} | {_f(r['s_per_step_median'], 2, ' s')} | "
                   f"{_f(r['gpu_peak_gib'], 1, ' GiB')} |")
    if g.get("cuda_inference"):
        out += ["", "Export → `ctvl analyze --device cuda` → `training evaluate --device cuda`: "
                f"{g['cuda_inference']}."]
    return out


def data_section(p: dict | None, mq: dict | None, ma: dict | None, dp: dict | None = None) -> list[str]:
    out = []
    if p:
        out.append(f"- Phantom generator (`python benchmarks/phantom_speed.py`): "
                   f"{_f(p['generation_volumes_per_s'], 2)} volumes/s generated, "
                   f"{_f(p['generate_write_volumes_per_s'], 2)} volumes/s generated and written "
                   f"(.nii.gz + mask), per core, at the default size.")
    if mq:
        a = mq["quality"]
        out.append(f"- Reference miner (`python benchmarks/miner_quality.py`): precision {_f(a['all']['precision'])}, "
                   f"recall {_f(a['all']['recall'])} on {a['all']['sentences']} labelled sentences "
                   f"({a['all']['references']} references; the set was used during development, see the note in "
                   f"the benchmark); {mq['throughput']['reports_per_s']:.0f} reports/s.")
    if ma:
        mt, mv = ma["mined_vs_true"], ma.get("model_vs_true", {})
        line = (f"- Mined slices vs phantom truth (`python benchmarks/mining_agreement.py`): "
                f"{_f(100 * mt['in_true_range'], 1)}% inside the finding's slices")
        if "skipped" not in mv and mv:
            line += (f"; model vs truth: median {_f(mv.get('median_abs_error_mm'), 1)} mm, "
                     f"{_f(100 * mv.get('in_true_range', 0), 1)}% inside")
        out.append(line + ".")
    if dp:
        line = (f"- What the phantom's labels need (`python -m benchmarks.density_probe`): a linear model on regional "
                f"HU-band fractions reaches a mean validation AUROC of {_f(float(np.nanmean(dp['density_linear'])))}")
        if dp.get("density_mlp_standardised"):
            line += (f"; the model's regional density head alone, 640 steps, "
                     f"{_f(float(np.nanmean(dp['density_mlp'])))} on the raw log fractions and "
                     f"{_f(float(np.nanmean(dp['density_mlp_standardised'])))} standardised per feature")
        if dp.get("plain_cnn"):
            line += (f"; a plain 3D CNN trained end to end for {dp['cnn_steps']} steps "
                     f"{_f(float(np.nanmean(dp['plain_cnn'])))}")
        out.append(line + " (why the model gets densitometry features).")
    return out


def probe_line(fp: dict) -> str:
    """The feature probe's summary: the best probe's mean validation AUROC against the model's, and the labels where
    the model is weakest, each with the model's figure and the best probe's."""
    probes = {k[len("probe_"):-len("_valid")]: v for k, v in fp.items() if k.startswith("probe_") and
              k.endswith("_valid")}
    best = max(probes, key=lambda k: float(np.nanmean(probes[k])))
    model = np.asarray(fp["model_valid"], dtype=float)
    weakest = [int(k) for k in np.argsort(np.nan_to_num(model, nan=np.inf))[:5]]
    cells = ", ".join(f"{fp['labels'][k].lower()} {_f(model[k], 2)} / {_f(max(p[k] for p in probes.values()), 2)}"
                      for k in weakest)
    return (f"- What the encoder has learned (`python -m benchmarks.feature_probe`): linear probes on its frozen "
            f"features reach a mean validation AUROC of at most {_f(float(np.nanmean(probes[best])))} ({best}), "
            f"against the model's {_f(float(np.nanmean(model)))}; its weakest labels, model / best probe: {cells}.")


SHORT_LABELS = ("Pulmonary fibrotic sequela", "Bronchiectasis", "Peribronchial thickening")


def resolution_line(rp: dict) -> str:
    """The resolution probe's summary: mean validation AUROC per voxel source, and the short labels' figures."""
    sources = (("native", "the scans' own voxels"), ("model_grid", "the model grid"),
               ("model_grid_antialiased", "the anti-aliased model grid"))
    means = ", ".join(f"{_f(float(np.nanmean(rp[key])))} on {name}" for key, name in sources)
    cells = "; ".join(f"{label.lower()} " + " / ".join(_f(rp[key][rp["labels"].index(label)], 2) for key, _ in sources)
                      for label in SHORT_LABELS if label in rp["labels"])
    short = [rp["labels"].index(label) for label in SHORT_LABELS if label in rp["labels"]]
    gain = float(np.nanmean([rp["native"][k] - rp["model_grid"][k] for k in short])) if short else float("nan")
    verdict = ("finer intensity statistics do not read them better (mean change {:+.2f})" if not gain > 0.05
               else "finer intensity statistics read them better (mean change {:+.2f})").format(gain)
    return (f"- Finer voxels or shape? (`python -m benchmarks.resolution_probe`): a linear probe on regional HU-band "
            f"fractions reaches a mean validation AUROC of {means}; on the labels the model misses, native / grid / "
            f"anti-aliased: {cells}; {verdict}.")


def render() -> str:
    parts: list[str] = []
    q, a, s = _load("quality"), _load("ablation"), _load("inference_speed")
    if q:
        parts += ["### Demo model quality", ""] + quality_section(q) + [""]
    if a:
        parts += ["### Which objective buys what", ""] + ablation_section(a) + [""]
    if s:
        parts += ["### Speed", ""] + speed_section(s) + [""]
    g = _load("device_check")
    if g:
        parts += ["### Training on a GPU", ""] + gpu_section(g) + [""]
    parts += ["### Data and mining", ""] + data_section(_load("phantom_speed"), _load("miner_quality"),
                                                        _load("mining_agreement"), _load("density_probe"))
    fp = _load("feature_probe")
    if fp:
        parts.append(probe_line(fp))
    rp = _load("resolution_probe")
    if rp:
        parts.append(resolution_line(rp))
    return "\n".join(parts).rstrip() + "\n"


def main() -> int:
    text = README.read_text(encoding="utf-8")
    pattern = re.compile(re.escape(START) + ".*?" + re.escape(END), re.S)
    if not pattern.search(text):
        raise SystemExit(f"README.md has no {START} ... {END} block")
    README.write_text(pattern.sub(lambda _: f"{START}\n{render()}{END}", text), encoding="utf-8")
    print(render())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
