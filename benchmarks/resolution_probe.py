"""Do the labels the demo model misses need finer voxels or shape? A linear probe on HU-band fractions of the scan's
own voxels against the same probe on the model grid's (plain and anti-aliased resampling).

    python -m benchmarks.resolution_probe [--data data/phantom] [--workers 2]

Per scan, the share of voxels in each of the demo model's 21 HU bands (`DEMO_DENSITY_EDGES`) in 6 regions (thirds
along the scan axis x left/right halves), as log fractions, from (a) the NIfTI's own voxels (the phantoms: ~1.5 mm
in-plane, 2.3 mm slices), (b) the 96x80x80 model grid at 3.2x4.4x4.4 mm after linear resampling (what the demo model
sees) and (c) the same grid with the anti-aliasing prefilter (`to_model_space(antialias_input=True)`). A logistic
regression per label (standardised, C=0.1) is fitted on `train` and scored on `valid` (AUROC;
`benchmarks.density_probe.density_linear`). If the short labels (fibrotic sequelae, bronchiectasis,
peribronchial thickening) gained from (a), finer intensity statistics would be the lever; they did not (what they
need is shape: a wall around a lumen, a strand that is not a vessel; README, Limits, for what a finer encoder grid
did with it). Prints the table and writes benchmarks/results/resolution_probe.json. About 9 min on 2 cores for
900 scans.
"""

from __future__ import annotations

import argparse
import logging
from multiprocessing import Pool
from pathlib import Path

import numpy as np

from benchmarks.common import RESULTS, write_json
from benchmarks.density_probe import density_linear

log = logging.getLogger("resolution_probe")
SOURCES = ("native", "model_grid", "model_grid_antialiased")
N_THIRDS, N_SIDES = 3, 2


def regional_log_fractions(hu: np.ndarray, edges: np.ndarray) -> np.ndarray:
    """hu [slices, rows, columns] (columns across the patient's sides) -> log band fractions per region, flat."""
    k = len(edges) + 1
    band = np.digitize(hu, edges, right=True)
    third = np.minimum(np.arange(hu.shape[0]) * N_THIRDS // hu.shape[0], N_THIRDS - 1)
    side = np.arange(hu.shape[2]) * N_SIDES // hu.shape[2]
    region = third[:, None, None] * N_SIDES + side[None, None, :]
    counts = np.bincount((region * k + band).ravel(), minlength=N_THIRDS * N_SIDES * k)
    counts = counts.reshape(N_THIRDS * N_SIDES, k).astype(np.float64)
    return np.log(counts / counts.sum(1, keepdims=True) + 1e-4).ravel()


def scan_features(args: tuple) -> np.ndarray:
    """[3, F]: the features of one scan from its own voxels and the model grid without and with anti-aliasing."""
    path, meta, spacing, shape, edges = args
    import torch
    from ctvl.geometry import to_model_space

    from training.data import load_ctrate_volume

    torch.set_num_threads(1)
    vol = load_ctrate_volume(path, meta)
    rows = [regional_log_fractions(np.asarray(vol.array, np.float32), edges)]
    for antialias in (False, True):
        x, _ = to_model_space(vol, spacing, shape, (-1000.0, 1000.0), antialias_input=antialias)
        rows.append(regional_log_fractions(x * 2000.0 - 1000.0, edges))
    return np.stack(rows)


def split_features(root: Path, split: str, workers: int) -> tuple[np.ndarray, np.ndarray]:
    from ctvl.model import demo_config
    from ctvl.model.config import DEMO_DENSITY_EDGES

    from training.data import CTRateDataset, Preprocess

    mc = demo_config()
    ds = CTRateDataset(root, split, Preprocess.from_model_config(mc))
    jobs = [(r.path, r.meta, mc.spacing, mc.input_shape, np.asarray(DEMO_DENSITY_EDGES)) for r in ds.records]
    with Pool(workers) as pool:
        feats = np.stack(pool.map(scan_features, jobs, chunksize=8))
    return feats, np.stack([r.labels for r in ds.records]).astype(np.float32)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default="data/phantom")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--out", default=str(RESULTS / "resolution_probe.json"))
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    from ctvl.prompts import LABELS

    root = Path(args.data)
    ft, yt = split_features(root, "train", args.workers)
    fv, yv = split_features(root, "valid", args.workers)
    result = {"data": str(root), "n_train": len(ft), "n_valid": len(fv), "labels": list(LABELS)}
    for i, source in enumerate(SOURCES):
        result[source] = density_linear(ft[:, i], yt, fv[:, i], yv)
    print("linear probe on regional HU-band fractions, mean validation AUROC: "
          + ", ".join(f"{s} {np.nanmean(result[s]):.3f}" for s in SOURCES))
    print(f"  {'label':36s} " + " ".join(f"{s:>22s}" for s in SOURCES))
    for k, label in enumerate(LABELS):
        print(f"  {label:36s} " + " ".join(f"{result[s][k]:22.2f}" for s in SOURCES))
    write_json(args.out, result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
